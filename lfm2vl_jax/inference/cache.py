"""The decoding cache: a pytree with one entry per layer, laid out like the params' text `blocks`
(stacked over a segment's repeats, or a list of per-layer entries, as the params are):

    conv layer:       (B, L-1, D)   the short convolution's last L-1 inputs
    attention layer:  {"k", "v"}: (B, K, S, H)   keys/values (head-major), S = the cache's capacity
    lengths: (B,) tokens held per row; row b's next token goes to position lengths[b]

Rows are independent: each attends to its own first `lengths[b]` keys, so a ragged batch needs no
left-padding and padding never enters the cache. The capacity S is static metadata of the cache; the
layout follows `config.runtime.scan_layers` and the dtype `config.runtime.dtypes.cache`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ..config import CONV, Lfm2VlConfig
from ..parallel.sharding import mesh_of

# Logical axes of one layer's cache entries, mapped to mesh axes by the same rules as the params.
CONV_STATE_AXES = ("batch", None, "conv")
KV_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class Cache:
    blocks: list
    lengths: jax.Array
    capacity: int = flax.struct.field(pytree_node=False)  # positions each row can hold


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def cache_layout(config: Lfm2VlConfig, batch: int, capacity: int) -> list:
    """Per layer entry: (shape, logical axes) pairs, in the layout of `Cache.blocks`."""
    cfg = config.text
    d, k, h = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    conv = ((batch, cfg.conv_kernel_size - 1, d), CONV_STATE_AXES)
    kv = ((batch, k, capacity, h), KV_AXES)

    def entry(kind: str, repeats: int) -> Any:
        one = conv if kind == CONV else {"k": kv, "v": kv}
        if not config.runtime.scan_layers:
            return [one] * repeats
        return jax.tree.map(lambda x: ((repeats, *x[0]), ("layers", *x[1])), one, is_leaf=is_layout)

    return [[entry(kind, seg.repeats) for kind in seg.motif] for seg in cfg.segments]


def is_layout(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and _is_shape(x[0])


def init_cache(config: Lfm2VlConfig, batch: int, capacity: int) -> Cache:
    dtype = config.runtime.dtypes.cache
    blocks = jax.tree.map(
        lambda x: jnp.zeros(x[0], dtype), cache_layout(config, batch, capacity), is_leaf=is_layout
    )
    return Cache(blocks=blocks, lengths=jnp.zeros((batch,), jnp.int32), capacity=capacity)


def _write_rows(held: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """held (..., B, K, S, H) <- new (..., B, K, T, H) at per-row sequence offsets start (B,).

    Every vmap maps axis 0 (the stacked layers', then the batch's): mapping the batch axis in place behind
    the stacked one made XLA transpose, i.e. copy, the whole stacked cache on every step."""

    def write_row(c: jax.Array, n: jax.Array, s: jax.Array) -> jax.Array:  # c: (K, S, H)
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=1)

    write = jax.vmap(write_row)
    for _ in range(held.ndim - 4):  # stacked layer axes
        write = jax.vmap(write, in_axes=(0, 0, None))
    return write(held, new, start)


def append(cache: Cache, entries: list, num_new: jax.Array, after: jax.Array | None = None) -> Cache:
    """Folds the entries of a `text_forward` call into the cache: keys and values written at each row's
    current length, conv states replaced, lengths advanced by each row's number of valid new tokens.
    The caller keeps lengths + new tokens within the capacity (a write past it would be clamped).

    `after` (B, ...): a value computed from every read of the old cache (e.g. the forward pass's output).
    Each row's writes are made to depend on that row of it, which lets XLA update the (donated) cache in
    place; without a data dependency it copies every cache buffer each step (twice, on the CPU) to protect
    reads it cannot prove happen first. (An optimization barrier does not establish that order; a data
    dependency does.) The dependency is per row, so that nothing in one row (a NaN, say) reaches another.
    """
    factor = None
    if after is not None:
        probe = after.reshape(after.shape[0], -1)[:, 0]
        factor = (probe == probe).astype(jnp.float32)  # (B,) 1, unless that row's output is NaN anyway

    def by_row(entry: jax.Array, batch_axis_from_end: int) -> jax.Array:
        if factor is None:
            return entry
        shape = [1] * entry.ndim
        shape[entry.ndim - batch_axis_from_end] = factor.shape[0]
        return entry * factor.reshape(shape).astype(entry.dtype)

    def fold(held: Any, entry: Any) -> Any:
        if isinstance(held, list):
            return [fold(h, e) for h, e in zip(held, entry, strict=True)]
        if isinstance(held, dict):  # keys, values (..., B, K, T, H)
            return {
                name: _write_rows(held[name], by_row(entry[name], 4), cache.lengths) for name in ("k", "v")
            }
        return by_row(entry, 3).astype(held.dtype)  # conv state (..., B, L-1, D)

    return cache.replace(
        blocks=fold(cache.blocks, entries), lengths=cache.lengths + num_new.astype(jnp.int32)
    )


def cache_shardings(config: Lfm2VlConfig, batch: int, capacity: int) -> Any:
    """A `NamedSharding` per cache leaf (`cache_layout`), by the logical sharding rules."""
    mesh, rules = mesh_of(config), config.runtime.rules
    return jax.tree.map(
        lambda x: rules.sharding(mesh, x[0], x[1], "cache"),
        cache_layout(config, batch, capacity),
        is_leaf=is_layout,
    )
