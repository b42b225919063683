"""The Ray path's cost per request against the single-process `lfm2vl batch`, same requests, same run.

Runs `lfm2vl batch` (in this process, through `cli.main`) on N1 and then N2 requests, alone and with
`--ray` (1 replica; preprocessing in the replica, then in a separate CPU stage), and reports each path's
marginal seconds per request, (T(N2) - T(N1)) / (N2 - N1): the fixed costs (loading the model, starting the
replica's process, the first compilations) cancel out. Every run shares one persistent compilation cache,
warmed first, so that no timed run compiles. Workload: tests/tiny_checkpoints' chat checkpoint (a tiny
model with the released processor settings), two thirds of the requests with a 400x300 or 640x480 photo,
the rest text only; 8 new tokens each (greedy), 8 slots.

    python benchmarks/bench_ray.py [--n1 32] [--n2 160] [--repeats 2] [--cpus 4]

Prints one JSON line (with whether each path's results equal the single process's). Numbers on a
shared machine vary; compare the paths within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import machine_description  # noqa: E402
from tiny_checkpoints import write_chat_checkpoint  # noqa: E402

from lfm2vl_jax.cli import main  # noqa: E402


def write_requests(directory: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (300, 400), "b.png": (480, 640)}.items():
        if not (directory / name).exists():
            Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(directory / name)
    lines = []
    for i in range(count):
        content = [{"type": "text", "text": f"Describe picture {i}."}]
        if i % 3:
            content.insert(0, {"type": "image", "path": "ab"[i % 2] + ".png"})
        lines.append(json.dumps({"id": i, "messages": [{"role": "user", "content": content}]}))
    path = directory / f"requests-{count}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_batch(checkpoint: Path, requests: Path, output: Path, cache: Path, *extra: str) -> float:
    argv = ["batch", "--model", str(checkpoint), "--input", str(requests), "--output", str(output)]
    argv += ["--slots", "8", "--max-new-tokens", "8", "--max-length", "1024", "--quiet"]
    argv += ["--compile-cache", str(cache), *extra]
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        status = main(argv)
    assert status == 0, status
    return time.perf_counter() - start


def results(path: Path) -> dict:
    return {json.dumps(line["id"]): line for line in map(json.loads, path.read_text().splitlines())}


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=32)
    parser.add_argument("--n2", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (the fastest counts)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    checkpoint = write_chat_checkpoint(work / "model")
    cache = work / "compile-cache"
    sizes = {n: write_requests(work, n) for n in (args.n1, args.n2)}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    paths = {
        "single process": (),
        "ray, preprocessing in the replica": ("--ray",),
        "ray, preprocessing in a CPU stage": ("--ray", "--ray-preprocess", "stage"),
    }
    timed_batch(checkpoint, sizes[args.n2], work / "warm.jsonl", cache)  # compiles every program once
    seconds, outputs = {}, {}
    for repeat in range(args.repeats):
        for name, extra in paths.items():
            for n, path in sizes.items():
                outputs[name, n] = work / f"{name}-{n}-{repeat}.jsonl".replace(" ", "_")
                elapsed = timed_batch(checkpoint, path, outputs[name, n], cache, *extra)
                seconds.setdefault(name, {})[n] = min(elapsed, seconds.get(name, {}).get(n, elapsed))
    equal = {
        name: all(results(outputs[name, n]) == results(outputs["single process", n]) for n in sizes)
        for name in paths
    }
    per_request = {name: (t[args.n2] - t[args.n1]) / (args.n2 - args.n1) for name, t in seconds.items()}
    single = per_request["single process"]
    print(
        json.dumps(
            {
                "machine": machine_description(),
                "requests": [args.n1, args.n2],
                "seconds": seconds,
                "outputs_equal_single_process": equal,
                "seconds_per_request": per_request,
                "overhead_per_request_vs_single": {name: s - single for name, s in per_request.items()},
            }
        )
    )


if __name__ == "__main__":
    main_()
