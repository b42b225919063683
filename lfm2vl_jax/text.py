"""LFM2 hybrid text tower: gated short-convolution blocks and GQA attention blocks, each followed by a
SwiGLU MLP, pre-RMSNorm residuals, a final `embedding_norm`, and the LM head.

The irregular layer pattern runs as a few `lax.scan`s, one per `Segment` of repeated motifs (see
`config.plan_segments`): the traced program holds each motif once, whatever the depth, with no per-layer
`lax.cond`. With unstacked weights (`scan_layers=False`) the same segments run as a Python loop instead.

One function, `text_forward`, serves the plain forward pass (no cache), prefill (no cache; the per-layer
entries it returns fill a fresh cache) and cached decoding of one or more new tokens per row.

Axis legend: B batch, T new positions, S cached positions, D width, N query heads, K kv heads,
H head dim, F MLP width, L conv kernel width, R repeats of a motif (stacked layers).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .attention import attention
from .cache import Cache
from .config import CONV, TextConfig
from .layers import apply_rope, rms_norm
from .params import Params


class StepContext(NamedTuple):
    """What every layer of one forward call needs besides its weights and hidden state."""

    positions: jax.Array  # (B, T) rotary positions of the new tokens
    token_mask: jax.Array  # (B, T) bool, False on padding
    num_new: jax.Array  # (B,) valid new tokens per row (rows are right-padded)
    self_mask: jax.Array  # (B, T, T) new tokens attending to new tokens: causal and not padding
    cache_mask: jax.Array | None  # (B, T, S) new tokens attending to cached ones, or None without a cache


def mlp(p: Params, x: jax.Array) -> jax.Array:
    gate = jnp.einsum("btd,df->btf", x, p["gate"])
    up = jnp.einsum("btd,df->btf", x, p["up"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down"])


def short_conv(
    p: Params, x: jax.Array, ctx: StepContext, state: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Gated short convolution. x: (B, T, D) normed input; state: (B, L-1, D) the convolution's last
    inputs before these tokens (None: sequence start, i.e. zeros).

    Returns the output and the new state: the last L-1 convolution inputs up to each row's last valid token.
    """
    x = x * ctx.token_mask[..., None].astype(x.dtype)  # padding must not leak into the recurrent state
    bcx = jnp.einsum("btd,dce->btce", x, p["in_proj"])
    if "in_proj_bias" in p:
        bcx = bcx + p["in_proj_bias"]
    input_gate, output_gate, value = bcx[:, :, 0], bcx[:, :, 1], bcx[:, :, 2]  # the reference's B, C, x
    gated = input_gate * value

    kernel = p["kernel"]  # (L, D)
    history = kernel.shape[0] - 1
    if state is None:
        state = jnp.zeros((gated.shape[0], history, gated.shape[2]), gated.dtype)
    window = jnp.concatenate([state.astype(gated.dtype), gated], axis=1)  # (B, L-1+T, D)
    seq_len = gated.shape[1]
    # Causal depthwise convolution: output t sees inputs t-L+1 .. t, i.e. window[t : t + L].
    conv = sum(
        window[:, i : i + seq_len].astype(jnp.float32) * kernel[i].astype(jnp.float32)
        for i in range(history + 1)
    )
    if "kernel_bias" in p:
        conv = conv + p["kernel_bias"]
    y = jnp.einsum("btd,de->bte", output_gate * conv.astype(output_gate.dtype), p["out_proj"])
    if "out_proj_bias" in p:
        y = y + p["out_proj_bias"]

    take = ctx.num_new[:, None] + jnp.arange(history)[None, :]  # window rows just before position num_new
    new_state = jnp.take_along_axis(window, take[..., None], axis=1)
    return y, new_state


