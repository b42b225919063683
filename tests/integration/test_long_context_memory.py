"""A 16k-token prompt at the real LFM2-VL-450M shapes prefills in memory linear in its length (compiled
from shapes only, nothing runs, so the check is not timing- or load-dependent).

XLA's own accounting of the compiled prefill: arguments (the text tower's float32 weights, 1.4 GB),
outputs (the cache) and temporaries. With "auto" attention the temporaries grow linearly (4x the tokens,
about 4x the bytes); the reference's (heads x T x T) scores would need 35 GB at 16k tokens.
`benchmarks/long_context_memory.py` measures the peak resident memory of the real run (prefill and decoding
with the whole model resident) in a subprocess.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from processor_fixtures import reference_dir

from lfm2vl_jax.config import load_config
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import prefill
from lfm2vl_jax.nn.params import abstract_params

GB = 1e9


@functools.cache
def prefill_memory(length: int, attention: str = "auto") -> jax.stages.CompiledMemoryStats:
    config = load_config(reference_dir("lfm2-vl-450m")).with_runtime(scan_layers=False, attention=attention)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    lowered = prefill.lower(
        abstract_params(config),
        config,
        ids,
        ids,
        None,
        None,
        None,
        None,
        jnp.zeros((2,), jnp.uint32),
        SamplingParams(),
        jnp.full((1,), 128, jnp.int32),
        jnp.full((1, 8), 7, jnp.int32),
        jnp.zeros((1,), bool),
        capacity=length + 128,
    )
    return lowered.compile().memory_analysis()


def test_16k_token_prefill_memory_is_linear_in_length():
    long, short = prefill_memory(16384), prefill_memory(4096)
    assert long.temp_size_in_bytes < 4.5 * short.temp_size_in_bytes  # quadratic would be 16x
    total = long.argument_size_in_bytes + long.output_size_in_bytes + long.temp_size_in_bytes
    assert total < 4.5 * GB, total / GB  # + vision weights and the runtime: under 6 GB resident
    reference = prefill_memory(16384, "reference")
    assert reference.temp_size_in_bytes > 8 * long.temp_size_in_bytes  # what this test would catch
