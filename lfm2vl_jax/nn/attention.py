"""Scaled dot-product attention: the one entry point every caller uses (vision tower, text prefill, cached
decode, training), and the reference implementation that kernels are tested against.

Callers describe *which keys each query may see* by positions and lengths, never by a dense mask, so that a
kernel can generate the mask blockwise:

- key `s` of `k`/`v` sits at position `s`; keys at `s >= kv_lengths[b]` are padding;
- with `causal`, query `t` of row b (at position `q_positions[b, t]`, default `t`) sees keys at positions
  `<= q_positions[b, t]`;
- `new_k`/`new_v` (cached decoding): the keys and values of the query tokens themselves, at the queries'
  positions, appended after the valid keys of `k`/`v` (the cache) and seen causally. They share the
  softmax with the cache but are never concatenated to it (that would copy the cache every step).

Which implementation runs is `kernels.choose`'s decision (see `kernels/`): "auto" picks from the backend,
dtype and shapes (cuDNN's fused kernel on GPUs in bf16/fp16, the blockwise kernel where the reference's
score matrix would be large, the reference otherwise); a name forces one.

Axis legend for the einsum strings:
    B batch            T query positions     S key positions
    K key/value heads  G query heads per key/value head (grouped-query attention; N = K * G)
    H head dim

Keys and values are head-major, (B, K, S, H), as the cache stores them, so both products read them in place.
Scores and softmax are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import kernels


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    causal: bool = False,
    new_k: jax.Array | None = None,
    new_v: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """q: (B, T, N, H); k, v: (B, K, S, H); kv_lengths: (B,) (None: all S keys valid); q_positions:
    (B, T) (None: 0 .. T-1); new_k, new_v: (B, K, T, H) or None. Returns (B, T, N, H) in q's dtype."""
    batch, q_len, num_heads, head_dim = q.shape
    call = kernels.Call(
        backend=kernels.backend(),
        dtype=jnp.dtype(q.dtype),
        batch=batch,
        q_len=q_len,
        kv_len=k.shape[2],
        num_heads=num_heads,
        num_kv_heads=k.shape[1],
        head_dim=head_dim,
        causal=causal,
        cached=new_k is not None,
        default_positions=q_positions is None,
    )
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), k.shape[2], jnp.int32)
    arguments = dict(kv_lengths=kv_lengths, q_positions=q_positions, causal=causal, new_k=new_k, new_v=new_v)
    name = kernels.choose(implementation, call)
    try:
        return _implementation(name)(q, k, v, **arguments)
    except kernels.KernelUnavailableError as err:  # raised while tracing: e.g. no usable cuDNN
        if implementation != "auto":
            raise
        fallback = kernels.choose(implementation, call, exclude=(name,))
        warnings.warn(f"{err}; attention uses {fallback!r} instead", stacklevel=2)
        return _implementation(fallback)(q, k, v, **arguments)


def _implementation(name: str) -> Callable[..., jax.Array]:
    return reference_attention if name == "reference" else kernels.get(name)


def visible(
    q_positions: jax.Array, kv_lengths: jax.Array, key_positions: jax.Array, causal: bool
) -> jax.Array:
    """(B, T, S) True where query t may see the key at `key_positions` (S,) of the main key block."""
    valid = key_positions[None, None, :] < kv_lengths[:, None, None]
    if causal:
        valid = valid & (key_positions[None, None, :] <= q_positions[:, :, None])
    return valid


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array,
    q_positions: jax.Array,
    causal: bool,
    new_k: jax.Array | None,
    new_v: jax.Array | None,
) -> jax.Array:
    """Materialises the (B, K, G, T, S) scores: exact, simple, O(T * S) memory. The test oracle, and the
    fastest path for short inputs and decoding.

    One softmax over the key blocks (cache, then the new tokens) without concatenating them: each block's
    scores against the common maximum, the sum over all blocks. The products keep their operands' natural
    order ("bkgts,bksh->bkgth"), which lets XLA read the cache's values in place (asking for the output as
    "btkgh" made the CPU compiler transpose the whole value cache every decoding step).
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scale = head_dim**-0.5
    masked = jnp.finfo(jnp.float32).min  # not -inf: a row that sees nothing stays finite (uniform)

    blocks = [(k, v, visible(q_positions, kv_lengths, jnp.arange(k.shape[2]), causal))]
    if new_k is not None:
        own = jnp.arange(q_len)
        blocks.append(
            (new_k, new_v, jnp.broadcast_to(own[None, None, :] <= own[None, :, None], (batch, q_len, q_len)))
        )

    scores = []
    for keys, _, mask in blocks:
        s = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32) * scale
        scores.append(jnp.where(mask[:, None, None], s, masked))
    peak = jnp.max(jnp.stack([s.max(axis=-1) for s in scores]), axis=0)[..., None]  # (B, K, G, T, 1)
    weights = [jnp.exp(s - peak) for s in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)

    out = sum(
        jnp.einsum(
            "bkgts,bksh->bkgth", (w / total).astype(values.dtype), values, preferred_element_type=jnp.float32
        )
        for w, (_, values, _) in zip(weights, blocks, strict=True)
    )
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
