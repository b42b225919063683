"""The whole LFM2-VL forward pass: vision tower -> projector -> image tokens merged into the text
embeddings at the `<image>` positions -> LFM2 text tower -> logits.

Plain functions over the params pytree and a frozen config; `Lfm2VlForConditionalGeneration` (in
`api.py`) wraps them in Hugging Face's vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Lfm2VlConfig
from .errors import Lfm2VlError
from .params import Params
from .projector import image_tokens_per_image, project
from .text import embed_tokens, lm_logits, text_forward
from .vision import vision_tower


class InputError(Lfm2VlError):
    """Model inputs that cannot go together (shapes, image token counts)."""


def image_features(
    params: Params,
    config: Lfm2VlConfig,
    pixel_values: jax.Array,
    pixel_attention_mask: jax.Array,
    spatial_shapes: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Image token embeddings (I, T, D) and which of the T slots are real tokens (I, T)."""
    features = vision_tower(
        params["vision"], config.vision, pixel_values, pixel_attention_mask, spatial_shapes
    )
    tokens = project(params["projector"], features, spatial_shapes, config.downsample_factor)
    counts = image_tokens_per_image(spatial_shapes, config.downsample_factor)
    valid = jnp.arange(tokens.shape[1])[None, :] < counts[:, None]
    return tokens, valid


def merge_image_features(
    embeds: jax.Array, input_ids: jax.Array, image_token_id: int, features: jax.Array, valid: jax.Array
) -> jax.Array:
    """Puts the images' tokens, in order, at the `<image>` positions (row-major over the batch), as the
    reference's `masked_scatter` does. The counts must match (checked on the host by `check_inputs`)."""
    num_slots = features.shape[0] * features.shape[1]
    flat, flat_valid = features.reshape(num_slots, -1), valid.reshape(-1)
    destination = jnp.where(flat_valid, jnp.cumsum(flat_valid) - 1, num_slots)
    compact = jnp.zeros_like(flat).at[destination].set(flat, mode="drop")
    is_image = input_ids == image_token_id
    rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(compact, jnp.clip(rank, 0, num_slots - 1), axis=0)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


def embed_inputs(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
) -> jax.Array:
    embeds = embed_tokens(params["text"], input_ids)
    if pixel_values is None:
        return embeds
    features, valid = image_features(params, config, pixel_values, pixel_attention_mask, spatial_shapes)
    return merge_image_features(embeds, input_ids, config.image_token_id, features, valid)


@functools.partial(jax.jit, static_argnames=("config",))
def forward(
    params: Params,
    config: Lfm2VlConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    pixel_values: jax.Array | None = None,
    pixel_attention_mask: jax.Array | None = None,
    spatial_shapes: jax.Array | None = None,
) -> jax.Array:
    """Logits (B, S, V) in float32 for right-padded `input_ids` (B, S); the reference's plain forward."""
    embeds = embed_inputs(params, config, input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
    hidden, _ = text_forward(params["text"], config.text, embeds, attention_mask)
    return lm_logits(params["text"], hidden)


def check_inputs(
    config: Lfm2VlConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    pixel_attention_mask: np.ndarray | None = None,
    spatial_shapes: np.ndarray | None = None,
) -> None:
    """Host-side validation with errors that name the problem, before anything is traced."""
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {attention_mask.shape} does not match input_ids shape {input_ids.shape}"
        )
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= config.text.vocab_size):
        raise InputError(
            f"input_ids must lie in [0, {config.text.vocab_size}); got {input_ids.min()}..{input_ids.max()}"
        )
    num_image_tokens = int((input_ids == config.image_token_id).sum())
    images = [pixel_values, pixel_attention_mask, spatial_shapes]
    if pixel_values is None:
        if any(x is not None for x in images):
            raise InputError("pixel_attention_mask/spatial_shapes given without pixel_values")
        if num_image_tokens:
            raise InputError(
                f"input_ids hold {num_image_tokens} image tokens (id {config.image_token_id}) "
                "but no pixel_values were given"
            )
        return
    if any(x is None for x in images):
        raise InputError("pixel_values needs pixel_attention_mask and spatial_shapes too")
    v = config.vision
    num_images, num_patches = pixel_values.shape[:2]
    expected_patch = v.num_channels * v.patch_size**2
    if pixel_values.ndim != 3 or pixel_values.shape[2] != expected_patch:
        raise InputError(
            f"pixel_values must be (images, patches, {expected_patch}) flattened patches, "
            f"got {pixel_values.shape}"
        )
    if pixel_attention_mask.shape != (num_images, num_patches):
        raise InputError(
            f"pixel_attention_mask shape {pixel_attention_mask.shape} != ({num_images}, {num_patches})"
        )
    if spatial_shapes.shape != (num_images, 2):
        raise InputError(f"spatial_shapes must be ({num_images}, 2), got {spatial_shapes.shape}")
    f = config.downsample_factor
    for i, (rows, cols) in enumerate(np.asarray(spatial_shapes).tolist()):
        if rows <= 0 or cols <= 0 or rows % f or cols % f:
            raise InputError(
                f"image {i}: spatial_shapes ({rows}, {cols}) must be positive multiples of "
                f"downsample_factor {f}"
            )
        if rows * cols > num_patches:
            raise InputError(f"image {i}: spatial_shapes ({rows}, {cols}) exceed {num_patches} patch slots")
        if int(np.asarray(pixel_attention_mask[i]).sum()) != rows * cols:
            raise InputError(
                f"image {i}: pixel_attention_mask does not mark rows*cols = {rows * cols} patches"
            )
    num_features = int(np.prod(np.asarray(spatial_shapes) // f, axis=1).sum())
    if num_features != num_image_tokens:
        raise InputError(
            f"image features and image tokens do not match: the images give {num_features} tokens but "
            f"input_ids hold {num_image_tokens} image tokens (id {config.image_token_id})"
        )


def as_numpy_inputs(**inputs: Any) -> dict[str, np.ndarray | None]:
    """Accepts numpy, jax or list inputs under the reference's names."""
    return {k: None if v is None else np.asarray(v) for k, v in inputs.items()}
