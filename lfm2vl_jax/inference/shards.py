"""Splitting one requests file over independent `lfm2vl batch` runs (a job array: SLURM, Kubernetes
indexed jobs, Ray replicas) and merging their results files into one.

A line belongs to shard `request_shard(id, num_shards)`: a SHA-256 of the id's JSON text, so the same on
every machine, Python process and run, and independent of where the line sits in the file. Every run reads
the whole file (parsing is cheap next to generation) and runs only its own lines; a line repeating an
earlier id goes to that id's shard, which records it as a duplicate exactly as a single run would. The one
exception to "independent of line order": a line whose id cannot be read is known by its line number
(`<line N>`), and sharded by that.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.files import staging_file
from ..errors import Lfm2VlError
from .batch_io import MAX_LINE_BYTES, is_result_line, unique_request_lines

LISTED_IDS = 10  # ids named in a merge error; the rest are counted


class MergeError(Lfm2VlError):
    """Results files that do not merge into the results of one requests file (nothing is written)."""


def request_shard(request_id: Any, num_shards: int) -> int:
    """The shard (0 .. num_shards - 1) of a request id: stable across machines, processes and runs (not
    Python's salted `hash`); the integer 7 and the string "7" are different ids, as in JSON."""
    digest = hashlib.sha256(json.dumps(request_id).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def check_shard_arguments(num_shards: int | None, shard_index: int | None) -> None:
    """`--num-shards N --shard-index I`: both or neither, N >= 1, 0 <= I < N."""
    if num_shards is None and shard_index is None:
        return
    if num_shards is None or shard_index is None:
        raise Lfm2VlError("--num-shards and --shard-index go together: pass both (or neither)")
    if num_shards < 1:
        raise Lfm2VlError(f"--num-shards must be a positive integer, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise Lfm2VlError(
            f"--shard-index must be in [0, {num_shards}) for --num-shards {num_shards}, got {shard_index}"
        )


def _listed(ids: Sequence[Any]) -> str:
    named = ", ".join(json.dumps(i, ensure_ascii=False) for i in ids[:LISTED_IDS])
    return named + (f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else "")


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (
        a.exists() and b.exists() and os.path.samefile(a, b)
    )


def _check_merge_files(output: Path, results: Sequence[Path], requests: Path, overwrite: bool) -> None:
    """Everything about the files that can be checked before reading them."""
    if not results:
        raise MergeError("no results files to merge")
    for flag, path in [("--requests", requests)] + [("results", p) for p in results]:
        if not path.is_file():
            raise MergeError(f"{flag} {path}: {'not a regular file' if path.exists() else 'no such file'}")
    for i, path in enumerate(results):
        if any(_same_file(path, other) for other in results[:i]):
            raise MergeError(f"{path} is given twice")
    for flag, path in [("--requests", requests)] + [("results", p) for p in results]:
        if _same_file(output, path):
            raise MergeError(f"the output {output} is the {flag} file {path}; write the merge elsewhere")
    if not output.parent.is_dir():
        raise MergeError(f"the output's directory {output.parent} does not exist")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise MergeError(f"{output} exists; pass --overwrite to replace it")
        if output.is_symlink() or not output.is_file():
            raise MergeError(f"{output} is not a regular file; not replaced")
        with open(output, "rb") as file:
            foreign = next((n for n, line in enumerate(file, 1) if not is_result_line(line)), None)
        if foreign is not None:
            raise MergeError(
                f"{output}, line {foreign} is not a result line of lfm2vl batch: --overwrite replaces only a "
                "results file (left unchanged)"
            )


def merge_results(
    output: Path,
    results: Sequence[Path],
    requests: Path,
    overwrite: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> int:
    """Writes `output`: the result lines of `results` (the shards' files, never modified), one per line of
    `requests` in its order, after checking that every one of its ids is there exactly once and that no
    line belongs to another requests file (ids it does not hold). Any problem: `MergeError` naming the ids
    and files, and nothing is written. Returns the number of lines written."""
    output, requests, results = Path(output), Path(requests), [Path(p) for p in results]
    _check_merge_files(output, results, requests, overwrite)
    order = {line.item.id: i for i, line in enumerate(unique_request_lines(requests, max_line_bytes))}
    where: list[tuple[int, int, int] | None] = [None] * len(order)  # per request: (file, offset, length)
    foreign, duplicates = {}, {}
    for f, path in enumerate(results):
        offset = 0
        with open(path, "rb") as file:
            for number, line in enumerate(file, 1):
                if not line.endswith(b"\n"):
                    raise MergeError(f"{path} ends in a torn line (finish that run with --resume first)")
                if not line.strip():
                    offset += len(line)
                    continue
                if not is_result_line(line):
                    raise MergeError(f"{path}, line {number} is not a result line of lfm2vl batch")
                request_id = json.loads(line)["id"]
                index = order.get(request_id)
                if index is None:
                    foreign.setdefault(request_id, path)
                elif where[index] is not None:
                    duplicates.setdefault(request_id, path)
                else:
                    where[index] = (f, offset, len(line))
                offset += len(line)
    problems = []
    if foreign:
        files = sorted({str(p) for p in foreign.values()})
        problems.append(
            f"{len(foreign)} ids are not in {requests} (results of another requests file? in "
            f"{', '.join(files)}): {_listed(list(foreign))}"
        )
    if duplicates:
        problems.append(f"{len(duplicates)} ids appear more than once: {_listed(list(duplicates))}")
    missing = [request_id for request_id, index in order.items() if where[index] is None]
    if missing:
        problems.append(
            f"{len(missing)} of the {len(order)} ids of {requests} have no result: {_listed(missing)}"
        )
    if problems:
        raise MergeError("; ".join(problems) + f"; {output} not written")
    files = [open(path, "rb") for path in results]  # noqa: SIM115 (closed below)
    try:
        with staging_file(output, overwrite) as out:
            for f, offset, length in where:
                files[f].seek(offset)
                out.write(files[f].read(length))
    finally:
        for file in files:
            file.close()
    return len(where)
