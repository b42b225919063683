"""The one XLA flag this package sets: the CPU compiler's memory-minimising instruction order, set in
XLA_FLAGS when `lfm2vl_jax` is imported, if JAX has not started its backends yet and XLA_FLAGS does not
name the flag already (the user's value wins).

Why: by default XLA's CPU compiler orders a program breadth-first, to run independent instructions
concurrently at the cost of memory (`--xla_cpu_enable_concurrency_optimized_scheduler`). A quantized
weight's dequantization depends on the weights alone, so that order dequantizes every chunk of every layer
first and holds them all: the 450M per-layer forward kept 1.15 GB of temporaries (its float32 weights'
size) against 9.5 MB depth-first, and int8 batch-1 decoding ran at 0.39x float32 instead of 1.17x. Float
decoding and training steps measured the same under both orders (README, "Quantization"). JAX reads
XLA_FLAGS once, when its backends start; a per-program `compiler_options` entry is accepted but does not
change the order (jax 0.10.2), hence the environment.

Not with several CPU devices (`--xla_force_host_platform_device_count`, `jax_num_cpu_devices`): under the
depth-first order, an 8-device training step's all-gathers stopped meeting (XLA's rendezvous gave up after
40 s with the devices at different collectives; it passed in 34 s in the default order).
"""

from __future__ import annotations

import os
import re

import jax

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
# XLA aborts the process on a flag it does not know, so the flag is set only on the jaxlib releases it was
# checked on (newer ones: a quantized model on a CPU warns, naming the flag).
CHECKED_JAXLIB = ((0, 10),)


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether the backends have started

    return xla_bridge.backends_are_initialized()


def _flag_known() -> bool:
    from jaxlib import version

    return tuple(int(part) for part in version.__version__.split(".")[:2]) in CHECKED_JAXLIB


def _several_cpu_devices(flags: str) -> bool:
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return (bool(counts) and int(counts[-1]) > 1) or jax.config.jax_num_cpu_devices > 1


def prefer_memory_scheduler() -> None:
    """Adds `FLAG=false` to XLA_FLAGS unless the backends have started, XLA_FLAGS names the flag,
    several CPU devices are asked for, or this jaxlib was not checked to know the flag."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG in flags or _several_cpu_devices(flags) or not _flag_known() or _backends_started():
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}=false".strip()


def memory_scheduler_on() -> bool:
    """Whether XLA_FLAGS turns the concurrency-optimised order off (the last mention of the flag wins,
    as in XLA's parser)."""
    values = re.findall(re.escape(FLAG) + r"(?:=(\w+))?", os.environ.get("XLA_FLAGS", ""))  # bare: true
    return bool(values) and values[-1].lower() in ("false", "0")
