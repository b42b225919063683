"""`lfm2vl example DIR`: something runnable without the Hugging Face Hub. A random-weight checkpoint of a
released model's shapes (or a tiny one), with that model's processor files and a stand-in tokenizer, plus
a few drawn images and conversations about them to generate from and fine-tune on:

    DIR/model/           transformers checkpoint: config.json, model.safetensors, tokenizer.json, ...
    DIR/data/images/     three drawn PNG images
    DIR/data/train.jsonl six conversations about them; eval.jsonl: three of them
    DIR/lfm2vl-example.json  what wrote the directory (a later run refuses any other non-empty DIR)

The released tokenizer.json cannot be shipped, so the stand-in is a small byte-level BPE trained here, with
every added token of the released `tokenizer_config.json` at the id that file lists (pad 0, bos 1,
`<image>` 396, `<|img_row_R_col_C|>` 397.., `<|image_start|>` 498, ...); unreachable `<|filler_N|>`
tokens pad the vocabulary to the checkpoint's size. Random weights pick such fillers (or tokens that
decode to nothing) as often as anything: their answers are noise, whatever the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..config import ATTENTION, CONV, Lfm2VlConfig, load_config
from ..errors import Lfm2VlError
from ..nn.params import ParamSpec, is_spec, param_specs
from .export import save_hf_checkpoint

SIZES = ("tiny", "450m", "1.6b")
FAMILIES = ("lfm2-vl", "lfm2.5-vl")
# config.json and processor files of the released checkpoints (see tests/data/reference/README.md for
# their provenance); a 1.6B directory holds only what differs from its family's 450M one.
RELEASED_DIR = Path(__file__).resolve().parent / "released"
PROCESSOR_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)
MARKER = "lfm2vl-example.json"

_CORPUS = """\
Describe this image in detail. What is shown in the picture? The photo shows a woman in a naval uniform.
A logo with blue letters on a white background. A gift box wrapped in blue paper with a ribbon.
How many objects are there in the scene? There are three objects: a cat, a dog and a small red ball.
Please answer the question about the image. You are a helpful assistant that describes pictures.
The quick brown fox jumps over the lazy dog. Grace Hopper was a computer scientist and admiral.
def main():\n    print("hello world")\n    return 0\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025. Punctuation: , . ! ? ; : ' " ( ) [ ] { } - _ / \\
Élan, naïve, café, Zürich, 東京, 北京, Москва, emoji 🙂 and symbols ± × ÷ ≤ ≥.
"""

QUESTIONS_AND_ANSWERS = {
    "stop_sign.png": [
        (
            "What is in this image?",
            "A red octagonal stop sign with white letters on a grey pole, under a blue sky.",
        ),
        ("What does the sign say?", "It says STOP, in white capital letters."),
    ],
    "gift_box.png": [
        ("Describe this image.", "A gift box wrapped in blue paper, tied with a yellow ribbon and a bow."),
        ("What is it for?", "It looks like a present, wrapped for a birthday or a holiday."),
    ],
    "sunset.png": [
        ("What does the image show?", "A yellow sun low over green hills, in an orange and purple sky."),
        ("What time of day is it?", "Evening: the sun is setting behind the hills."),
    ],
}


class ExampleError(Lfm2VlError):
    """`lfm2vl example` refused its arguments or its target directory."""


def released_files(family: str, size: str) -> dict[str, Path]:
    """name -> packaged file of the released `family` model of `size` (tiny: the 450M's files)."""
    own = RELEASED_DIR / f"{family}-{'450m' if size == 'tiny' else size}"
    base = RELEASED_DIR / f"{family}-450m"
    files = {}
    for name in ("config.json", *PROCESSOR_FILES):
        for directory in (own, base):
            if (directory / name).is_file():
                files[name] = directory / name
                break
    return files


def added_tokens(tokenizer_config: dict) -> dict[int, dict]:
    """The added tokens of a tokenizer config, by id. transformers 5's files (LFM2.5-VL) list none (they
    live in the released tokenizer.json only): those get the LFM2-VL-450M file's, the same ids as the
    public sources state."""
    listed = tokenizer_config.get("added_tokens_decoder")
    if listed is None:
        listed = json.loads((RELEASED_DIR / "lfm2-vl-450m" / "tokenizer_config.json").read_text())
        listed = listed["added_tokens_decoder"]
    return {int(i): spec for i, spec in listed.items()}


def build_tokenizer(
    tokenizer_config: dict,
    vocab_size: int = 65536,
    bpe_vocab_size: int = 1200,
    added: dict[int, dict] | None = None,
) -> Tokenizer:
    """Byte-level BPE with the added tokens (`added`, else the config's) at their ids; BPE tokens take the
    free ids from 0 up, `<|filler_N|>` the rest."""
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    trained_model = json.loads(trained.to_str())["model"]

    added = added if added is not None else added_tokens(tokenizer_config)
    free_ids = (i for i in range(vocab_size) if i not in added)
    vocab = {spec["content"]: i for i, spec in added.items()}
    for token, _ in sorted(trained_model["vocab"].items(), key=lambda item: item[1]):
        vocab[token] = next(free_ids)
    for i in free_ids:  # never produced: no merge leads to them
        vocab[f"<|filler_{i}|>"] = i

    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, **{k: v for k, v in s.items()}} for i, s in sorted(added.items())],
        "normalizer": None,
        "pre_tokenizer": json.loads(pre_tokenizers.ByteLevel(add_prefix_space=False).__getstate__()),
        "post_processor": json.loads(
            processors.TemplateProcessing(
                single=f"{tokenizer_config['bos_token']} $A",
                pair=f"{tokenizer_config['bos_token']} $A $B",
                special_tokens=[(tokenizer_config["bos_token"], vocab[tokenizer_config["bos_token"]])],
            ).__getstate__()
        ),
        "decoder": json.loads(decoders.ByteLevel().__getstate__()),
        "model": {**trained_model, "vocab": vocab},
    }
    return Tokenizer.from_str(json.dumps(spec))


