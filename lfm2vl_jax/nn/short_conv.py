"""LFM2's gated short convolution: the one place where the convolution math lives (prefill, cached
decoding and training all call `gated_short_conv`).

    B, C, x = split(in_proj(h));  y = out_proj(C * causal_depthwise_conv(B * x))

The convolution is causal and depthwise with a kernel of L taps. A recurrent state of the last L-1
convolution inputs carries it across calls, so decoding one token costs O(L * D).

Axis legend: B batch, T new positions, D width, L kernel taps (`conv_L_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from .layers import project
from .params import Params


def causal_depthwise_conv(
    x: jax.Array, kernel: jax.Array, state: jax.Array | None, num_new: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """x: (B, T, D) right-padded inputs; kernel: (L, D); state: (B, L-1, D) the inputs just before x
    (None: sequence start, i.e. zeros); num_new: (B,) valid positions of x per row.

    Returns the float32 output (B, T, D) (output t sees inputs t-L+1 .. t) and the new state: the last L-1
    inputs up to each row's last valid position.
    """
    history = kernel.shape[0] - 1
    if state is None:
        state = jnp.zeros((x.shape[0], history, x.shape[2]), x.dtype)
    window = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # (B, L-1+T, D)
    seq_len = x.shape[1]
    out = sum(
        window[:, i : i + seq_len].astype(jnp.float32) * kernel[i].astype(jnp.float32)
        for i in range(history + 1)
    )
    # The window rows just before position num_new: rows num_new .. num_new + L-2 of the window. Picked
    # by a masked sum rather than a gather, which XLA fuses into one pass (a gather became a copy per row,
    # every decoding step).
    take = num_new[:, None] + jnp.arange(history)[None, :]  # (B, L-1)
    picks = take[:, :, None] == jnp.arange(window.shape[1])[None, None, :]  # (B, L-1, L-1+T)
    new_state = jnp.where(picks[..., None], window[:, None], 0).sum(axis=2, dtype=window.dtype)
    return out, new_state


def gated_short_conv(
    p: Params, x: jax.Array, token_mask: jax.Array, num_new: jax.Array, state: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """x: (B, T, D) normed input, right-padded per token_mask (B, T); state as `causal_depthwise_conv`.
    Returns the block's output (B, T, D) and the new state."""
    # Masked positions feed zeros (as transformers' `apply_mask_to_padding_states`): padding must not leak
    # into the recurrent state. A select, not a product, so that nothing there (not even a NaN) leaks.
    x = jnp.where(token_mask[..., None], x, jnp.zeros((), x.dtype))
    bcx = project("btd,dce->btce", x, p["in_proj"])
    if "in_proj_bias" in p:
        bcx = bcx + p["in_proj_bias"]
    input_gate, output_gate, value = bcx[:, :, 0], bcx[:, :, 1], bcx[:, :, 2]  # the reference's B, C, x
    conv, new_state = causal_depthwise_conv(input_gate * value, p["kernel"], state, num_new)
    if "kernel_bias" in p:
        conv = conv + p["kernel_bias"]
    conv = checkpoint_name(conv.astype(output_gate.dtype), "conv_out")
    y = project("btd,de->bte", output_gate * conv, p["out_proj"])
    if "out_proj_bias" in p:
        y = y + p["out_proj_bias"]
    return y, new_state
