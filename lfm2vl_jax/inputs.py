"""Host-side validation of model inputs and generation options (numpy and Python values, before anything
is traced or allocated), with errors that name the input or option, the value and the limit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Lfm2VlConfig
from .errors import Lfm2VlError
from .memory import available_host_memory, gigabytes


def _integers(dtype: np.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer)


def _mask(dtype: np.dtype) -> bool:
    return _integers(dtype) or dtype == np.bool_


# What each input must hold: integer ids and shapes, 0/1 masks (integers or booleans), real pixels.
INPUT_KINDS: dict[str, tuple[str, Callable[[np.dtype], bool]]] = {
    "input_ids": ("integers", _integers),
    "attention_mask": ("integers or booleans", _mask),
    "pixel_values": ("real numbers", lambda d: _integers(d) or jnp.issubdtype(d, jnp.floating)),
    "pixel_attention_mask": ("integers or booleans", _mask),
    "spatial_shapes": ("integers", _integers),
}

# The model's inputs, in the order of the reference's forward signature.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "spatial_shapes")


class InputError(Lfm2VlError):
    """Model inputs that cannot go together (shapes, image token counts)."""


class OptionError(Lfm2VlError):
    """A generation option of the wrong type or out of range."""


class UnknownOptionError(OptionError, TypeError):
    """A keyword `generate` does not take (a TypeError, as Python's own for an unexpected keyword)."""


def check_inputs(
    config: Lfm2VlConfig,
    input_ids: np.ndarray | None,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    pixel_attention_mask: np.ndarray | None = None,
    spatial_shapes: np.ndarray | None = None,
    *,
    inputs_embeds: np.ndarray | None = None,
    image_embedding: np.ndarray | None = None,
) -> None:
    """Host-side validation with errors that name the problem, before anything is traced.

    `inputs_embeds` (B, S, D) may stand for `input_ids`; its image positions are those whose embedding
    equals `image_embedding` (the `<image>` token's, as transformers finds them)."""
    if input_ids is None and inputs_embeds is None:
        raise InputError("input_ids (or inputs_embeds) are required")
    if input_ids is not None and inputs_embeds is not None:
        raise InputError("pass input_ids or inputs_embeds, not both")
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_attention_mask,
        "spatial_shapes": spatial_shapes,
    }
    for name, array in arrays.items():
        kind, accepts = INPUT_KINDS[name]
        if array is not None and not accepts(array.dtype):
            raise InputError(f"{name} must hold {kind}, got dtype {array.dtype}")
    if pixel_values is not None and not np.isfinite(pixel_values).all():
        raise InputError("pixel_values hold NaN or infinite values")
    if inputs_embeds is not None:
        width = config.text.hidden_size
        if not jnp.issubdtype(inputs_embeds.dtype, jnp.floating):
            raise InputError(f"inputs_embeds must hold real numbers, got dtype {inputs_embeds.dtype}")
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != width or not inputs_embeds.size:
            raise InputError(
                f"inputs_embeds must be (batch, seq, {width}) (text_config.hidden_size) and not empty, "
                f"got shape {inputs_embeds.shape}"
            )
        if not np.isfinite(inputs_embeds).all():
            raise InputError("inputs_embeds hold NaN or infinite values")
        shape = inputs_embeds.shape[:2]
        is_image = (inputs_embeds == np.asarray(image_embedding, inputs_embeds.dtype)).all(axis=-1)
    else:
        if input_ids.ndim != 2 or not input_ids.size:
            raise InputError(f"input_ids must be (batch, seq) and not empty, got shape {input_ids.shape}")
        if input_ids.min() < 0 or input_ids.max() >= config.text.vocab_size:
            raise InputError(
                f"input_ids must lie in [0, {config.text.vocab_size}); "
                f"got {input_ids.min()}..{input_ids.max()}"
            )
        shape = input_ids.shape
        is_image = input_ids == config.image_token_id
    ids_name = "input_ids" if inputs_embeds is None else "inputs_embeds"
    if attention_mask is not None:
        if attention_mask.shape != shape:
            raise InputError(
                f"attention_mask shape {attention_mask.shape} does not match {ids_name}' (batch, seq) {shape}"
            )
        empty = np.flatnonzero(~attention_mask.astype(bool).any(axis=1))
        if empty.size:
            raise InputError(f"attention_mask masks every token of row(s) {empty.tolist()}")
    num_image_tokens = int(is_image.sum())
    images = [pixel_values, pixel_attention_mask, spatial_shapes]
    if pixel_values is None:
        if any(x is not None for x in images):
            raise InputError("pixel_attention_mask/spatial_shapes given without pixel_values")
        if num_image_tokens:
            raise InputError(
                f"{ids_name} hold {num_image_tokens} image tokens (id {config.image_token_id}) "
                "but no pixel_values were given"
            )
        return
    num_features = check_images(config, pixel_values, pixel_attention_mask, spatial_shapes)
    if num_features != num_image_tokens:
        raise InputError(
            f"image features and image tokens do not match: the images give {num_features} tokens but "
            f"{ids_name} hold {num_image_tokens} image tokens (id {config.image_token_id})"
        )


