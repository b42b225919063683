"""How XLA multiplies by a weight-only quantized matrix on this backend: the formulations `nn.quant` chose
between, timed on one (1024, 4608) kernel (an LFM2-VL-450M MLP projection) against the float32 product.

- f32 dot: the float model's product (the baseline);
- whole dequant: the weight converted and scaled in full, then one dot (what qwix and a plain
  `x @ dequantize(w)` do);
- multiply-reduce: sum(x * w) over the (N, K) layout, no dot at all;
- int8 dot: `lax.dot_general` on the int8 weight with `preferred_element_type` float32;
- w8a8: activations quantized per row too, an int8 x int8 -> int32 dot (not weight-only: a different,
  less accurate model; for comparison);
- chunks of C inputs: each chunk of the contracted axis dequantized (a C x N buffer) and multiplied, the
  partial products summed (`nn.quant.quantized_einsum` on a CPU, C = 512);
- int4 (group 64, two per byte): whole and in chunks; per-group dots with the scales applied after.

    python benchmarks/quant_matmul.py [--batches 1 8 256] [--repeats 7]

Prints one JSON line (machine, CPU model, microseconds per call, median), then a table.
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

K, N, GROUP = 1024, 4608, 64
HIGHEST = jax.lax.Precision.HIGHEST


def operands(batch: int) -> dict:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N), dtype=np.float32) / 32
    scale8 = np.abs(w).max(0) / 127
    q8 = np.rint(w / scale8).astype(np.int8)
    grouped = w.reshape(K // GROUP, GROUP, N)
    scale4 = np.abs(grouped).max(1) / 7
    q4 = np.clip(np.rint(grouped / scale4[:, None]), -7, 7).astype(np.int8).reshape(K, N)
    return {
        "x": jnp.asarray(rng.standard_normal((batch, K), dtype=np.float32)),
        "w": jnp.asarray(w),
        "q8": jnp.asarray(q8),
        "q8t": jnp.asarray(q8.T.copy()),
        "s8": jnp.asarray(scale8),
        "p4": jnp.asarray(((q4[0::2] & 0x0F) | (q4[1::2] << 4)).astype(np.uint8)),  # (K/2, N)
        "s4": jnp.asarray(scale4),  # (K/G, N)
    }


def unpack(p: jax.Array) -> jax.Array:
    low = jax.lax.bitcast_convert_type(p << 4, jnp.int8) >> 4
    high = jax.lax.bitcast_convert_type(p, jnp.int8) >> 4
    return jnp.stack([low, high], 1).reshape(-1, p.shape[-1])


def int4_weight(p: jax.Array, s: jax.Array, start: int, size: int) -> jax.Array:
    q = unpack(p[start // 2 : (start + size) // 2]).reshape(size // GROUP, GROUP, N).astype(jnp.float32)
    return (q * s[start // GROUP : (start + size) // GROUP, None]).reshape(size, N)


def int8_chunks(size: int):
    def f(o: dict) -> jax.Array:
        total = 0
        for i in range(0, K, size):
            total = total + jnp.dot(
                o["x"][:, i : i + size], o["q8"][i : i + size].astype(jnp.float32), precision=HIGHEST
            )
        return total * o["s8"]

    return f


def int4_chunks(size: int):
    def f(o: dict) -> jax.Array:
        total = 0
        for i in range(0, K, size):
            total = total + jnp.dot(
                o["x"][:, i : i + size], int4_weight(o["p4"], o["s4"], i, size), precision=HIGHEST
            )
        return total

    return f


def w8a8(o: dict) -> jax.Array:
    scale = jnp.max(jnp.abs(o["x"]), -1, keepdims=True) / 127
    xq = jnp.rint(o["x"] / scale).astype(jnp.int8)
    dims = (((1,), (0,)), ((), ()))
    product = jax.lax.dot_general(xq, o["q8"], dims, preferred_element_type=jnp.int32)
    return product.astype(jnp.float32) * scale * o["s8"]


def int4_per_group(o: dict) -> jax.Array:
    x = o["x"].reshape(-1, K // GROUP, GROUP)
    q = unpack(o["p4"]).reshape(K // GROUP, GROUP, N).astype(jnp.float32)
    return (jnp.einsum("bgk,gkn->bgn", x, q, precision=HIGHEST) * o["s4"]).sum(1)


FORMULATIONS = {
    "f32 dot": lambda o: jnp.dot(o["x"], o["w"], precision=HIGHEST),
    "int8 whole dequant": lambda o: jnp.dot(o["x"], o["q8"].astype(jnp.float32), precision=HIGHEST) * o["s8"],
    "int8 multiply-reduce (N,K)": lambda o: (
        jnp.sum(o["x"][:, None, :] * o["q8t"].astype(jnp.float32), -1) * o["s8"]
    ),
    "int8 dot preferred f32": lambda o: (
        jax.lax.dot_general(
            o["x"], o["q8"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=HIGHEST
        )
        * o["s8"]
    ),
    "w8a8 int32 dot": w8a8,
    "int8 chunks of 128": int8_chunks(128),
    "int8 chunks of 256": int8_chunks(256),
    "int8 chunks of 512": int8_chunks(512),
    "int4 whole dequant": int4_chunks(K),
    "int4 per-group dots": int4_per_group,
    "int4 chunks of 256": int4_chunks(256),
    "int4 chunks of 512": int4_chunks(512),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    args = parser.parse_args()
    report = {"benchmark": "quant_matmul", **machine_description(), "shape": [K, N], "us": {}}
    for batch in args.batches:
        o = operands(batch)
        reference = np.asarray(o["x"] @ o["w"])
        report["us"][batch] = {}
        for name, fn in FORMULATIONS.items():
            jitted = jax.jit(fn)
            try:
                out = np.asarray(jitted(o))
            except Exception as err:  # noqa: BLE001 (a formulation this backend refuses is a result too)
                report["us"][batch][name] = f"{type(err).__name__}"
                continue
            assert np.abs(out - reference).max() < 0.2 * np.abs(reference).max(), name
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.calls):
                    out = jitted(o)
                jax.block_until_ready(out)
                times.append((time.perf_counter() - start) / args.calls * 1e6)
            report["us"][batch][name] = statistics.median(times)
    print(json.dumps(report))
    print(
        f"\n{report['device']} ({report['cpu']}): x (B, {K}) @ w ({K}, {N}), microseconds per call (median)"
    )
    print(
        f"{'formulation':<30}" + "".join(f"{'B=' + str(b):>12}" for b in args.batches) + "   (x f32 at B=1)"
    )
    for name in FORMULATIONS:
        cells = [report["us"][b][name] for b in args.batches]
        text = "".join(f"{c:>12.0f}" if isinstance(c, float) else f"{c:>12}" for c in cells)
        base = report["us"][args.batches[0]]["f32 dot"]
        ratio = f"   {base / cells[0]:.2f}x" if isinstance(cells[0], float) else ""
        print(f"{name:<30}{text}{ratio}")


if __name__ == "__main__":
    main()
