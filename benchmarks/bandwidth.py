"""Memory bandwidth for rooflines: measured on the device in the same run, and the datasheet figure of
known accelerators.

A batch-1 decode step streams every weight once, so the roofline is bandwidth / weight bytes. Accelerators:
a device-to-device copy of a large bf16 array (>= 2 GiB: far past the L2 and any launch overhead), best of
several, counting bytes read + written; that is what the memory system streams (4.2-4.3 TB/s on an H200 of
4.8 by the datasheet), where a jitted `x + 1` over 400 MB read only half of it. CPUs: a large reduction (bytes
read / s), since a CPU copy is bound by write-allocate traffic a decode step does not have.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

GiB = 1 << 30
ACCELERATOR_COPY_BYTES = 2 * GiB
CPU_READ_BYTES = 400_000_000

# Datasheet memory bandwidth (bytes/s) by a substring of `device.device_kind`; the first match wins, so
# variants come before their family's default. Unknown devices get no datasheet figure.
DATASHEET_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L4", 300e9),
    ("TPU v6", 1.64e12),  # v6e ("TPU v6 lite")
    ("TPU v5 lite", 819e9),  # v5e
    ("TPU v5e", 819e9),
    ("TPU v5", 2.765e12),  # v5p ("TPU v5")
    ("TPU v4", 1.2e12),
)


def datasheet_bandwidth(device: jax.Device) -> float | None:
    """The vendor's memory bandwidth of `device` in bytes/s, or None for an unknown kind (CPUs included)."""
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "").lower()
    return next((rate for name, rate in DATASHEET_BANDWIDTH if name.lower() in kind), None)


def call_seconds(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which blocks until its result is ready), after one
    warm-up call (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(nbytes: int = ACCELERATOR_COPY_BYTES, repeats: int = 5) -> float:
    """Bytes/s read + written by a jitted device-to-device copy of `nbytes` of bf16 (best of `repeats`)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(jnp.copy)  # compiles to one `copy` of the whole buffer (no aliasing without donation)
    seconds = min(call_seconds(lambda: jax.block_until_ready(copy(x)), repeats))
    return 2 * nbytes / seconds


def read_bandwidth(nbytes: int = CPU_READ_BYTES, repeats: int = 5) -> float:
    """Bytes/s read by a jitted float32 sum over `nbytes` (best of `repeats`)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = min(call_seconds(lambda: jax.block_until_ready(total(x)), repeats))
    return nbytes / seconds


def roofline_bandwidth(device: jax.Device | None = None) -> dict:
    """{"probe": "copy"|"read", "GB_s": measured, "datasheet_GB_s": figure or None} for `device`."""
    device = device or jax.devices()[0]
    datasheet = datasheet_bandwidth(device)
    if device.platform == "cpu":
        probe, rate = "read", read_bandwidth()
    else:
        probe, rate = "copy", copy_bandwidth()
    return {"probe": probe, "GB_s": rate / 1e9, "datasheet_GB_s": datasheet and datasheet / 1e9}


def fractions(tokens_per_s: float, bytes_per_token: float, bandwidth: dict) -> dict:
    """A decode rate as fractions of the measured roofline and (known devices) the datasheet one."""
    result = {"measured": tokens_per_s * bytes_per_token / (bandwidth["GB_s"] * 1e9)}
    if bandwidth["datasheet_GB_s"]:
        result["datasheet"] = tokens_per_s * bytes_per_token / (bandwidth["datasheet_GB_s"] * 1e9)
    return result
