"""Attention implementations against each other at LFM2-VL's shapes: where "auto" should leave the reference.

Causal prefill at the text tower's shapes (16 query / 8 key-value heads of 64, one row) and bidirectional
attention at the vision tower's (12 heads of 64, one image), for growing sequence lengths; forward only, or
forward + backward with `--grad`. Every implementation runs at each length in turn, repeated, and the
median is reported with the reference's score-matrix size (what `kernels.REFERENCE_MAX_SCORE_BYTES`
compares). cuDNN is included where it can run (a CUDA GPU, with `--dtype bfloat16`).

Prints one JSON line, then a table.

    python benchmarks/bench_attention.py [--lengths 256 512 1024 2048 4096] [--dtype float32] [--grad]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from machine import machine_description

from lfm2vl_jax import kernels
from lfm2vl_jax.nn.attention import attention

SHAPES = {"text (causal)": (16, 8, 64, True), "vision": (12, 12, 64, False)}


def seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def program(name: str, causal: bool, grad: bool):
    def forward(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return attention(q, k, v, causal=causal, implementation=name)

    if not grad:
        return jax.jit(forward)
    return jax.jit(jax.grad(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--grad", action="store_true", help="time forward + backward")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for shape_name, (heads, kv_heads, head_dim, causal) in SHAPES.items():
        for length in args.lengths:
            q = jnp.asarray(rng.normal(size=(1, length, heads, head_dim)), dtype)
            k, v = (jnp.asarray(rng.normal(size=(1, kv_heads, length, head_dim)), dtype) for _ in "kv")
            call = kernels.Call(
                kernels.backend(), dtype, 1, length, length, heads, kv_heads, head_dim, causal, False, True
            )
            names = ["reference", "blockwise"] + (
                ["cudnn"] if kernels.REGISTRY["cudnn"].unsupported(call) is None else []
            )

            times = {
                name: seconds(program(name, causal, args.grad), (q, k, v), args.repeats) for name in names
            }
            rows.append(
                {
                    "shape": shape_name,
                    "length": length,
                    "score_MB": call.score_bytes / 2**20,
                    "auto": kernels.choose("auto", call),
                    "seconds": times,
                }
            )
    report = {
        "benchmark": "attention",
        **machine_description(),
        "dtype": args.dtype,
        "grad": args.grad,
        "reference_max_score_MB": kernels.REFERENCE_MAX_SCORE_BYTES.get(
            kernels.backend(), kernels.DEFAULT_REFERENCE_MAX_SCORE_BYTES
        )
        / 2**20,
        "rows": rows,
    }
    print(json.dumps(report))
    print(
        f"\n{report['device']} ({report['cpu']}), {args.dtype}, {'fwd+bwd' if args.grad else 'forward'} (ms)"
    )
    print(f"{'shape':<16}{'T':>6}{'scores MB':>11}{'reference':>11}{'blockwise':>11}{'cudnn':>9}  auto")
    for r in rows:
        t = r["seconds"]
        cudnn = f"{1e3 * t['cudnn']:9.2f}" if "cudnn" in t else f"{'-':>9}"
        print(
            f"{r['shape']:<16}{r['length']:>6}{r['score_MB']:>11.0f}{1e3 * t['reference']:>11.2f}"
            f"{1e3 * t['blockwise']:>11.2f}{cudnn}  {r['auto']}"
        )


if __name__ == "__main__":
    main()
