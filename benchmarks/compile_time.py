"""Compile time of the decode step against depth: scanned motifs vs the per-layer Python loop.

The text tower of LFM2-1.2B (the 1.6B model's; hidden 2048, 32/8 heads, MLP 8192) at 4, 16 and 32 layers:
4 = one `conv, conv, attention, conv` motif, 32 = eight of them, 16 = LFM2's own irregular pattern. Only
shapes are needed (`jax.ShapeDtypeStruct` params), so nothing is allocated. Prints one JSON line, then
a table of seconds to trace + lower + compile one decode step at batch 8 with a 1024-token cache.

    python benchmarks/compile_time.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from lfm2vl_jax.config import ATTENTION, CONV, DTypePolicy, Lfm2VlConfig, RuntimeConfig, TextConfig
from lfm2vl_jax.inference.cache import init_cache
from lfm2vl_jax.inference.engine import DecodeState, decode_step
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.nn.params import abstract_params

C, A = CONV, ATTENTION
PATTERNS = {
    "4 (1 motif)": (C, C, A, C),
    "16 (LFM2)": (C, C, A) * 3 + (C, A) * 3 + (C,),
    "32 (8 motifs)": (C, C, A, C) * 8,
}


def compile_seconds(layer_types: tuple[str, ...], scan_layers: bool, dtype) -> float:
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
    batch, max_len = 8, 1024
    state = jax.eval_shape(
        lambda: DecodeState(
            cache=init_cache(config, batch, max_len),
            tokens=jnp.zeros((batch, 128), jnp.int32),
            num_generated=jnp.ones((), jnp.int32),
            done=jnp.zeros((batch,), bool),
            seen=None,
            key=jax.random.key(0),
        )
    )
    start = time.perf_counter()
    decode_step.lower(params, config, state, SamplingParams(), jnp.array([7]), 0).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    results = {
        depth: {layout: compile_seconds(pattern, layout == "scan", dtype) for layout in ("scan", "per-layer")}
        for depth, pattern in PATTERNS.items()
    }
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "compile_time",
                "device": f"{device.platform}:{device.device_kind}",
                "dtype": args.dtype,
                "seconds": results,
            }
        )
    )
    print(f"{'layers':<16}{'scan (s)':>10}{'per-layer (s)':>15}")
    for depth, r in results.items():
        print(f"{depth:<16}{r['scan']:>10.2f}{r['per-layer']:>15.2f}")


if __name__ == "__main__":
    main()