def write_processor_files(directory: Path, family: str = "lfm2-vl", size: str = "450m") -> Path:
    """The released processor files of `family`/`size` and the stand-in tokenizer.json, into
    `directory` (created)."""
    files = released_files(family, size)
    directory.mkdir(parents=True, exist_ok=True)
    for name in PROCESSOR_FILES:
        if name in files:
            shutil.copyfile(files[name], directory / name)
    tokenizer_config = json.loads(files["tokenizer_config.json"].read_text())
    vocab_size = json.loads(files["config.json"].read_text())["text_config"]["vocab_size"]
    build_tokenizer(tokenizer_config, vocab_size=vocab_size).save(str(directory / "tokenizer.json"))
    return directory


def tiny_config(base: Lfm2VlConfig) -> Lfm2VlConfig:
    """`base` (a released config) with small widths and depths: everything the processor and the
    checkpoint format see (vocabulary, special ids, patch size, position grid, projector layout) kept."""
    return dataclasses.replace(
        base,
        vision=dataclasses.replace(
            base.vision, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2
        ),
        text=dataclasses.replace(
            base.text,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            layer_types=(CONV, CONV, ATTENTION, CONV),
        ),
        projector_hidden_size=64,
    )


def example_config(family: str, size: str) -> Lfm2VlConfig:
    config = load_config(released_files(family, size)["config.json"])
    return tiny_config(config) if size == "tiny" else config


def random_params(config: Lfm2VlConfig, seed: int = 0, dtype: Any = np.float32) -> Any:
    """Random weights as `init_params` draws them (kernels ~ N(0, 1/fan_in), unit norms), in numpy and
    `dtype`: no compilation (seconds per shape on a busy machine), one tensor at a time."""
    rng = np.random.default_rng(seed)

    def init(spec: ParamSpec) -> np.ndarray:
        if spec.init in ("ones", "zeros"):
            return np.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, dtype)
        return (spec.std * rng.standard_normal(spec.shape)).astype(dtype)

    return jax.tree.map(init, param_specs(config), is_leaf=is_spec)


