"""Peak memory of a long text prompt: prefill + greedy decoding at the real LFM2-VL-450M shapes.

Each prompt length runs in a fresh subprocess (random float32 weights of the released 450M config, the
whole model resident as `from_pretrained` holds it; a random text prompt of the given length; the engine's
prefill and device decoding loop, `--new-tokens` tokens) and reports the child's peak resident set size
(`ru_maxrss`), with the compiled programs' own accounting (arguments, outputs, temporaries) and the
wall times. The attention implementation is "auto" unless `--attention` says otherwise ("reference"
materialises the (heads x T x T) scores: about 17 GB per layer at 16k tokens).

Prints one JSON line, then a table.

    python benchmarks/long_context_memory.py [--lengths 4096 16384] [--new-tokens 16] [--attention auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "data" / "reference" / "lfm2-vl-450m"


def child(length: int, new_tokens: int, attention: str, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lfm2vl_jax.config import DTypePolicy, load_config
    from lfm2vl_jax.inference import engine
    from lfm2vl_jax.inference.sampling import SamplingParams
    from lfm2vl_jax.nn.params import init_params

    config = load_config(CONFIG)
    config = config.with_runtime(
        dtypes=DTypePolicy.uniform(jnp.dtype(dtype)), scan_layers=False, attention=attention
    )
    params = init_params(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(1000, 60000, (1, length))
    batch = engine.prepare_batch(config, ids, pad_id=0)
    request = engine.Request(batch, SamplingParams(), stop_ids=(), pad_id=0, max_new_tokens=new_tokens)

    start = time.perf_counter()
    states = engine.run(params, config, request, loop="device")
    next(states)  # the first tokens, read on the host
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    _, tokens = next(states)
    decode_s = time.perf_counter() - start
    return {
        "length": length,
        "bucketed_length": int(batch.input_ids.shape[1]),
        "new_tokens": 1 + int(tokens.shape[1]),
        "prefill_s_with_compile": prefill_s,
        "decode_s_with_compile": decode_s,
        "tokens_finite": bool(np.all(tokens >= 0)),
        "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.attention, args.dtype)))
        return

    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import machine_description

    results = []
    for length in args.lengths:
        command = [sys.executable, __file__, "--child", str(length), "--new-tokens", str(args.new_tokens)]
        command += ["--attention", args.attention, "--dtype", args.dtype]
        out = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            results.append({"length": length, "error": out.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "long_context_memory",
        **machine_description(),
        "model": "lfm2-vl-450m (random weights)",
        "dtype": args.dtype,
        "attention": args.attention,
        "results": results,
    }
    print(json.dumps(report))
    print(f"\n{report['cpu']}, {args.dtype}, attention={args.attention}, {args.new_tokens} new tokens")
    print(f"{'prompt':>8}{'peak RSS (GB)':>15}{'prefill (s)':>13}{'decode (s)':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['length']:>8}  failed: {r['error']}")
            continue
        print(
            f"{r['length']:>8}{r['peak_rss_GB']:>15.2f}{r['prefill_s_with_compile']:>13.1f}"
            f"{r['decode_s_with_compile']:>12.1f}"
        )
    print("(times include compilation)")


if __name__ == "__main__":
    main()
