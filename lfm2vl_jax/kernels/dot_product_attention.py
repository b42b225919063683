"""`jax.nn.dot_product_attention` behind the attention entry point: "cudnn" is cuDNN's fused flash
attention (forward and backward; GPUs, bf16/fp16, head dims multiples of 8 up to 128), "xla" the same call
on XLA's own implementation (any backend; it materialises the scores, so it is here to test this wrapper
where cuDNN is absent, not to be fast).

It takes keys sequence-major, (B, S, K, H), so the head-major keys are transposed (a copy of K and V per
call: negligible next to a prefill, which is why cached decoding, where it would copy the cache every step,
is not offered; nor are queries at positions other than 0 .. T-1 with causal masking, which its causal
mask cannot express). Key padding maps to `key_value_seq_lengths`; query rows are never masked, so padding
queries see what the reference shows them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .registry import Call, KernelUnavailableError, register

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper and later; 128 everywhere


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array,
    q_positions: jax.Array,
    causal: bool,
    new_k: jax.Array | None,
    new_v: jax.Array | None,
    implementation: str,
) -> jax.Array:
    """The entry point's arguments; q_positions must be 0 .. T-1 under `causal` and new_k/new_v None (as
    `unsupported` ensures)."""
    del q_positions, new_k, new_v
    try:
        return jax.nn.dot_product_attention(
            q,
            jnp.swapaxes(k, 1, 2),
            jnp.swapaxes(v, 1, 2),
            is_causal=causal,
            key_value_seq_lengths=kv_lengths.astype(jnp.int32),
            implementation=implementation,
        )
    except (NotImplementedError, RuntimeError) as err:  # JAX's checks of cuDNN's version and shapes
        raise KernelUnavailableError(f"{implementation} attention is unavailable here: {err}") from err


def _unsupported_xla(call: Call) -> str | None:
    if call.cached:
        return "cached decoding (new_k/new_v) is not supported"
    if call.causal and not call.default_positions:
        return "causal masking needs the queries at positions 0 .. T-1"
    return None


def _unsupported_cudnn(call: Call) -> str | None:
    if call.backend != "cuda":
        return f"needs an NVIDIA GPU (backend is {call.backend})"
    if call.dtype not in CUDNN_DTYPES:
        return f"needs bfloat16 or float16 inputs, got {call.dtype.name}"
    if call.head_dim % 8 or call.head_dim > CUDNN_MAX_HEAD_DIM:
        return f"head dim {call.head_dim} is not a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}"
    return _unsupported_xla(call)


register("cudnn", functools.partial(dot_product_attention, implementation="cudnn"), _unsupported_cudnn)
register("xla", functools.partial(dot_product_attention, implementation="xla"), _unsupported_xla)
