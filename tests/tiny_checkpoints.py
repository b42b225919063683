"""Torch-free tiny checkpoints for unit tests: random weights from `init_params`, written by our own
`save_hf_checkpoint`, plus helpers to damage them and to record a directory's exact content."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
from processor_fixtures import make_checkpoint_dir
from tiny_model import tiny_config as tiny_model_config
from tiny_model import tiny_params

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.example import random_params as numpy_params
from lfm2vl_jax.checkpoint.export import save_hf_checkpoint
from lfm2vl_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from lfm2vl_jax.config import ATTENTION, CONV, Lfm2VlConfig, TextConfig, VisionConfig


def tiny_config(vocab_size: int = 512, max_position_embeddings: int = 64) -> Lfm2VlConfig:
    """A 3-layer text tower (conv, attention, conv) of width 32 and a 2-layer vision tower of width 32."""
    return Lfm2VlConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4, num_patches=16
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            layer_types=(CONV, ATTENTION, CONV),
            max_position_embeddings=max_position_embeddings,
        ),
        projector_hidden_size=48,
        image_token_id=396,
    )


def write_tiny_checkpoint(directory: Path, config: Lfm2VlConfig | None = None, seed: int = 0) -> Path:
    config = tiny_config() if config is None else config
    return save_hf_checkpoint(directory, config, numpy_params(config, seed), progress=False)


def write_cli_checkpoint(directory: Path, processor_files: Path) -> Path:
    """The tiny model with the released vocabulary (65,536) and 128,000 positions, beside the tokenizer
    and processor files of `processor_files` (a checkpoint directory): what `lfm2vl generate` reads."""
    write_tiny_checkpoint(directory, tiny_config(vocab_size=65536, max_position_embeddings=128_000))
    for path in processor_files.iterdir():
        shutil.copyfile(path, directory / path.name)
    return directory


def write_chat_checkpoint(directory: Path, seed: int = 4) -> Path:
    """The released 450M processor files (stand-in tokenizer) and a tiny model (`tiny_model.tiny_config`)
    with the real vocabulary and patch size, eos 7: a checkpoint `lfm2vl batch` and `serve` load whole."""
    make_checkpoint_dir(directory, "lfm2-vl-450m")
    config = tiny_model_config()
    config = dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=65536),
        vision=dataclasses.replace(config.vision, patch_size=16, num_patches=256),
    )
    model = Lfm2VlForConditionalGeneration(config, tiny_params(config, seed=seed), {"eos_token_id": 7})
    saved = model.save_pretrained(directory / "weights", progress=False)
    for path in saved.iterdir():
        shutil.move(path, directory / path.name)
    saved.rmdir()
    return directory


def copy_checkpoint(source: Path, directory: Path) -> Path:
    shutil.copytree(source, directory)
    return directory


def replace_tensor(path: Path, name: str, value: np.ndarray) -> None:
    """Rewrites one safetensors file with tensor `name` replaced (any shape or dtype)."""
    file = SafetensorsFile(path)
    tensors = {key: value if key == name else file.read(key) for key in file.keys()}  # noqa: SIM118
    layout = [(key, array.dtype, array.shape) for key, array in tensors.items()]
    write_safetensors(path, layout, tensors.values(), metadata={"format": "pt"})


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory` (hidden ones too): relative path -> SHA-256 of a file's bytes, the
    target of a link, or "dir"."""
    content = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            content[key] = f"-> {path.readlink()}"
        elif path.is_dir():
            content[key] = "dir"
        else:
            content[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return content
