"""Per-component parity with the reference, so that a failing end-to-end test points at its cause.

Tolerances: everything runs in float32 on the CPU; the components are a handful of float32 operations
whose rounding differs from torch's only in summation order, so 1e-5 relative to the output's scale is
several times the observed error and far below any real bug (wrong index, wrong axis, missing term).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.lfm2 import modeling_lfm2
from transformers.models.lfm2_vl.modeling_lfm2_vl import Lfm2VlMultiModalProjector

from lfm2vl_jax.nn.attention import attention
from lfm2vl_jax.nn.layers import apply_rope
from lfm2vl_jax.nn.projector import pixel_unshuffle
from lfm2vl_jax.nn.short_conv import gated_short_conv
from lfm2vl_jax.nn.vision import resize_position_grid

RTOL = 1e-5


def assert_close(ours, reference, rtol=RTOL):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize(
    "rows, cols",
    [(16, 16), (4, 6), (7, 3), (40, 25), (64, 16), (8, 40), (1, 32), (3, 96)],
    ids=["same", "down", "down-odd", "up", "up-mixed", "mixed", "one-row", "down-up-extreme"],
)
def test_position_grid_resize_matches_torch_antialiased_bilinear(rows, cols):
    grid = np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None],
        size=(rows, cols),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].permute(1, 2, 0)
    num_positions = rows * cols + 5  # padding slots past the image
    ours = resize_position_grid(jnp.asarray(grid), jnp.array([[rows, cols]]), num_positions)[0]
    assert_close(ours[: rows * cols], expected.reshape(rows * cols, 8).numpy())


def test_position_grid_resize_is_per_image_in_one_batch():
    grid = np.random.default_rng(1).normal(size=(4, 4, 3)).astype(np.float32)
    shapes = np.array([[2, 6], [8, 4], [4, 4]])
    batched = resize_position_grid(jnp.asarray(grid), jnp.asarray(shapes), 32)
    for i, (rows, cols) in enumerate(shapes):
        alone = resize_position_grid(jnp.asarray(grid), jnp.asarray(shapes[i : i + 1]), rows * cols)[0]
        np.testing.assert_array_equal(np.asarray(batched[i, : rows * cols]), np.asarray(alone))


@pytest.mark.parametrize("shapes", [[(4, 6)], [(2, 2), (6, 4), (8, 2)]])
def test_pixel_unshuffle_matches_reference_element_order(shapes):
    """Each image alone through the reference projector's `pixel_unshuffle` (the (1, rows, cols, C) path of
    the custom-code model) vs. our padded, batched gather."""
    factor, channels, slots = 2, 5, 48
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(shapes), slots, channels)).astype(np.float32)
    ours = np.asarray(pixel_unshuffle(jnp.asarray(features), jnp.asarray(shapes), factor))
    unshuffle = Lfm2VlMultiModalProjector.pixel_unshuffle
    projector = type("P", (), {"factor": factor})()
    for i, (rows, cols) in enumerate(shapes):
        grid = torch.from_numpy(features[i, : rows * cols]).reshape(1, rows, cols, channels)
        expected = unshuffle(projector, grid).reshape(-1, channels * factor**2).numpy()
        np.testing.assert_array_equal(ours[i, : len(expected)], expected)


def _reference_short_conv(hidden: int, kernel_size: int, bias: bool) -> modeling_lfm2.Lfm2ShortConv:
    from transformers import Lfm2Config

    hf_cfg = Lfm2Config(
        hidden_size=hidden,
        conv_L_cache=kernel_size,
        conv_bias=bias,
        num_hidden_layers=1,
        layer_types=["conv"],
    )
    torch.manual_seed(0)
    module = modeling_lfm2.Lfm2ShortConv(hf_cfg, layer_idx=0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module.eval()


@pytest.mark.parametrize("kernel_size, bias", [(3, False), (4, True)])
def test_short_conv_matches_reference_with_right_padding(kernel_size, bias):
    d = 16
    module = _reference_short_conv(d, kernel_size, bias)
    w = {name: p.detach().numpy() for name, p in module.named_parameters()}
    params = {
        "in_proj": jnp.asarray(w["in_proj.weight"].T.reshape(d, 3, d)),
        "kernel": jnp.asarray(w["conv.weight"][:, 0, :].T),
        "out_proj": jnp.asarray(w["out_proj.weight"].T),
    }
    if bias:
        params |= {
            "in_proj_bias": jnp.asarray(w["in_proj.bias"].reshape(3, d)),
            "kernel_bias": jnp.asarray(w["conv.bias"]),
            "out_proj_bias": jnp.asarray(w["out_proj.bias"]),
        }
    x = np.random.default_rng(0).normal(size=(2, 9, d)).astype(np.float32)
    mask = np.array([[1] * 9, [1] * 5 + [0] * 4])
    with torch.no_grad():
        expected = module(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).numpy()
    ours, state = gated_short_conv(
        params, jnp.asarray(x), jnp.asarray(mask, bool), jnp.asarray(mask.sum(1)), None
    )
    assert_close(ours, expected)
    # The state a decode step continues from: the last kernel_size-1 conv inputs of each row's valid tokens.
    assert state.shape == (2, kernel_size - 1, d)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_attention_matches_torch_sdpa(num_heads, num_kv_heads, causal):
    """The entry point's lengths/positions semantics against a dense mask given to torch's SDPA."""
    rng = np.random.default_rng(0)
    b, t, s, h = 2, 5, 11, 8
    q = rng.normal(size=(b, t, num_heads, h)).astype(np.float32)
    k = rng.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)  # head-major, as attention() takes
    v = rng.normal(size=(b, num_kv_heads, s, h)).astype(np.float32)
    kv_lengths = np.array([11, 7])
    q_positions = np.array([np.arange(6, 11), np.arange(2, 7)])  # row 1: queries past its last key too
    mask = np.arange(s)[None, None, :] < kv_lengths[:, None, None]
    if causal:
        mask = mask & (np.arange(s)[None, None, :] <= q_positions[:, :, None])
    expected = F.scaled_dot_product_attention(
        torch.from_numpy(q).transpose(1, 2),
        torch.from_numpy(k),
        torch.from_numpy(v),
        attn_mask=torch.from_numpy(mask)[:, None],
        enable_gqa=True,
    ).transpose(1, 2)
    ours = attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        kv_lengths=jnp.asarray(kv_lengths),
        q_positions=jnp.asarray(q_positions),
        causal=causal,
    )
    assert_close(ours, expected.numpy())


def test_cached_attention_shares_one_softmax_with_the_new_tokens():
    """Decoding: queries attend to the cache's valid keys and, causally, to their own keys (new_k/new_v),
    exactly as to one concatenated sequence."""
    rng = np.random.default_rng(1)
    b, t, s, n, kv, h = 2, 3, 10, 8, 2, 8
    lengths = np.array([6, 9])
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    cache_k, cache_v = (rng.normal(size=(b, kv, s, h)).astype(np.float32) for _ in range(2))
    new_k, new_v = (rng.normal(size=(b, kv, t, h)).astype(np.float32) for _ in range(2))
    positions = lengths[:, None] + np.arange(t)[None, :]
    ours = attention(
        jnp.asarray(q),
        jnp.asarray(cache_k),
        jnp.asarray(cache_v),
        kv_lengths=jnp.asarray(lengths),
        q_positions=jnp.asarray(positions),
        causal=True,
        new_k=jnp.asarray(new_k),
        new_v=jnp.asarray(new_v),
    )
    for row in range(b):
        n_keys = lengths[row]
        keys = np.concatenate([cache_k[row, :, :n_keys], new_k[row]], axis=1)[None]
        values = np.concatenate([cache_v[row, :, :n_keys], new_v[row]], axis=1)[None]
        expected = F.scaled_dot_product_attention(
            torch.from_numpy(q[row : row + 1]).transpose(1, 2),
            torch.from_numpy(keys),
            torch.from_numpy(values),
            attn_mask=torch.from_numpy(np.arange(n_keys + t)[None, :] <= (n_keys + np.arange(t))[:, None]),
            enable_gqa=True,
        ).transpose(1, 2)
        assert_close(ours[row : row + 1], expected.numpy())


def test_rope_matches_reference():
    from transformers import Lfm2Config

    hf_cfg = Lfm2Config(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    rotary = modeling_lfm2.Lfm2RotaryEmbedding(hf_cfg)
    x = np.random.default_rng(0).normal(size=(2, 7, 4, 16)).astype(np.float32)
    positions = np.array([np.arange(7), np.arange(100, 107)])
    cos, sin = rotary(torch.from_numpy(x), torch.from_numpy(positions))
    expected, _ = modeling_lfm2.apply_rotary_pos_emb(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(x).transpose(1, 2), cos, sin
    )
    ours = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    assert_close(ours, expected.transpose(1, 2).numpy())
