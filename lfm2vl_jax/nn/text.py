"""LFM2 hybrid text tower: gated short-convolution blocks and GQA attention blocks, each followed by a
SwiGLU MLP, pre-RMSNorm residuals, a final `embedding_norm`, and the LM head.

The irregular layer pattern runs as a few `lax.scan`s, one per `Segment` of repeated motifs (see
`config.plan_segments`): the traced program holds each motif once, whatever the depth, with no per-layer
`lax.cond`. With unstacked weights (`RuntimeConfig.scan_layers=False`) the same segments run as a Python
loop instead.

One function, `text_forward`, serves the plain forward pass (no cache), prefill (no cache; the per-layer
entries it returns fill a fresh cache), training, and cached decoding of one or more new tokens per row.

Axis legend: B batch, T new positions, S cached positions, D width, N query heads, K kv heads,
H head dim, F MLP width, R repeats of a motif (stacked layers), G query heads per KV head, C the fused
gate/up pair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ..config import CONV, RuntimeConfig, TextConfig
from ..parallel.sharding import constrain
from .attention import attention
from .layers import apply_rope, cast, matmul_precision, merge_input_axes, project, remat, rms_norm
from .params import Params
from .quant import QuantizedWeight, quantized_einsum, take_rows
from .short_conv import gated_short_conv

RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")


class StepContext(NamedTuple):
    """What every layer of one forward call needs besides its weights and hidden state."""

    positions: jax.Array  # (B, T) rotary positions of the new tokens
    token_mask: jax.Array  # (B, T) bool, False on padding
    num_new: jax.Array  # (B,) where each row's tokens end: the conv state is taken just before it
    cached_lengths: jax.Array | None  # (B,) tokens already in the cache, or None without a cache
    # Masks with padding before or between a row's tokens (no cache): the order that moves each row's
    # valid keys first (B, T), and per query the last of those it sees, causally (B, T). None: rows are
    # right-padded and query t sees keys 0 .. t.
    key_order: jax.Array | None = None
    key_limit: jax.Array | None = None


def any_mask_context(token_mask: jax.Array, positions: jax.Array) -> StepContext:
    """The context of a cache-free call whose mask may hold zeros anywhere (left padding, holes), as
    transformers' forward honours them: a masked token is no key for any query and feeds zeros into the
    short convolutions, while every query keeps its own position. Keys are gathered valid-first, so that
    query t sees the first `cumsum(mask)[t]` of them: a causal prefix mask every attention kernel runs.
    Queries before a row's first token (their outputs are unspecified) see its first key, which keeps them
    finite."""
    index = jnp.arange(token_mask.shape[1], dtype=jnp.int32)
    return StepContext(
        positions=positions,
        token_mask=token_mask,
        num_new=jnp.max(jnp.where(token_mask, index + 1, 0), axis=1),
        cached_lengths=None,
        key_order=jnp.argsort(~token_mask, axis=1, stable=True).astype(jnp.int32),
        key_limit=jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0),
    )


def mlp(p: Params, x: jax.Array, fused: bool = False) -> jax.Array:
    if fused:  # one product; C indexes (gate, up)
        gate_up = project("btd,dcf->btcf", x, p["gate_up"])
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    else:
        gate = project("btd,df->btf", x, p["gate"])
        up = project("btd,df->btf", x, p["up"])
    return project("btf,fd->btd", jax.nn.silu(gate) * up, p["down"])


def attention_block(
    p: Params,
    x: jax.Array,
    ctx: StepContext,
    cached: dict[str, jax.Array] | None,
    cfg: TextConfig,
    runtime: RuntimeConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GQA attention with per-head RMSNorm on queries and keys before NeoX RoPE.

    `cached`: {"k", "v"} (B, K, S, H) of earlier tokens, or None. Returns the output and this call's
    keys and values (B, K, T, H), which the caller writes into the cache. Each projection is computed in
    its natural order and transposed after (a small activation) rather than asking for head-major output
    from the einsum, which made XLA transpose the weight instead, at every decoding step.
    """
    if runtime.fused_projections:  # one product; G+2 indexes a KV head's G query heads, its key, its value
        qkv = project("btd,dkgh->btkgh", x, p["qkv"])
        groups = qkv.shape[3] - 2
        q, k, v = (
            qkv[:, :, :, :groups].reshape(*x.shape[:2], -1, qkv.shape[-1]),
            qkv[..., -2, :],
            qkv[..., -1, :],
        )
    else:
        q = project("btd,dnh->btnh", x, p["q"])
        k = project("btd,dkh->btkh", x, p["k"])
        v = project("btd,dkh->btkh", x, p["v"])
    q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = checkpoint_name(apply_rope(q, ctx.positions, cfg.rope_theta), "q")
    k = checkpoint_name(jnp.swapaxes(apply_rope(k, ctx.positions, cfg.rope_theta), 1, 2), "k")  # head-major
    v = checkpoint_name(jnp.swapaxes(v, 1, 2), "v")
    if ctx.key_order is not None:  # padding anywhere: valid keys first, each query sees a prefix of them
        order = ctx.key_order[:, None, :, None]
        k, v = jnp.take_along_axis(k, order, axis=2), jnp.take_along_axis(v, order, axis=2)
        num_valid = ctx.token_mask.sum(axis=1, dtype=jnp.int32)
        out = attention(
            q,
            k,
            v,
            kv_lengths=num_valid,
            q_positions=ctx.key_limit,
            causal=True,
            implementation=runtime.attention,
        )
    elif cached is None:  # queries at 0 .. T-1: the default, which lets kernels use a plain causal mask
        out = attention(q, k, v, kv_lengths=ctx.num_new, causal=True, implementation=runtime.attention)
    else:
        out = attention(
            q,
            cached["k"],
            cached["v"],
            kv_lengths=ctx.cached_lengths,
            q_positions=ctx.positions,
            causal=True,
            new_k=k,
            new_v=v,
            implementation=runtime.attention,
        )
    # One contraction axis (N*H): contracting (N, H) as two let XLA pick (H, N) and transpose the
    # weight at every call.
    o = merge_input_axes(p["o"], 2)
    return project("bte,ed->btd", out.reshape(*out.shape[:2], -1), o), {"k": k, "v": v}


