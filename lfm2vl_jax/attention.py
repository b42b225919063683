"""Scaled dot-product attention: the one place where attention math lives (vision and text towers,
prefill and cached decode).

Axis legend for the einsum strings:
    B batch            T query positions     S key positions
    K key/value heads  G query heads per key/value head (grouped-query attention; N = K * G)
    H head dim

Keys may come in several blocks that share one softmax, e.g. the cache and the token being decoded: the
scores of the blocks are concatenated (cheap), never the keys and values themselves (a copy of the cache).
Scores and softmax are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Key block: keys (B, K, S, H), values (B, K, S, H), mask (B, T, S) - True where the query may attend.
# Keys and values are head-major so that both products read them in place (the cache is stored so).
KeyBlock = tuple[jax.Array, jax.Array, jax.Array]


def attention(q: jax.Array, key_blocks: Sequence[KeyBlock]) -> jax.Array:
    """q: (B, T, N, H) -> (B, T, N, H), attending jointly over all key blocks."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = key_blocks[0][0].shape[1]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scale = head_dim**-0.5

    scores = []
    for keys, _, mask in key_blocks:
        s = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32) * scale
        scores.append(jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)

    out = jnp.zeros(q.shape, jnp.float32)
    start = 0
    for keys, values, _ in key_blocks:
        block_probs = probs[..., start : start + keys.shape[2]].astype(values.dtype)
        out += jnp.einsum("bkgts,bksh->btkgh", block_probs, values, preferred_element_type=jnp.float32)
        start += keys.shape[2]
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
