"""Pixel-unshuffle MLP projector: each `f x f` block of vision patches becomes one text-width token.

Axis legend: I images, P patch slots, E vision width, T token slots per image (P // f**2), D text width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layers import activation, cast, dense, layer_norm, matmul_precision
from .params import Params


def image_tokens_per_image(spatial_shapes: jax.Array, factor: int) -> jax.Array:
    """(I,) number of text tokens each image yields."""
    return (spatial_shapes[:, 0] // factor) * (spatial_shapes[:, 1] // factor)


def pixel_unshuffle(features: jax.Array, spatial_shapes: jax.Array, factor: int) -> jax.Array:
    """(I, P, E) row-major patch features -> (I, P // f**2, f*f*E) token features.

    Token t of an image with `cols` patch columns covers block row t // (cols/f) and block column
    t % (cols/f); its features are the block's patches in row-major order (block row offset, block column
    offset), each E channels: exactly the reference's reshape/permute sequence. Slots past an image's
    token count gather patch 0 and are dropped by the caller.
    """
    num_images, num_patches, width = features.shape
    cols = spatial_shapes[:, 1:2]  # (I, 1)
    blocks_per_row = cols // factor
    token = jnp.arange(num_patches // factor**2)[None, :]
    offset = jnp.arange(factor)
    rows = (token // blocks_per_row * factor)[..., None, None] + offset[:, None]  # (I, T, f, 1)
    columns = (token % blocks_per_row * factor)[..., None, None] + offset[None, :]  # (I, T, 1, f)
    patch = rows * cols[..., None, None] + columns  # (I, T, f, f)
    valid = token < image_tokens_per_image(spatial_shapes, factor)[:, None]
    patch = jnp.where(valid[..., None, None], patch, 0).reshape(num_images, -1)
    gathered = jnp.take_along_axis(features, patch[..., None], axis=1)
    return gathered.reshape(num_images, -1, factor * factor * width)


def project(params: Params, features: jax.Array, spatial_shapes: jax.Array, factor: int) -> jax.Array:
    """(I, P, E) vision features -> (I, T, D) image token embeddings (in the features' dtype)."""
    params = cast(params, features.dtype)
    x = pixel_unshuffle(features, spatial_shapes, factor)
    if "ln" in params:
        x = layer_norm(x, params["ln"], eps=1e-5)  # nn.LayerNorm's default eps in the reference
    with matmul_precision(features.dtype):
        x = activation("gelu")(dense(x, params["fc1"]))
        return dense(x, params["fc2"])