def example_images() -> dict[str, Image.Image]:
    """The images the conversations are about, drawn here (no image files ship with the package)."""
    stop = Image.new("RGB", (320, 240), (120, 180, 235))
    draw = ImageDraw.Draw(stop)
    draw.rectangle((154, 150, 166, 240), fill=(110, 110, 110))
    draw.regular_polygon(
        (160, 95, 70), 8, rotation=22.5, fill=(200, 20, 30), outline=(255, 255, 255), width=5
    )
    draw.text((160, 95), "STOP", fill=(255, 255, 255), anchor="mm", font_size=30)

    gift = Image.new("RGB", (256, 256), (245, 245, 240))
    draw = ImageDraw.Draw(gift)
    draw.rectangle((48, 80, 208, 230), fill=(30, 80, 200))
    draw.rectangle((118, 80, 138, 230), fill=(250, 210, 40))
    draw.rectangle((48, 145, 208, 165), fill=(250, 210, 40))
    draw.ellipse((88, 45, 128, 85), outline=(250, 210, 40), width=8)
    draw.ellipse((128, 45, 168, 85), outline=(250, 210, 40), width=8)

    sunset = Image.new("RGB", (384, 256))
    draw = ImageDraw.Draw(sunset)
    for y in range(256):  # orange at the horizon to purple at the top
        t = y / 255
        draw.line((0, y, 384, y), fill=(int(110 + 140 * t), int(40 + 100 * t), int(140 - 100 * t)))
    draw.ellipse((150, 120, 234, 204), fill=(255, 220, 60))
    draw.ellipse((-80, 170, 220, 400), fill=(40, 130, 50))
    draw.ellipse((140, 180, 480, 420), fill=(30, 110, 40))
    return {"stop_sign.png": stop, "gift_box.png": gift, "sunset.png": sunset}


def conversations() -> list[dict]:
    """One record per question: system, user (image, then question) and assistant messages."""
    records = []
    for image, pairs in QUESTIONS_AND_ANSWERS.items():
        for question, answer in pairs:
            user = [{"type": "image", "image": f"images/{image}"}, {"type": "text", "text": question}]
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    return records


def check_example_target(directory: Path, overwrite: bool) -> None:
    """Refuses, before anything is written, a target that is not a directory, a non-empty directory an
    earlier `lfm2vl example` did not write, and (without `overwrite`) one it did."""
    if not os.path.lexists(directory):
        return
    if directory.is_symlink() or not directory.is_dir():
        raise ExampleError(f"{directory} exists and is not a directory; choose another destination")
    if not any(directory.iterdir()):
        return
    if not (directory / MARKER).is_file():
        raise ExampleError(
            f"{directory} is not empty and was not written by `lfm2vl example`; nothing was changed: choose "
            "a new or empty directory"
        )
    if not overwrite:
        raise ExampleError(
            f"{directory} already holds an example; pass --overwrite to rebuild it (only its model/ and "
            "data/ files are replaced, anything else there is kept)"
        )


def _write_atomically(path: Path, write: Any) -> None:
    """`write(temporary_path)` beside `path`, then renamed onto it: never a half-written file."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_example(
    directory: str | Path,
    size: str = "tiny",
    family: str = "lfm2-vl",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes DIR/model (a random-weight checkpoint of `family`'s `size`: "tiny", "450m" or "1.6b";
    float32 for tiny, bfloat16 as released otherwise) and DIR/data (images and conversations). Returns
    DIR/model."""
    if size not in SIZES:
        raise ExampleError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    if family not in FAMILIES:
        raise ExampleError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    directory = Path(directory)
    check_example_target(directory, overwrite)
    config = example_config(family, size)
    params = random_params(config, dtype=np.float32 if size == "tiny" else ml_dtypes.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    marker = {"family": family, "size": size, "written": ["model", "data", MARKER]}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    model = directory / "model"
    with tempfile.TemporaryDirectory(dir=directory, prefix=".processor-files.") as side_files:
        write_processor_files(Path(side_files), family, size)
        save_hf_checkpoint(
            model, config, params, source_dir=side_files, overwrite=overwrite, progress=progress
        )

    images = directory / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, image in example_images().items():
        _write_atomically(images / name, lambda path, image=image: image.save(path, format="PNG"))
    records = conversations()
    for name, chosen in (("train.jsonl", records), ("eval.jsonl", records[::2])):
        text = "".join(json.dumps(record) + "\n" for record in chosen)
        _write_atomically(directory / "data" / name, lambda path, text=text: path.write_text(text))
    return model