def residual_layer(
    h: jax.Array,
    operator_norm: Callable[[jax.Array], jax.Array],
    operator: Callable[[jax.Array], tuple[jax.Array, Any]],
    ffn_norm: Callable[[jax.Array], jax.Array],
    feed_forward: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, Any]:
    """One LFM2 layer: pre-norm residuals around its operator (short conv or attention, returning its
    output and this call's cache entry) and its MLP. The functions here and the Flax modules
    (`nn.modules.DecoderLayer`) both run a layer through it."""
    y, entry = operator(operator_norm(h))
    h = h + y
    return h + feed_forward(ffn_norm(h)), entry


def decoder_layer(
    kind: str, p: Params, h: jax.Array, ctx: StepContext, cached: Any, cfg: TextConfig, runtime: RuntimeConfig
) -> tuple[jax.Array, Any]:
    p = cast(p, runtime.dtypes.compute)
    if kind == CONV:

        def operator(x: jax.Array) -> tuple[jax.Array, Any]:
            with jax.named_scope("short_conv"):
                return gated_short_conv(p["conv"], x, ctx.token_mask, ctx.num_new, cached)
    else:

        def operator(x: jax.Array) -> tuple[jax.Array, Any]:
            with jax.named_scope("attention"):
                return attention_block(p["attn"], x, ctx, cached, cfg, runtime)

    def feed_forward(x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return mlp(p["mlp"], x, runtime.fused_projections)

    h, entry = residual_layer(
        h,
        lambda x: rms_norm(x, p["operator_norm"]["scale"], cfg.norm_eps),
        operator,
        lambda x: rms_norm(x, p["ffn_norm"]["scale"], cfg.norm_eps),
        feed_forward,
    )
    return constrain(h, RESIDUAL_AXES, runtime), entry


def layer_order(per_position: list, scanned: bool) -> list[jax.Array]:
    """One segment's per-layer values in the checkpoint's layer order (repeat-major), from one value per
    motif position: stacked over repeats (scanned) or a list over repeats."""
    repeats = per_position[0].shape[0] if scanned else len(per_position[0])
    return [per_position[m][r] for r in range(repeats) for m in range(len(per_position))]


def run_layers(
    blocks: list,
    h: jax.Array,
    ctx: StepContext,
    cache_blocks: list | None,
    cfg: TextConfig,
    runtime: RuntimeConfig,
    collect: bool = False,
) -> tuple[jax.Array, list, list[jax.Array]]:
    """Runs every segment of the layer plan. Returns the hidden state, each layer's new cache entry
    (conv: state (B, L-1, D); attention: k, v), in the layout of the params' blocks: stacked over a
    segment's repeats when its weights are stacked (one `lax.scan`), else a list over repeats (a Python
    loop over unstacked weights, which reads each weight in place instead of slicing a stack); and with
    `collect` every layer's output hidden state, in layer order (else an empty list)."""
    entries, outputs = [], []
    for s, segment in enumerate(cfg.segments):
        seg_params = blocks[s]
        seg_cache = None if cache_blocks is None else cache_blocks[s]

        def motif_body(
            h: jax.Array, xs: tuple, motif: tuple[str, ...] = segment.motif
        ) -> tuple[jax.Array, tuple[list, list]]:
            layer_params, layer_cache = xs
            new, hidden = [], []
            for i, kind in enumerate(motif):
                cached = None if layer_cache is None else layer_cache[i]
                with jax.named_scope(f"{kind}_layer"):
                    h, entry = decoder_layer(kind, layer_params[i], h, ctx, cached, cfg, runtime)
                new.append(entry)
                hidden.append(h if collect else None)
            return h, (new, hidden)

        with jax.named_scope(f"segment_{s}"):
            if runtime.scan_layers:
                body = remat(motif_body, runtime.remat, in_scan=True)
                h, (seg_entries, seg_hidden) = jax.lax.scan(body, h, (seg_params, seg_cache))
            else:
                body = remat(motif_body, runtime.remat, in_scan=False)
                per_repeat = []
                for r in range(segment.repeats):
                    layer_cache = None if seg_cache is None else [position[r] for position in seg_cache]
                    h, new = body(h, ([position[r] for position in seg_params], layer_cache))
                    per_repeat.append(new)
                seg_entries = [list(position) for position in zip(*(e for e, _ in per_repeat), strict=True)]
                seg_hidden = [list(position) for position in zip(*(o for _, o in per_repeat), strict=True)]
        entries.append(seg_entries)
        if collect:
            outputs += layer_order(seg_hidden, runtime.scan_layers)
    return h, entries, outputs


def embed_tokens(params: Params, input_ids: jax.Array, runtime: RuntimeConfig) -> jax.Array:
    return take_rows(params["embed"], input_ids).astype(runtime.dtypes.compute)


def text_forward(
    params: Params,
    cfg: TextConfig,
    runtime: RuntimeConfig,
    embeds: jax.Array,
    token_mask: jax.Array,
    cache: Any = None,
    *,
    positions: jax.Array | None = None,
    any_mask: bool = False,
) -> tuple[jax.Array, list]:
    """Runs the text tower over new positions (B, T, D), right-padded per `token_mask`.

    Without a cache, positions start at 0 (the reference's plain forward). With one (an
    `inference.cache.Cache`), row b's new tokens sit at positions `cache.lengths[b]` onwards and also
    attend to the first `cache.lengths[b]` cached keys. Returns the final-normed hidden states and the new
    cache entries (see `run_layers`), which `inference.cache.append` folds into a cache.

    `any_mask` (static, no cache): `token_mask` may hold zeros anywhere, honoured as transformers does (see
    `any_mask_context`); the attention entries returned then hold each row's valid keys first, so that a
    cache filled from them holds `token_mask.sum(1)` tokens. `positions` (B, T): rotary positions other
    than 0 .. T-1 (transformers' `position_ids`), without a cache.
    """
    hidden, entries, _ = _text_tower(params, cfg, runtime, embeds, token_mask, cache, positions, any_mask)
    return hidden, entries


def text_hidden_states(
    params: Params,
    cfg: TextConfig,
    runtime: RuntimeConfig,
    embeds: jax.Array,
    token_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    any_mask: bool = False,
) -> tuple[jax.Array, ...]:
    """transformers' `output_hidden_states` of the text tower (no cache): the input embeddings, then each
    layer's output, the last one final-normed (num_hidden_layers + 1 arrays (B, T, D))."""
    hidden, _, outputs = _text_tower(
        params, cfg, runtime, embeds, token_mask, None, positions, any_mask, collect=True
    )
    return (embeds.astype(runtime.dtypes.compute), *outputs[:-1], hidden)


def step_context(
    token_mask: jax.Array, cache: Any, positions: jax.Array | None, any_mask: bool
) -> StepContext:
    """What every layer of a `text_forward` call needs (its arguments as `text_forward` takes them)."""
    batch, seq_len = token_mask.shape
    token_mask = token_mask.astype(bool)
    if positions is None:
        offsets = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
        positions = offsets[:, None] + jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    if any_mask:
        if cache is not None:
            raise ValueError("any_mask is for cache-free calls (the cache holds right-aligned rows)")
        return any_mask_context(token_mask, positions.astype(jnp.int32))
    return StepContext(
        positions=positions.astype(jnp.int32),
        token_mask=token_mask,
        num_new=token_mask.sum(axis=1).astype(jnp.int32),
        cached_lengths=None if cache is None else cache.lengths,
    )


def _text_tower(
    params: Params,
    cfg: TextConfig,
    runtime: RuntimeConfig,
    embeds: jax.Array,
    token_mask: jax.Array,
    cache: Any,
    positions: jax.Array | None,
    any_mask: bool,
    collect: bool = False,
) -> tuple[jax.Array, list, list[jax.Array]]:
    ctx = step_context(token_mask, cache, positions, any_mask)
    h = constrain(embeds.astype(runtime.dtypes.compute), RESIDUAL_AXES, runtime)
    cache_blocks = None if cache is None else cache.blocks
    with matmul_precision(runtime.dtypes.compute):
        h, entries, outputs = run_layers(params["blocks"], h, ctx, cache_blocks, cfg, runtime, collect)
    return final_norm(params, h, cfg, runtime), entries, outputs


def final_norm(params: Params, h: jax.Array, cfg: TextConfig, runtime: RuntimeConfig) -> jax.Array:
    return rms_norm(h, params["final_norm"]["scale"].astype(runtime.dtypes.compute), cfg.norm_eps)


def lm_head(params: Params) -> tuple[jax.Array, str]:
    """The output projection and its einsum string: the embedding matrix (V, D) unless the checkpoint
    unties it into `lm_head` (D, V)."""
    if "lm_head" in params:
        return params["lm_head"], "...d,dv->...v"
    return params["embed"], "...d,vd->...v"


def lm_logits(params: Params, h: jax.Array) -> jax.Array:
    """Logits in float32 (the head cast to the hidden states' compute dtype)."""
    head, equation = lm_head(params)
    with matmul_precision(h.dtype):
        if isinstance(head, QuantizedWeight):  # dequantized inside the product (in h's dtype)
            return quantized_einsum(equation, h, head, preferred_element_type=jnp.float32)
        return jnp.einsum(equation, h, head.astype(h.dtype), preferred_element_type=jnp.float32)
