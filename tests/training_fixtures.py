"""Fine-tuning test material: a tiny LFM2-VL checkpoint written by our own export (random weights of
realistic scale, norms and biases perturbed so that they matter), with the stand-in tokenizer and a
processor configured for tiny images, and JSONL conversations over tests/data/images. Torch-free: unit
tests use it; parity tests load the same checkpoint in transformers.

The released tokenizer config places a few added tokens at ids above 64,000; they are dropped here so that
the vocabulary (and the model's embedding) can be 2,048 entries.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image
from processor_fixtures import IMAGES_DIR, build_tokenizer, reference_dir

from lfm2vl_jax.checkpoint.export import save_hf_checkpoint
from lfm2vl_jax.config import ATTENTION, CONV, Lfm2VlConfig, TextConfig, VisionConfig
from lfm2vl_jax.nn.params import init_params, is_spec, param_specs

VOCAB = 2048
# Tiny images: 4x4-pixel patches, 16x16-pixel tiles, at most 8 tokens (32 patches) per image view.
PROCESSOR_SETTINGS = {
    "encoder_patch_size": 4,
    "tile_size": 16,
    "min_image_tokens": 2,
    "max_image_tokens": 8,
    "min_tiles": 2,
    "max_tiles": 4,
    "use_thumbnail": True,
    "max_num_patches": 32,
}


def tiny_config(layer_types: tuple[str, ...] = (CONV, ATTENTION, CONV, ATTENTION)) -> Lfm2VlConfig:
    return Lfm2VlConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4, num_patches=16
        ),
        text=TextConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            layer_types=layer_types,
        ),
        projector_hidden_size=48,
    )


def random_params(config: Lfm2VlConfig, seed: int = 0) -> Any:
    """`init_params`, with norm scales 1 + N(0, 0.2) and biases N(0, 0.1) (not ones and zeros)."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    specs = param_specs(config)

    def perturb(spec: Any, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if spec.init == "ones":
            return x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype)
        if spec.init == "zeros":
            return x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
        return x

    return jax.tree.map(perturb, specs, params, is_leaf=is_spec)


def write_processor_files(directory: Path) -> Path:
    source = reference_dir("lfm2-vl-450m")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"] = {
        i: token for i, token in tokenizer_config["added_tokens_decoder"].items() if int(i) < VOCAB
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    build_tokenizer(tokenizer_config, vocab_size=VOCAB).save(str(directory / "tokenizer.json"))
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        shutil.copyfile(source / name, directory / name)
    for name in ("processor_config.json", "preprocessor_config.json"):
        settings = json.loads((source / name).read_text()) | PROCESSOR_SETTINGS
        (directory / name).write_text(json.dumps(settings, indent=2))
    return directory


def make_tiny_checkpoint(directory: Path, config: Lfm2VlConfig | None = None, seed: int = 0) -> Path:
    """A transformers checkpoint directory of a tiny random model with tokenizer and processor files."""
    config = config or tiny_config()
    side_files = write_processor_files(directory.with_name(directory.name + "-processor"))
    save_hf_checkpoint(directory, config, random_params(config, seed), source_dir=side_files, progress=False)
    return directory


def write_images(directory: Path) -> list[str]:
    """The repository's test images plus two synthetic ones (odd sizes), copied next to the JSONL."""
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted(IMAGES_DIR.iterdir()):
        shutil.copyfile(path, directory / path.name)
        names.append(path.name)
    rng = np.random.default_rng(0)
    for size in ((40, 28), (96, 200)):
        name = f"noise_{size[0]}x{size[1]}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(directory / name)
        names.append(name)
    return names


ANSWERS = [
    "The photo shows a woman in a naval uniform.",
    "A logo with blue letters on a white background.",
    "A gift box wrapped in blue paper with a ribbon.",
    "There are three objects: a cat, a dog and a small red ball.",
    "Grace Hopper was a computer scientist and admiral.",
]


def conversation(images: list[str], question: str, answer: str, system: str | None = None) -> dict:
    content = [{"type": "image", "image": f"imgs/{name}"} for name in images]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": [*content, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"messages": messages}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def image_conversations(directory: Path, count: int = 4) -> Path:
    """`count` conversations, one or two images each, some with a system turn or a second turn."""
    names = write_images(directory / "imgs")
    records = []
    for i in range(count):
        images = [names[i % len(names)]] + ([names[(i + 2) % len(names)]] if i % 3 == 2 else [])
        record = conversation(
            images,
            "Describe this image in detail.",
            ANSWERS[i % len(ANSWERS)],
            "You are a helpful assistant.",
        )
        if i % 2:
            record["messages"] += [
                {"role": "user", "content": "How many objects are there in the scene?"},
                {"role": "assistant", "content": ANSWERS[(i + 3) % len(ANSWERS)]},
            ]
        records.append(record)
    return write_jsonl(directory / "train.jsonl", records)


def uniform_conversations(directory: Path, count: int = 4) -> Path:
    """`count` conversations whose batches of two all have one padded shape (so a run compiles its step
    once): one 40x40 image each (distinct pixels), a system turn, answers of similar length."""
    (directory / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    records = []
    for i in range(count):
        name = f"square_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(directory / "imgs" / name)
        answer = ANSWERS[i % 3]  # the three of similar length
        records.append(
            conversation([name], "Describe this image in detail.", answer, "You are a helpful assistant.")
        )
    return write_jsonl(directory / "train.jsonl", records)


def reference_batch(processor: Any, examples: list) -> dict:
    """The conversations as transformers' processor lays them out (our processor's parity is tested
    elsewhere), right-padded, with -100 labels off the loss tokens."""
    width = max(e.length for e in examples)
    ids = np.full((len(examples), width), processor.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    images = []
    for row, example in enumerate(examples):
        ids[row, : example.length] = example.input_ids
        mask[row, : example.length] = 1
        labels[row, : example.length] = np.where(example.loss_mask, example.input_ids, -100)
        if example.images:
            images.append(processor(images=[list(example.images)], text=[example.text]))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        batch[key] = np.concatenate([out[key] for out in images])
    return batch


# The run that the resume and multi-process tests repeat: 8 steps of 2 conversations, a checkpoint every
# 2 steps. Subprocesses share a persistent compilation cache and compile without XLA's backend
# optimisations (half the compile time; every run of a comparison uses the same flags).
TRAIN_STEPS = 8
TRAIN_FLAGS = (
    *("--steps", str(TRAIN_STEPS), "--batch-size", "2", "--save-every", "2", "--keep", "2"),
    *("--learning-rate", "3e-3", "--warmup-steps", "2", "--quiet"),
)
REPOSITORY = Path(__file__).resolve().parents[1]


def train_command(model: Path, data: Path, out: Path, *extra: str, driver: Path | None = None) -> list[str]:
    entry = [str(driver)] if driver else ["-m", "lfm2vl_jax.cli", "train"]
    return [
        sys.executable,
        *entry,
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        *TRAIN_FLAGS,
        *extra,
    ]


def subprocess_env(cache: Path, devices: int = 1, **extra: str) -> dict[str, str]:
    flags = "--xla_backend_optimization_level=0"
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": flags,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def read_metrics(out: Path) -> dict[int, dict]:
    """metrics.jsonl's training lines by step (each step logged once, in order)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), steps
    return {line["step"]: line for line in lines}
