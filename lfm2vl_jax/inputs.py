"""Host-side validation of model inputs (numpy, before anything is traced), with errors that name the
problem."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import Lfm2VlConfig
from .errors import Lfm2VlError

# The model's inputs, in the order of the reference's forward signature.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes")


class InputError(Lfm2VlError):
    """Model inputs that cannot go together (shapes, image token counts)."""


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
        marked = np.asarray(pixel_attention_mask[i]).astype(bool)
        if int(marked.sum()) != rows * cols or not marked[: rows * cols].all():
            raise InputError(
                f"image {i}: pixel_attention_mask must mark its first rows*cols = {rows * cols} patch "
                "slots (the processor's layout)"
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
