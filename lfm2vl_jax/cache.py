"""The decoding cache: a pytree with one entry per layer kind, laid out like the params' `blocks`.

    blocks[segment][motif position] =
        conv layer:       (R, B, L-1, D)   the short convolution's last L-1 inputs
        attention layer:  {"k", "v"}: (R, B, S, K, H)   keys/values, S = the cache's capacity
    lengths: (B,) tokens held per row; row b's next token goes to position lengths[b]

Rows are independent: each attends to its own first `lengths[b]` keys, so a ragged batch needs no
left-padding and padding never enters the cache.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from .config import CONV, TextConfig


@flax.struct.dataclass
class Cache:
    blocks: list
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return cache_capacity(self.blocks)


def cache_capacity(blocks: list) -> int:
    for segment in blocks:
        for entry in segment:
            if isinstance(entry, dict):
                return entry["k"].shape[2]
    return 0


def cache_shapes(cfg: TextConfig, batch: int, max_len: int) -> list:
    """Shapes of `Cache.blocks` (tuples), for allocation and sharding."""
    d, k, h = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    blocks = []
    for segment in cfg.segments:
        r = segment.repeats
        blocks.append(
            [
                (r, batch, cfg.conv_kernel_size - 1, d)
                if kind == CONV
                else {"k": (r, batch, max_len, k, h), "v": (r, batch, max_len, k, h)}
                for kind in segment.motif
            ]
        )
    return blocks


# Logical axes of cache entries, mapped to mesh axes by the same rules as the params.
CONV_STATE_AXES = ("layers", "batch", None, "conv")
KV_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def cache_axes(cfg: TextConfig) -> list:
    return jax.tree.map(
        lambda shape: CONV_STATE_AXES if len(shape) == 4 else KV_AXES,
        cache_shapes(cfg, 1, 1),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype: Any) -> Cache:
    blocks = jax.tree.map(
        lambda shape: jnp.zeros(shape, dtype),
        cache_shapes(cfg, batch, max_len),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return Cache(blocks=blocks, lengths=jnp.zeros((batch,), jnp.int32))


def _write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache (R, B, S, ...) <- new (R, B, T, ...) at per-row offsets start (B,)."""

    def write_row(c: jax.Array, n: jax.Array, s: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=1)

    return jax.vmap(write_row, in_axes=(1, 1, 0), out_axes=1)(cache, new, start)


def append(cache: Cache, entries: list, num_new: jax.Array) -> Cache:
    """Folds the entries of a `text_forward` call into the cache: keys and values written at each row's
    current length, conv states replaced, lengths advanced by the row's number of valid new tokens."""
    blocks = []
    for seg_cache, seg_entries in zip(cache.blocks, entries, strict=True):
        new_seg = []
        for held, entry in zip(seg_cache, seg_entries, strict=True):
            if isinstance(held, dict):
                new_seg.append(
                    {name: _write_rows(held[name], entry[name], cache.lengths) for name in ("k", "v")}
                )
            else:
                new_seg.append(entry.astype(held.dtype))
        blocks.append(new_seg)
    return Cache(blocks=blocks, lengths=cache.lengths + num_new.astype(jnp.int32))
