"""Blockwise ("flash") attention in pure JAX: queries in blocks of `block_q`, keys in blocks of `block_k`,
an online softmax (running maximum, running sum, rescaled accumulator) across key blocks. Memory is
O(T x block) instead of the reference's O(T x S) scores, so prompts of 32k tokens fit, and causal masking
skips the key blocks no query of a block can see (half the work of a causal prefill).

Differentiable through a custom VJP (FlashAttention-2's backward): the forward pass saves only its output
and the per-query log-sum-exp; the backward pass recomputes each block's probabilities from them, so
training memory is O(T x block) too.

Masks are "prefix" masks, which covers every call the entry point makes: for each key source (the cache
or the sequence itself, then the new tokens when decoding with a cache) query t of row b sees the source's
keys s < limit[b, t]:
    main keys:  limit = kv_lengths[b], and with `causal` at most q_positions[b, t] + 1;
    new keys:   limit = t + 1 (the queries' own keys, causally).
A query block therefore needs only the key blocks below the largest limit among its queries.

Axis legend: B batch, T queries, S keys, K kv heads, G query heads per kv head, H head dim,
q/s a query/key position inside a block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .registry import Call, register

# (query block, key block) per backend. On the CPU a block's (heads x 256 x 256) float32 scores stay in
# cache, and 256 measured fastest among 128-512 at the text and vision towers' shapes (see
# benchmarks/bench_attention.py); accelerators want fewer, larger blocks.
BLOCKS = {"cpu": (256, 256)}
DEFAULT_BLOCKS = (512, 512)
# Backends that attend one batch row at a time, so that a block's scores stay that small whatever the
# batch (six 1024-patch images at once: 1.45x faster per row on the CPU). Accelerators want the whole batch
# in each block for parallelism.
ROW_BY_ROW = {"cpu"}


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array,
    q_positions: jax.Array,
    causal: bool,
    new_k: jax.Array | None,
    new_v: jax.Array | None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """The entry point's arguments (see `nn.attention.attention`); returns (B, T, N, H) in q's dtype.
    Block sizes default to the backend's (`BLOCKS`)."""
    default_q, default_k = BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS)
    batch, q_len = q.shape[:2]
    limits = jnp.broadcast_to(kv_lengths.astype(jnp.int32)[:, None], (batch, q_len))
    if causal:
        limits = jnp.minimum(limits, q_positions.astype(jnp.int32) + 1)
    sources = [(k, v, limits)]
    if new_k is not None:
        sources.append(
            (new_k, new_v, jnp.broadcast_to(jnp.arange(1, q_len + 1, dtype=jnp.int32), limits.shape))
        )
    block_q, block_k = _balanced(q_len, block_q or default_q), block_k or default_k
    if batch > 1 and jax.default_backend() in ROW_BY_ROW:

        def one_row(row: tuple) -> jax.Array:
            q_row, row_sources = jax.tree.map(lambda x: x[None], row)
            return _flash(q_row, row_sources, block_q, block_k)[0]

        return jax.lax.map(one_row, (q, tuple(sources)))
    return _flash(q, tuple(sources), block_q, block_k)


