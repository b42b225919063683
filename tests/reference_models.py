"""Random-weight transformers reference models and matching inputs, for parity tests and benchmarks.

transformers' default init (std 0.02, zero biases, unit norms) barely lets the conv blocks, biases and
norm weights move the logits, so bugs there would hide. `randomize_weights` gives every weight a realistic
scale instead: kernels ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2), biases N(0, 0.1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Lfm2VlConfig as HfConfig
from transformers import Lfm2VlForConditionalGeneration as HfModel

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # reference configs and images (see its README)
REFERENCE_CONFIGS = TEST_DATA / "reference"

C, A = "conv", "full_attention"


def tiny_config(layer_types: tuple[str, ...] = (C, C, A, C, A, C), **overrides: Any) -> HfConfig:
    """A small LFM2-VL: 2-layer vision tower, 4x4 position grid, text width 64, GQA 4/2 heads."""
    text = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=list(layer_types),
        block_multiple_of=32,
        eos_token_id=7,
        pad_token_id=0,
        bos_token_id=1,
    )
    text.update(overrides.pop("text", {}))
    vision = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_patches=16,
        patch_size=4,
        vision_use_head=False,
    )
    vision.update(overrides.pop("vision", {}))
    kwargs = dict(text_config=text, vision_config=vision, projector_hidden_size=80, image_token_id=396)
    kwargs.update(overrides)
    return HfConfig(**kwargs)


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name:  # layer_norm, operator_norm, q_layernorm, ...
                param.copy_(1 + 0.2 * noise)
            elif param.ndim == 1 or "embed" in name:  # embeddings: unit scale, as after training
                param.copy_(noise)
            else:
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))
    return model


def build_reference(config: HfConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> HfModel:
    torch.manual_seed(seed)
    model = HfModel(config)
    randomize_weights(model, seed)
    return model.to(dtype).eval()


def save_reference(model: HfModel, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def random_images(
    config: HfConfig, spatial_shapes: list[tuple[int, int]], max_patches: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Processor-like image inputs: normalised patches in [-1, 1], padded to `max_patches`."""
    rng = np.random.default_rng(seed)
    v = config.vision_config
    patch_dim = v.num_channels * v.patch_size**2
    pixel_values = np.zeros((len(spatial_shapes), max_patches, patch_dim), np.float32)
    mask = np.zeros((len(spatial_shapes), max_patches), np.int32)
    for i, (rows, cols) in enumerate(spatial_shapes):
        pixel_values[i, : rows * cols] = rng.uniform(-1, 1, (rows * cols, patch_dim))
        mask[i, : rows * cols] = 1
    return {
        "pixel_values": pixel_values,
        "pixel_attention_mask": mask,
        "spatial_shapes": np.array(spatial_shapes, np.int64),
    }


def prompt_with_images(
    config: HfConfig, segments: list[int | tuple[int, int]], seed: int = 0, pad_to: int | None = None
) -> np.ndarray:
    """Token ids: ints are runs of random text tokens, (rows, cols) pairs are one image's `<image>` tokens."""
    rng = np.random.default_rng(seed)
    f = config.downsample_factor
    ids: list[int] = []
    for seg in segments:
        if isinstance(seg, tuple):
            ids += [config.image_token_id] * ((seg[0] // f) * (seg[1] // f))
        else:
            ids += rng.integers(10, 390, seg).tolist()
    if pad_to is not None:
        ids += [0] * (pad_to - len(ids))
    return np.array(ids, np.int64)


def reference_logits(model: HfModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        if "pixel_attention_mask" in torch_inputs:
            torch_inputs["pixel_attention_mask"] = torch_inputs["pixel_attention_mask"].bool()
        return model(**torch_inputs).logits.float().numpy()


def single(ids: np.ndarray, images: dict | None = None) -> dict:
    return {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64), **(images or {})}


def ragged_batch(requests: list[dict], pad_side: str = "right") -> dict:
    """One padded batch of single-row requests, their images concatenated in row order."""
    lengths = [r["input_ids"].shape[1] for r in requests]
    width = max(lengths) + 5
    ids = np.zeros((len(requests), width), np.int64)
    mask = np.zeros((len(requests), width), np.int64)
    for i, (r, n) in enumerate(zip(requests, lengths, strict=True)):
        span = slice(0, n) if pad_side == "right" else slice(width - n, width)
        ids[i, span], mask[i, span] = r["input_ids"][0], 1
    with_images = [r for r in requests if len(r.get("spatial_shapes", ()))]
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_images:
        for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
            batch[key] = np.concatenate([r[key] for r in with_images])
    return batch
