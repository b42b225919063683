"""Compile time against depth: scanned motifs vs the per-layer Python loop (the default layout), for the
decode step and for a text prefill.

The text tower of LFM2-1.2B (the 1.6B model's; hidden 2048, 32/8 heads, MLP 8192) at 4, 16 and 32 layers:
4 = one `conv, conv, attention, conv` motif, 32 = eight of them, 16 = LFM2's own irregular pattern. Only
shapes are needed (`jax.ShapeDtypeStruct` params), so nothing is allocated. Prints one JSON line, then
a table of seconds to trace + lower + compile one decode step at batch 8 with a 1024-token cache, and the
prefill of a 1024-token text prompt (whose attention is the blockwise kernel's loops on the CPU).

    python benchmarks/compile_time.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from machine import machine_description

from lfm2vl_jax.config import ATTENTION, CONV, DTypePolicy, Lfm2VlConfig, RuntimeConfig, TextConfig
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import decode_step, empty_rows, prefill
from lfm2vl_jax.nn.params import abstract_params

C, A = CONV, ATTENTION
PATTERNS = {
    "4 (1 motif)": (C, C, A, C),
    "16 (LFM2)": (C, C, A) * 3 + (C, A) * 3 + (C,),
    "32 (8 motifs)": (C, C, A, C) * 8,
}


def compile_seconds(layer_types: tuple[str, ...], scan_layers: bool, dtype, program: str) -> float:
    text = TextConfig(
        vocab_size=65536,
        hidden_size=2048,
        intermediate_size=8192,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        layer_types=layer_types,
    )
    runtime = RuntimeConfig(dtypes=DTypePolicy.uniform(dtype), scan_layers=scan_layers)
    config = Lfm2VlConfig(text=text, runtime=runtime)
    params = abstract_params(config)
    start = time.perf_counter()
    if program == "decode":
        batch, max_len = 8, 1024
        state = jax.eval_shape(
            lambda: empty_rows(config, batch, max_len, SamplingParams(), (2,), per_row=False)
        )
        decode_step.lower(params, config, state).compile()
    else:
        ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
        rows = jax.ShapeDtypeStruct((1,), jnp.int32)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        stops = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        padding = jax.ShapeDtypeStruct((1,), jnp.bool_)
        prefill.lower(
            params,
            config,
            ids,
            ids,
            None,
            None,
            None,
            None,
            key,
            SamplingParams(),
            rows,
            stops,
            padding,
            capacity=1152,
        ).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    results = {
        program: {
            depth: {
                layout: compile_seconds(pattern, layout == "scan", dtype, program)
                for layout in ("scan", "per-layer")
            }
            for depth, pattern in PATTERNS.items()
        }
        for program in ("decode", "prefill")
    }
    print(
        json.dumps(
            {"benchmark": "compile_time", **machine_description(), "dtype": args.dtype, "seconds": results}
        )
    )
    print(f"{'program':<10}{'layers':<16}{'scan (s)':>10}{'per-layer (s)':>15}")
    for program, by_depth in results.items():
        for depth, r in by_depth.items():
            print(f"{program:<10}{depth:<16}{r['scan']:>10.2f}{r['per-layer']:>15.2f}")


if __name__ == "__main__":
    main()
