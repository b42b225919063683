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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ..config import CONV, RuntimeConfig, TextConfig
from ..parallel.sharding import constrain
from .attention import attention
from .layers import apply_rope, cast, matmul_precision, remat, rms_norm
from .params import Params
from .short_conv import gated_short_conv

RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")


class StepContext(NamedTuple):
    """What every layer of one forward call needs besides its weights and hidden state."""

    positions: jax.Array  # (B, T) positions of the new tokens
    token_mask: jax.Array  # (B, T) bool, False on padding
    num_new: jax.Array  # (B,) valid new tokens per row (rows are right-padded)
    cached_lengths: jax.Array | None  # (B,) tokens already in the cache, or None without a cache


def mlp(p: Params, x: jax.Array, fused: bool = False) -> jax.Array:
    if fused:  # one product; C indexes (gate, up)
        gate_up = jnp.einsum("btd,dcf->btcf", x, p["gate_up"])
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    else:
        gate = jnp.einsum("btd,df->btf", x, p["gate"])
        up = jnp.einsum("btd,df->btf", x, p["up"])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down"])


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
        qkv = jnp.einsum("btd,dkgh->btkgh", x, p["qkv"])
        groups = qkv.shape[3] - 2
        q, k, v = (
            qkv[:, :, :, :groups].reshape(*x.shape[:2], -1, qkv.shape[-1]),
            qkv[..., -2, :],
            qkv[..., -1, :],
        )
    else:
        q = jnp.einsum("btd,dnh->btnh", x, p["q"])
        k = jnp.einsum("btd,dkh->btkh", x, p["k"])
        v = jnp.einsum("btd,dkh->btkh", x, p["v"])
    q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    q = checkpoint_name(apply_rope(q, ctx.positions, cfg.rope_theta), "q")
    k = checkpoint_name(jnp.swapaxes(apply_rope(k, ctx.positions, cfg.rope_theta), 1, 2), "k")  # head-major
    v = checkpoint_name(jnp.swapaxes(v, 1, 2), "v")
    if cached is None:  # positions 0 .. T-1: the default, which lets kernels use a plain causal mask
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
    o = p["o"].reshape(-1, p["o"].shape[-1])
    return jnp.einsum("bte,ed->btd", out.reshape(*out.shape[:2], -1), o), {"k": k, "v": v}


def decoder_layer(
    kind: str, p: Params, h: jax.Array, ctx: StepContext, cached: Any, cfg: TextConfig, runtime: RuntimeConfig
) -> tuple[jax.Array, Any]:
    p = cast(p, runtime.dtypes.compute)
    x = rms_norm(h, p["operator_norm"]["scale"], cfg.norm_eps)
    if kind == CONV:
        with jax.named_scope("short_conv"):
            y, entry = gated_short_conv(p["conv"], x, ctx.token_mask, ctx.num_new, cached)
    else:
        with jax.named_scope("attention"):
            y, entry = attention_block(p["attn"], x, ctx, cached, cfg, runtime)
    h = h + y
    with jax.named_scope("mlp"):
        h = h + mlp(p["mlp"], rms_norm(h, p["ffn_norm"]["scale"], cfg.norm_eps), runtime.fused_projections)
    return constrain(h, RESIDUAL_AXES, runtime), entry


def run_layers(
    blocks: list,
    h: jax.Array,
    ctx: StepContext,
    cache_blocks: list | None,
    cfg: TextConfig,
    runtime: RuntimeConfig,
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
                with jax.named_scope(f"{kind}_layer"):
                    h, entry = decoder_layer(kind, layer_params[i], h, ctx, cached, cfg, runtime)
                new.append(entry)
            return h, new

        with jax.named_scope(f"segment_{s}"):
            if runtime.scan_layers:
                body = remat(motif_body, runtime.remat, in_scan=True)
                h, seg_entries = jax.lax.scan(body, h, (seg_params, seg_cache))
            else:
                body = remat(motif_body, runtime.remat, in_scan=False)
                per_repeat = []
                for r in range(segment.repeats):
                    layer_cache = None if seg_cache is None else [position[r] for position in seg_cache]
                    h, new = body(h, ([position[r] for position in seg_params], layer_cache))
                    per_repeat.append(new)
                seg_entries = [list(position) for position in zip(*per_repeat, strict=True)]
        entries.append(seg_entries)
    return h, entries


def embed_tokens(params: Params, input_ids: jax.Array, runtime: RuntimeConfig) -> jax.Array:
    return jnp.take(params["embed"], input_ids, axis=0).astype(runtime.dtypes.compute)


def text_forward(
    params: Params,
    cfg: TextConfig,
    runtime: RuntimeConfig,
    embeds: jax.Array,
    token_mask: jax.Array,
    cache: Any = None,
) -> tuple[jax.Array, list]:
    """Runs the text tower over new positions (B, T, D), right-padded per `token_mask`.

    Without a cache, positions start at 0 (the reference's plain forward). With one (an
    `inference.cache.Cache`), row b's new tokens sit at positions `cache.lengths[b]` onwards and also
    attend to the first `cache.lengths[b]` cached keys. Returns the final-normed hidden states and the new
    cache entries (see `run_layers`), which `inference.cache.append` folds into a cache.
    """
    batch, seq_len = token_mask.shape
    token_mask = token_mask.astype(bool)
    offsets = jnp.zeros((batch,), jnp.int32) if cache is None else cache.lengths
    ctx = StepContext(
        positions=offsets[:, None] + jnp.arange(seq_len, dtype=jnp.int32)[None, :],
        token_mask=token_mask,
        num_new=token_mask.sum(axis=1).astype(jnp.int32),
        cached_lengths=None if cache is None else cache.lengths,
    )
    h = constrain(embeds.astype(runtime.dtypes.compute), RESIDUAL_AXES, runtime)
    cache_blocks = None if cache is None else cache.blocks
    with matmul_precision(runtime.dtypes.compute):
        h, entries = run_layers(params["blocks"], h, ctx, cache_blocks, cfg, runtime)
    scale = params["final_norm"]["scale"].astype(runtime.dtypes.compute)
    return rms_norm(h, scale, cfg.norm_eps), entries


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
        return jnp.einsum(equation, h, head.astype(h.dtype), preferred_element_type=jnp.float32)