def check_images(
    config: Lfm2VlConfig,
    pixel_values: np.ndarray,
    pixel_attention_mask: np.ndarray | None,
    spatial_shapes: np.ndarray | None,
) -> int:
    """Checks the processor's image outputs against each other and the model; returns how many image
    tokens they give."""
    if pixel_attention_mask is None or spatial_shapes is None:
        raise InputError("pixel_values needs pixel_attention_mask and spatial_shapes too")
    for name, array in (
        ("pixel_values", pixel_values),
        ("pixel_attention_mask", pixel_attention_mask),
        ("spatial_shapes", spatial_shapes),
    ):
        kind, accepts = INPUT_KINDS[name]
        if not accepts(array.dtype):
            raise InputError(f"{name} must hold {kind}, got dtype {array.dtype}")
    if not np.isfinite(pixel_values).all():
        raise InputError("pixel_values hold NaN or infinite values")
    v = config.vision
    expected_patch = v.num_channels * v.patch_size**2
    if pixel_values.ndim != 3 or pixel_values.shape[2] != expected_patch:
        raise InputError(
            f"pixel_values must be (images, patches, {expected_patch}) flattened patches, "
            f"got {pixel_values.shape}"
        )
    num_images, num_patches = pixel_values.shape[:2]
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
    return int(np.prod(np.asarray(spatial_shapes) // f, axis=1).sum())


def is_right_padded(attention_mask: np.ndarray) -> bool:
    """Whether every row's tokens come first, then only padding (the layout the fast paths assume)."""
    mask = attention_mask.astype(bool)
    return bool((mask == (np.arange(mask.shape[1]) < mask.sum(axis=1, keepdims=True))).all())


def check_forward_options(
    config: Lfm2VlConfig,
    shape: tuple[int, int],
    attention_mask: np.ndarray | None,
    position_ids: np.ndarray | None,
    labels: np.ndarray | None,
) -> np.ndarray | None:
    """Checks the plain forward's `position_ids` and `labels` against the inputs' (batch, seq) `shape` and
    the model, and the length against its positions; returns `position_ids` broadcast to `shape`."""
    limit = config.text.max_position_embeddings
    if position_ids is None:
        if shape[1] > limit:
            raise InputError(
                f"the inputs hold {shape[1]} positions, more than the model's {limit} "
                "(text_config.max_position_embeddings)"
            )
    else:
        if not _integers(position_ids.dtype):
            raise InputError(f"position_ids must hold integers, got dtype {position_ids.dtype}")
        if (
            position_ids.ndim != 2
            or position_ids.shape[1] != shape[1]
            or position_ids.shape[0] not in (1, shape[0])
        ):
            raise InputError(
                f"position_ids must be (batch, seq) = {shape} or (1, {shape[1]}), got {position_ids.shape}"
            )
        if position_ids.min() < 0 or position_ids.max() >= limit:
            raise InputError(
                f"position_ids must lie in [0, {limit}) (text_config.max_position_embeddings), got "
                f"{position_ids.min()}..{position_ids.max()}"
            )
        position_ids = np.broadcast_to(position_ids, shape).astype(np.int32)
        if attention_mask is None:
            steps = np.diff(position_ids, axis=1)
            packed = np.flatnonzero((steps != 1).any(axis=1))
            if packed.size:
                raise InputError(
                    f"position_ids restart or jump inside row(s) {packed.tolist()} and no attention_mask was "
                    "given: transformers then reads them as packed sequences and keeps attention inside "
                    "each, which this forward does not do; pass one sequence per row (or an attention_mask)"
                )
    if labels is not None:
        if not _integers(labels.dtype):
            raise InputError(f"labels must hold integers, got dtype {labels.dtype}")
        if labels.shape != shape:
            raise InputError(f"labels must have the inputs' shape (batch, seq) {shape}, got {labels.shape}")
        vocab = config.text.vocab_size
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            row, col = np.argwhere(bad)[0].tolist()
            raise InputError(
                f"labels must be token ids in [0, {vocab}) or -100 (no loss); labels[{row}, {col}] is "
                f"{labels[row, col]}"
            )
        if not (labels[:, 1:] != -100).any():
            raise InputError(
                "labels hold no token to predict: every label after the first position is -100 "
                "(position t predicts labels[:, t + 1])"
            )
    return position_ids


def as_numpy_inputs(**inputs: Any) -> dict[str, np.ndarray | None]:
    """Accepts numpy, jax or list inputs under the reference's names."""
    arrays = {}
    for name, value in inputs.items():
        try:
            arrays[name] = None if value is None else np.asarray(value)
        except (TypeError, ValueError) as err:  # ragged lists, objects numpy cannot hold
            raise InputError(f"{name} cannot be read as an array: {err}") from None
    return arrays


# Generation options ---------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    return is_int(value) or isinstance(value, (float, np.floating))


def check_int(name: str, value: Any, low: int, high: int | None = None, where: str = "") -> int:
    """`value` as an int in [low, high] (high included), or an `OptionError` naming `name`."""
    if not is_int(value) or value < low or (high is not None and value > high):
        limits = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OptionError(f"{where}{name} must be an integer {limits}, got {value!r}")
    return int(value)


def check_token_ids(name: str, value: Any, vocab_size: int, where: str = "") -> list[int]:
    """A token id or a list of them, each an int in [0, vocab_size)."""
    ids = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not all(is_int(i) and 0 <= i < vocab_size for i in ids):
        raise OptionError(
            f"{where}{name} must be a token id or a list of token ids, integers in [0, {vocab_size}) "
            f"(the vocabulary), got {value!r}"
        )
    return [int(i) for i in ids]


INT32_MAX = 2**31 - 1  # token counts and positions are int32 on the device


# Sizes against what the model and the machine hold ----------------------------------------------------------


def available_memory(config: Lfm2VlConfig) -> tuple[int, str] | None:
    """(bytes free, where) for the decoding cache: the devices' free memory where the backend reports it
    (summed over the mesh), else the host's available RAM (the CPU backend); None if neither is known."""
    mesh = config.runtime.mesh
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    stats = [device.memory_stats() for device in devices]
    if all(s and "bytes_limit" in s for s in stats):
        free = sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return free, f"free {devices[0].platform} memory on {len(devices)} device(s)"
    host = available_host_memory()
    return None if host is None else (host, "available host memory")


def check_logits_fit(config: Lfm2VlConfig, shape: tuple[int, int]) -> None:
    """Refuses a forward pass whose (batch, seq, vocab) float32 logits exceed the memory available."""
    rows, seq = shape
    needed = rows * seq * config.text.vocab_size * 4
    available = available_memory(config)
    if available is not None and needed > available[0]:
        raise InputError(
            f"inputs of shape {shape}: the logits of {rows} x {seq} tokens over a "
            f"{config.text.vocab_size}-token vocabulary need {gigabytes(needed)}, more than the "
            f"{gigabytes(available[0])} of "
            f"{available[1]}; pass fewer rows or shorter ones"
        )
