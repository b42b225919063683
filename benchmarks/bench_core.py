"""The decoding core's drivers against each other, and against another checkout of this repository, in one
run: `generate` (device loop), `model.stream` (host loop, one host sync per token), the batch engine with
one busy slot, and the engine with every slot busy, penalty-free and with a repetition penalty.

Decode tokens/s on `bench_batch.py`'s `small` model (text width 256, 8 layers, 65536 vocabulary), text
prompts, greedy, no stop tokens (every request runs to `--new-tokens`). Each case's time excludes its
compilation (one warm-up call). With `--against DIR` (a checkout of an older commit), the same cases run in
subprocesses of both trees, alternating `--rounds` times, and the table gives new / old per case (medians).

    python benchmarks/bench_core.py [--new-tokens 64] [--slots 8] [--rounds 3] [--against /tmp/old]

Prints one JSON line, then a table. Only public API is used, so that an older checkout runs it too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def measure(new_tokens: int, slots: int) -> dict[str, float]:
    """Tokens/s of each case, in this process (the tree it was started from)."""
    import numpy as np

    tree = Path(os.environ.get("BENCH_CORE_TREE", HERE.parents[1]))
    sys.path.insert(0, str(tree / "benchmarks"))  # the tree's own model builder, against its own package
    from bench_batch import build_model

    model = build_model("small")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 60000, (1, 40 + 7 * i)).astype(np.int32) for i in range(slots)]
    no_stop = {"eos_token_id": [], "max_new_tokens": new_tokens}

    def timed(fn) -> float:
        fn()  # compile
        start = time.perf_counter()
        tokens = fn()
        return tokens / (time.perf_counter() - start)

    def generate() -> int:
        return model.generate(input_ids=prompts[0], **no_stop).size

    def stream() -> int:
        return sum(1 for _ in model.stream(input_ids=prompts[0], **no_stop))

    def engine(count: int, **options) -> int:
        batch = model.batch_engine(slots=slots, max_length=512, **no_stop, **options)
        requests = [{"id": i, "inputs": {"input_ids": prompts[i]}} for i in range(count)]

        def run() -> int:
            return sum(len(r.token_ids) for r in batch.generate(requests))

        return run

    return {
        "generate_b1": timed(generate),
        "stream_b1": timed(stream),
        "engine_one_busy_slot": timed(engine(1)),
        "engine_full": timed(engine(slots)),
        "engine_full_penalty": timed(engine(slots, repetition_penalty=1.5)),
    }


def child(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(tree / "benchmarks" / HERE.name), "--child"]
    command += ["--new-tokens", str(args.new_tokens), "--slots", str(args.slots)]
    if not (tree / "benchmarks" / HERE.name).exists():  # an older tree: run this file against its package
        command[1] = str(HERE)
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_CORE_TREE": str(tree)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="a checkout of another commit, run alternately")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tree = Path(os.environ.get("BENCH_CORE_TREE", HERE.parents[1]))
        sys.path.insert(0, str(tree))
        import lfm2vl_jax

        if not Path(lfm2vl_jax.__file__).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"imported {lfm2vl_jax.__file__}, not the package of {tree}")
        print(json.dumps(measure(args.new_tokens, args.slots)))
        return
    sys.path.insert(0, str(HERE.parent))
    from machine import machine_description

    trees = {"new": HERE.parents[1]} | ({"old": args.against.resolve()} if args.against else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(child(tree, args))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    new = medians["new"]
    result = {
        "machine": machine_description(),
        "new_tokens": args.new_tokens,
        "slots": args.slots,
        "rounds": args.rounds,
        "tokens_per_s": medians,
        "stream_over_generate": new["stream_b1"] / new["generate_b1"],
        "one_busy_slot_over_generate": new["engine_one_busy_slot"] / new["generate_b1"],
        "penalty_free_over_penalised": new["engine_full"] / new["engine_full_penalty"],
    }
    if "old" in medians:
        result["new_over_old"] = {k: new[k] / medians["old"][k] for k in new}
    print(json.dumps(result))
    print(
        f"\n{'case':<24}{'new tok/s':>11}" + (f"{'old tok/s':>11}{'new/old':>9}" if "old" in medians else "")
    )
    for case, value in new.items():
        line = f"{case:<24}{value:>11.1f}"
        if "old" in medians:
            line += f"{medians['old'][case]:>11.1f}{value / medians['old'][case]:>9.2f}"
        print(line)
    print(
        f"stream / generate {result['stream_over_generate']:.2f}, one busy slot / generate "
        f"{result['one_busy_slot_over_generate']:.2f}, "
        f"penalty-free / penalised {result['penalty_free_over_penalised']:.2f}"
    )


if __name__ == "__main__":
    main()
