"""What a compiled XLA program does per call, read off its optimized HLO text (`compiled.as_text()`):
the kernels it launches (instructions of the entry computation and of the control-flow computations it
runs, each loop body counted once per iteration when XLA knows the trip count) and the copies it makes
(kernels that only move data: copies, transposes, slices, with their sizes). Used by the tests that keep
the decode step lean and by the benchmarks that report it; no device needed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# Instructions that launch nothing: they name buffers or pieces of them.
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id"}
# Instructions that only move data; a kernel made of nothing else is a copy, whatever XLA calls it.
MOVE_OPS = {"copy", "transpose", "slice", "dynamic-slice", "concatenate", "pad", "reshape", "broadcast"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}
DTYPE_BYTES |= {"f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    op: str
    shape: str  # e.g. "f32[8,1024,64]{2,1,0}" (a tuple type for multi-output instructions)
    line: str

    @property
    def elements(self) -> int:
        match = re.match(r"\w+\[([\d,]*)\]", self.shape)
        if not match:
            return 0
        return math.prod(int(d) for d in match.group(1).split(",") if d)

    @property
    def bytes(self) -> int:
        return self.elements * DTYPE_BYTES.get(self.shape.split("[")[0], 4)

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"{key}=([%\w.\-]+)", self.line)
        return match.group(1).lstrip("%") if match else None


def _parse_instruction(line: str) -> Instruction | None:
    match = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):  # tuple type: skip to the matching parenthesis
        depth = 0
        end = 0
        for end, char in enumerate(rest, start=1):  # noqa: B007 (used after the loop)
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    return Instruction(name, op.group(1) if op else "?", shape, line) if op else None


def computations(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
    """Every computation's instructions by name, and the entry computation's name."""
    result: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            current = header
            result[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.startswith(" "):
            instruction = _parse_instruction(line)
            if instruction is not None:
                result[current].append(instruction)
    return result, entry


def _trip_count(instruction: Instruction) -> int | None:
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.line)
    return int(match.group(1)) if match else None


@dataclasses.dataclass
class StepStats:
    kernels: collections.Counter  # op kind -> launches per call
    unknown_trip_counts: int  # loops whose trip count XLA does not know (counted once)
    copies: list[tuple[Instruction, int]]  # kernels that only move data, with their launches per call

    @property
    def total_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def copied_bytes(self) -> int:
        """Bytes written per call by kernels that only move data."""
        return sum(ins.bytes * times for ins, times in self.copies)

    def largest_copy_bytes(self) -> int:
        return max((ins.bytes for ins, _ in self.copies), default=0)


def step_stats(hlo: str) -> StepStats:
    comps, entry = computations(hlo)
    kernels: collections.Counter = collections.Counter()
    copies: list[tuple[Instruction, int]] = []
    unknown = 0

    def only_moves(ins: Instruction) -> bool:
        if ins.op == "fusion":
            return all(i.op in MOVE_OPS | FREE_OPS for i in comps[ins.attribute("calls")])
        return ins.op in MOVE_OPS

    def visit(name: str, times: int) -> None:
        nonlocal unknown
        for ins in comps[name]:
            if ins.op == "while":
                trips = _trip_count(ins)
                if trips is None:
                    unknown += 1
                    trips = 1
                visit(ins.attribute("body"), times * trips)
                visit(ins.attribute("condition"), times * (trips + 1))
            elif ins.op == "call":
                visit(ins.attribute("to_apply"), times)
            elif ins.op == "conditional":
                branches = re.findall(
                    r"%([\w.\-]+)", ins.line.split("branch_computations=")[-1].split("}")[0]
                )
                for branch in branches or [
                    ins.attribute("true_computation"),
                    ins.attribute("false_computation"),
                ]:
                    visit(branch, times)  # an upper bound: one branch runs
            elif ins.op not in FREE_OPS:
                kernels[ins.op] += times
                if only_moves(ins):
                    copies.append((ins, times))

    visit(entry, 1)
    return StepStats(kernels, unknown, copies)