def _balanced(length: int, block: int) -> int:
    """The block size, at most `block`, that splits `length` into as few blocks as `block` does with the
    least padding (a multiple of 8): 320 queries in blocks of 256 become two blocks of 160, not 256 + 64
    computed as 256 + 256."""
    if length <= block:
        return length
    blocks = -(-length // block)
    size = -(-length // blocks)
    return min(block, -(-size // 8) * 8)


def _precision(dtype: jnp.dtype) -> jax.lax.Precision | None:
    """float32 products in float32 (the backward pass is traced outside the model's precision scope)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _pad(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    missing = -x.shape[axis] % multiple
    if not missing:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return jnp.pad(x, widths)


def _query_blocks(x: jax.Array, block_q: int) -> jax.Array:
    """(B, T, ...) -> (nq, B, block_q, ...), zero-padded."""
    x = _pad(x, 1, block_q)
    x = x.reshape(x.shape[0], -1, block_q, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _head_major_blocks(x: jax.Array, num_kv_heads: int, block_q: int) -> jax.Array:
    """(B, T, N, H) -> (nq, B, K, G, block_q, H): transposed once per call, so that every block's products
    read their operands in place."""
    batch, q_len, num_heads, head_dim = x.shape
    x = _query_blocks(x.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim), block_q)
    return x.transpose(0, 1, 3, 4, 2, 5)


def _from_head_major_blocks(x: jax.Array, q_len: int) -> jax.Array:
    """(nq, B, K, G, block_q, H) -> (B, T, N, H)."""
    _, batch, num_kv_heads, groups, _, head_dim = x.shape
    x = x.transpose(1, 0, 4, 2, 3, 5).reshape(batch, -1, num_kv_heads * groups, head_dim)
    return x[:, :q_len]


class Source(NamedTuple):
    """One key source, padded to whole key blocks."""

    keys: jax.Array  # (B, K, nk * bk, H)
    values: jax.Array
    limits: jax.Array  # (nq, B, bq) int32: keys s < limit visible (0 for padding queries)
    visible_blocks: jax.Array  # (nq,) int32: key blocks holding a key some query of the block sees
    block_k: int


def _source(keys: jax.Array, values: jax.Array, limits: jax.Array, block_q: int, block_k: int) -> Source:
    block_k = _balanced(keys.shape[2], block_k)
    blocks = _query_blocks(limits, block_q)
    visible = -(-blocks.max(axis=(1, 2)) // block_k)
    return Source(_pad(keys, 2, block_k), _pad(values, 2, block_k), blocks, visible, block_k)


def _key_block(source: Source, j: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys, values (B, K, bk, H) of block j and the keys' indices (bk,)."""
    start = j * source.block_k
    keys = jax.lax.dynamic_slice_in_dim(source.keys, start, source.block_k, axis=2)
    values = jax.lax.dynamic_slice_in_dim(source.values, start, source.block_k, axis=2)
    return keys, values, start + jnp.arange(source.block_k)


def _scores(
    qi: jax.Array, keys: jax.Array, index: jax.Array, limits: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scaled scores (B, K, G, q, s) in float32 and the mask (B, 1, 1, q, s) of visible keys."""
    s = jnp.einsum(
        "bkgqh,bksh->bkgqs", qi, keys, preferred_element_type=jnp.float32, precision=_precision(qi.dtype)
    )
    mask = index[None, None, :] < limits[:, :, None]
    return s * qi.shape[-1] ** -0.5, mask[:, None, None]


def _forward(q: jax.Array, sources: tuple, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = sources[0][0].shape[1]
    groups = num_heads // num_kv_heads
    prepared = [_source(*s, block_q, block_k) for s in sources]
    q_blocks = _head_major_blocks(q, num_kv_heads, block_q)
    precision = _precision(q.dtype)

    def query_block(xs: tuple) -> tuple[jax.Array, jax.Array]:
        qi, limits, visible = xs
        peak = jnp.full((batch, num_kv_heads, groups, block_q), -jnp.inf, jnp.float32)
        total = jnp.zeros_like(peak)
        acc = jnp.zeros((*peak.shape, head_dim), jnp.float32)
        for source, limit, count in zip(prepared, limits, visible, strict=True):

            def key_block(
                j: jax.Array, carry: tuple, source: Source = source, limit: jax.Array = limit
            ) -> tuple:
                peak, total, acc = carry
                keys, values, index = _key_block(source, j)
                s, mask = _scores(qi, keys, index, limit)
                s = jnp.where(mask, s, -jnp.inf)
                new_peak = jnp.maximum(peak, s.max(axis=-1))
                safe = jnp.where(new_peak == -jnp.inf, 0.0, new_peak)  # nothing seen yet: no NaN
                p = jnp.exp(s - safe[..., None])
                rescale = jnp.exp(peak - safe)
                pv = jnp.einsum(
                    "bkgqs,bksh->bkgqh",
                    p.astype(values.dtype),
                    values,
                    preferred_element_type=jnp.float32,
                    precision=precision,
                )
                return new_peak, total * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv

            peak, total, acc = jax.lax.fori_loop(0, count, key_block, (peak, total, acc))
        seen = total > 0  # False only for padding queries (and rows that see no key at all)
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        return out, jnp.where(seen, peak + jnp.log(jnp.where(seen, total, 1.0)), 0.0)

    xs = (q_blocks, [s.limits for s in prepared], [s.visible_blocks for s in prepared])
    outs, lse = jax.lax.map(query_block, xs)  # (nq, B, K, G, q, H), (nq, B, K, G, q)
    return _from_head_major_blocks(outs, q_len).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _flash(q: jax.Array, sources: tuple, block_q: int, block_k: int) -> jax.Array:
    return _forward(q, sources, block_q, block_k)[0]


def _flash_fwd(q: jax.Array, sources: tuple, block_q: int, block_k: int) -> tuple:
    out, lse = _forward(q, sources, block_q, block_k)
    return out, (q, sources, out, lse)


def _flash_bwd(block_q: int, block_k: int, residuals: tuple, d_out: jax.Array) -> tuple:
    q, sources, out, lse = residuals
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = sources[0][0].shape[1]
    precision = _precision(q.dtype)
    prepared = [_source(*s, block_q, block_k) for s in sources]
    q_blocks = _head_major_blocks(q, num_kv_heads, block_q)
    do_blocks = _head_major_blocks(d_out, num_kv_heads, block_q)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    delta_blocks = _head_major_blocks(delta, num_kv_heads, block_q)[..., 0]  # (nq, B, K, G, q), as lse

    def grads(i: jax.Array, source: Source, j: jax.Array) -> tuple:
        """Block (i, j)'s probabilities p and score gradients ds (B, K, G, q, s), with its inputs."""
        keys, values, index = _key_block(source, j)
        qi, doi = q_blocks[i], do_blocks[i]
        s, mask = _scores(qi, keys, index, source.limits[i])
        p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
        dp = jnp.einsum(
            "bkgqh,bksh->bkgqs", doi, values, preferred_element_type=jnp.float32, precision=precision
        )
        ds = p * (dp - delta_blocks[i][..., None]) * head_dim**-0.5
        return p, ds, qi, doi, keys

    def dq_block(i: jax.Array) -> jax.Array:
        dq = jnp.zeros(q_blocks.shape[1:], jnp.float32)
        for source in prepared:

            def key_block(j: jax.Array, dq: jax.Array, source: Source = source) -> jax.Array:
                _, ds, _, _, keys = grads(i, source, j)
                return dq + jnp.einsum(
                    "bkgqs,bksh->bkgqh",
                    ds.astype(keys.dtype),
                    keys,
                    preferred_element_type=jnp.float32,
                    precision=precision,
                )

            dq = jax.lax.fori_loop(0, source.visible_blocks[i], key_block, dq)
        return dq

    num_q_blocks = q_blocks.shape[0]
    dq = jax.lax.map(dq_block, jnp.arange(num_q_blocks))  # (nq, B, K, G, q, H)
    dq = _from_head_major_blocks(dq, q_len).astype(q.dtype)

    d_sources = []
    for (keys, values, _), source in zip(sources, prepared, strict=True):

        def kv_block(j: jax.Array, source: Source = source) -> tuple[jax.Array, jax.Array]:
            def query_block(i: jax.Array, carry: tuple) -> tuple:
                def accumulate(carry: tuple) -> tuple:
                    dk, dv = carry
                    p, ds, qi, doi, _ = grads(i, source, j)
                    dv = dv + jnp.einsum(
                        "bkgqs,bkgqh->bksh",
                        p.astype(doi.dtype),
                        doi,
                        preferred_element_type=jnp.float32,
                        precision=precision,
                    )
                    dk = dk + jnp.einsum(
                        "bkgqs,bkgqh->bksh",
                        ds.astype(qi.dtype),
                        qi,
                        preferred_element_type=jnp.float32,
                        precision=precision,
                    )
                    return dk, dv

                return jax.lax.cond(source.visible_blocks[i] > j, accumulate, lambda c: c, carry)

            zeros = jnp.zeros((batch, num_kv_heads, source.block_k, head_dim), jnp.float32)
            return jax.lax.fori_loop(0, num_q_blocks, query_block, (zeros, zeros))

        num_k_blocks = source.keys.shape[2] // source.block_k
        dk, dv = jax.lax.map(kv_block, jnp.arange(num_k_blocks))  # (nk, B, K, s, H)

        def unblock(x: jax.Array, like: jax.Array) -> jax.Array:
            x = jnp.moveaxis(x, 0, 2).reshape(batch, num_kv_heads, -1, head_dim)
            return x[:, :, : like.shape[2]].astype(like.dtype)

        d_sources.append((unblock(dk, keys), unblock(dv, values), None))
    return dq, tuple(d_sources)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _unsupported(call: Call) -> str | None:
    return None  # any backend, dtype, shape and mask


register("blockwise", blockwise_attention, _unsupported)
