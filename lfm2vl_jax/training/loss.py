"""The fine-tuning loss: token cross-entropy over the LM head, computed in chunks of tokens so that the
float32 logits of all tokens never exist at once (16 rows x 2,048 tokens x 65,536 vocab would be 8.6 GB).

Each chunk's logits are rematerialised in the backward pass (`jax.checkpoint`), so forward and backward
hold one chunk's (rows, chunk, vocab) float32 logits at a time. Loss positions are moved to the front of
each row first (a stable per-row sort), so chunks past the longest row's loss positions hold none and are
skipped (`lax.cond`): the LM head runs on little more than the loss tokens (image and prompt tokens are
usually most of a VLM conversation).

Axis legend: B rows, S positions, C positions per chunk, N chunks, D width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..nn.layers import cast
from ..nn.params import Params
from ..nn.text import lm_logits

DEFAULT_CHUNK_TOKENS = 2048


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What position t predicts: the token at t+1, weighted by whether that token is a loss token (the
    last position predicts nothing). As transformers shifts `labels` in its causal-LM loss."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, weights.astype(bool)


def _chunk_loss(head: Params, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Summed cross-entropy of one chunk: hidden (B, C, D), targets and weights (B, C)."""
    logits = lm_logits(head, hidden)  # (B, C, V) float32
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit by comparison, not a gather: it stays local when the vocabulary is sharded.
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    return jnp.sum(jnp.where(weights, log_normalizer - target_logit, 0.0))


def cross_entropy_sum(
    text_params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> jax.Array:
    """Sum over positions with `weights` of -log p(target | hidden), float32 (a scalar).

    hidden: (B, S, D) final-normed hidden states; targets (B, S) int; weights (B, S) bool.
    chunk_tokens: positions per chunk over all B rows (a chunk is B x chunk_tokens // B positions).
    """
    batch, length = hidden.shape[:2]
    order = jnp.argsort(~weights, axis=1, stable=True)  # loss positions first, in their order
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets = jnp.take_along_axis(targets, order, axis=1)
    weights = jnp.take_along_axis(weights, order, axis=1)

    chunk = max(1, min(length, chunk_tokens // batch))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def by_chunk(x: jax.Array) -> jax.Array:  # (B, N*C, ...) -> (N, B, C, ...)
        return jnp.swapaxes(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 0, 1)

    # The LM head alone (tied: the embedding), cast once to the hidden states' dtype.
    head = cast({k: text_params[k] for k in ("embed", "lm_head") if k in text_params}, hidden.dtype)
    chunk_loss = jax.checkpoint(_chunk_loss)

    def body(total: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        h, t, w = xs
        loss = jax.lax.cond(jnp.any(w), lambda: chunk_loss(head, h, t, w), lambda: jnp.zeros((), jnp.float32))
        return total + loss, None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (by_chunk(hidden), by_chunk(targets), by_chunk(weights))
    )
    return total
