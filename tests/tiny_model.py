"""Torch-free tiny models for unit tests: our own config and random params of realistic scale
(`nn.params.init_params`), and matching random inputs."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lfm2vl_jax.config import ATTENTION, CONV, Lfm2VlConfig, RuntimeConfig, TextConfig, VisionConfig
from lfm2vl_jax.nn.params import init_params

C, A = CONV, ATTENTION


def tiny_config(layer_types: tuple[str, ...] = (C, C, A, C, A, C), **runtime: Any) -> Lfm2VlConfig:
    """2-layer vision tower on a 4x4 position grid, text width 64 with GQA 4/2 heads; vocab 512."""
    return Lfm2VlConfig(
        vision=VisionConfig(
            hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, patch_size=4, num_patches=16
        ),
        text=TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            layer_types=layer_types,
        ),
        projector_hidden_size=80,
        runtime=RuntimeConfig(**runtime),
    )


def tiny_params(config: Lfm2VlConfig, seed: int = 0) -> Any:
    return init_params(config, jax.random.key(seed))


def tiny_inputs(config: Lfm2VlConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A right-padded batch of two: a text-only row (length 9) and a row with one 4x6-patch image."""
    rng = np.random.default_rng(seed)
    f = config.downsample_factor
    image_tokens = (4 // f) * (6 // f)
    row_image = [
        *rng.integers(10, 390, 3),
        *[config.image_token_id] * image_tokens,
        *rng.integers(10, 390, 4),
    ]
    width = len(row_image) + 3
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    ids[0, :9], mask[0, :9] = rng.integers(10, 390, 9), 1
    ids[1, : len(row_image)], mask[1, : len(row_image)] = row_image, 1
    patch_dim = config.vision.num_channels * config.vision.patch_size**2
    pixel_values = np.zeros((1, 32, patch_dim), np.float32)
    pixel_values[0, :24] = rng.uniform(-1, 1, (24, patch_dim))
    patch_mask = np.zeros((1, 32), np.int32)
    patch_mask[0, :24] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "pixel_attention_mask": patch_mask,
        "spatial_shapes": np.array([[4, 6]], np.int32),
    }


def prompt_inputs(
    config: Lfm2VlConfig, segments: list[int | tuple[int, int]], seed: int = 0, max_patches: int = 64
) -> dict[str, np.ndarray]:
    """One row's inputs: ints are runs of random text tokens, (rows, cols) pairs are one image (its
    `<image>` tokens, and random patches padded to `max_patches`)."""
    rng = np.random.default_rng(seed)
    f = config.downsample_factor
    ids: list[int] = []
    shapes = []
    for segment in segments:
        if isinstance(segment, tuple):
            ids += [config.image_token_id] * ((segment[0] // f) * (segment[1] // f))
            shapes.append(segment)
        else:
            ids += rng.integers(10, 390, segment).tolist()
    inputs = {"input_ids": np.array([ids], np.int32), "attention_mask": np.ones((1, len(ids)), np.int32)}
    if shapes:
        patch_dim = config.vision.num_channels * config.vision.patch_size**2
        pixel_values = np.zeros((len(shapes), max_patches, patch_dim), np.float32)
        mask = np.zeros((len(shapes), max_patches), np.int32)
        for i, (rows, cols) in enumerate(shapes):
            pixel_values[i, : rows * cols] = rng.uniform(-1, 1, (rows * cols, patch_dim))
            mask[i, : rows * cols] = 1
        inputs.update(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=np.array(shapes))
    return inputs