def attention_block(
    p: Params, x: jax.Array, ctx: StepContext, cached: dict[str, jax.Array] | None, cfg: TextConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GQA attention with per-head RMSNorm on queries and keys before NeoX RoPE.

    `cached`: {"k", "v"} (B, K, S, H) of earlier tokens, or None. Returns the output and this call's
    keys and values (B, K, T, H), which the caller writes into the cache.
    """
    q = rms_norm(jnp.einsum("btd,dnh->btnh", x, p["q"]), p["q_norm"], cfg.norm_eps)
    k = rms_norm(jnp.einsum("btd,dkh->btkh", x, p["k"]), p["k_norm"], cfg.norm_eps)
    q = apply_rope(q, ctx.positions, cfg.rope_theta)
    k = jnp.swapaxes(apply_rope(k, ctx.positions, cfg.rope_theta), 1, 2)  # head-major, as cached
    v = jnp.einsum("btd,dkh->bkth", x, p["v"])
    blocks = [(k, v, ctx.self_mask)]
    if cached is not None:
        blocks.insert(0, (cached["k"], cached["v"], ctx.cache_mask))
    out = attention(q, blocks)
    return jnp.einsum("btnh,nhd->btd", out, p["o"]), {"k": k, "v": v}


def decoder_layer(
    kind: str, p: Params, h: jax.Array, ctx: StepContext, cached: Any, cfg: TextConfig
) -> tuple[jax.Array, Any]:
    x = rms_norm(h, p["operator_norm"]["scale"], cfg.norm_eps)
    if kind == CONV:
        y, entry = short_conv(p["conv"], x, ctx, cached)
    else:
        y, entry = attention_block(p["attn"], x, ctx, cached, cfg)
    h = h + y
    return h + mlp(p["mlp"], rms_norm(h, p["ffn_norm"]["scale"], cfg.norm_eps)), entry


def run_layers(
    blocks: list, h: jax.Array, ctx: StepContext, cache_blocks: list | None, cfg: TextConfig
) -> tuple[jax.Array, list]:
    """Runs every segment of the layer plan. Returns the hidden state and each layer's new cache entry
    (conv: state (B, L-1, D); attention: k, v), in the layout of the params' blocks: stacked over a
    segment's repeats when its weights are stacked (one `lax.scan`), else a list over repeats (a Python
    loop over unstacked weights, which reads each weight in place instead of slicing a stack)."""
    entries = []
    for s, segment in enumerate(cfg.segments):
        seg_params = blocks[s]
        seg_cache = None if cache_blocks is None else cache_blocks[s]

        def motif_body(
            h: jax.Array, xs: tuple, motif: tuple[str, ...] = segment.motif
        ) -> tuple[jax.Array, list]:
            layer_params, layer_cache = xs
            new = []
            for i, kind in enumerate(motif):
                cached = None if layer_cache is None else layer_cache[i]
                h, entry = decoder_layer(kind, layer_params[i], h, ctx, cached, cfg)
                new.append(entry)
            return h, new

        if not isinstance(seg_params[0], list):
            h, seg_entries = jax.lax.scan(motif_body, h, (seg_params, seg_cache))
        else:
            per_repeat = []
            for r in range(segment.repeats):
                layer_cache = None if seg_cache is None else [position[r] for position in seg_cache]
                h, new = motif_body(h, ([position[r] for position in seg_params], layer_cache))
                per_repeat.append(new)
            seg_entries = [list(position) for position in zip(*per_repeat, strict=True)]
        entries.append(seg_entries)
    return h, entries


def embed_tokens(params: Params, input_ids: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], input_ids, axis=0)


def text_forward(
    params: Params,
    cfg: TextConfig,
    embeds: jax.Array,
    token_mask: jax.Array,
    cache: Cache | None = None,
) -> tuple[jax.Array, list]:
    """Runs the text tower over new positions (B, T, D), right-padded per `token_mask`.

    Without a cache, positions start at 0 (the reference's plain forward). With one, row b's new tokens
    sit at positions `cache.lengths[b]` onwards and also attend to the first `cache.lengths[b]` cached
    keys. Returns the final-normed hidden states and the new cache entries (see `run_layers`), which
    `cache.append` folds into a cache.
    """
    batch, seq_len = token_mask.shape
    token_mask = token_mask.astype(bool)
    offsets = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
    positions = offsets[:, None] + jnp.arange(seq_len)[None, :]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    cache_mask = None
    if cache is not None:
        held = jnp.arange(cache.capacity)[None, :] < offsets[:, None]
        cache_mask = jnp.broadcast_to(held[:, None, :], (batch, seq_len, cache.capacity))
    ctx = StepContext(
        positions=positions,
        token_mask=token_mask,
        num_new=token_mask.sum(axis=1).astype(jnp.int32),
        self_mask=causal[None] & token_mask[:, None, :],
        cache_mask=cache_mask,
    )
    cache_blocks = None if cache is None else cache.blocks
    h, entries = run_layers(params["blocks"], embeds, ctx, cache_blocks, cfg)
    return rms_norm(h, params["final_norm"]["scale"], cfg.norm_eps), entries


def lm_logits(params: Params, h: jax.Array) -> jax.Array:
    """Logits in float32; the head is the embedding matrix unless the checkpoint unties it."""
    if "lm_head" in params:
        return jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
