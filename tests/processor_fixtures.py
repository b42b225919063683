"""Processor test material: a stand-in LFM2-VL tokenizer and checkpoint directory, transformers' reference
processor built from the same files, synthetic images and the pixel-parity check. Plain module, so that
benchmarks import it too (`sys.path` + `import processor_fixtures`).

No `tokenizer.json` of the released models is available offline: the stand-in is the one `lfm2vl example`
writes (`lfm2vl_jax.checkpoint.example.build_tokenizer`: a small byte-level BPE with every added token of
the reference `tokenizer_config.json` at the id that file lists, filler tokens up to the vocabulary
size), so both our processor and transformers' load the very same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lfm2vl_jax.checkpoint.example import added_tokens, build_tokenizer

TEST_DATA = Path(__file__).resolve().parent / "data"
REFERENCE_DIR = TEST_DATA / "reference"
IMAGES_DIR = TEST_DATA / "images"

CHECKPOINT_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
)

# a tool schema for chat templates that render tools (LFM2.5-VL)
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def reference_dir(name: str = "lfm2-vl-450m") -> Path:
    path = REFERENCE_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"reference configs not found at {path} (tests/data/reference in the repository)"
        )
    return path


def image_path(name: str) -> Path:
    path = IMAGES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"test image not found at {path} (tests/data/images in the repository)")
    return path


# A 3B-like vocabulary (LFM2.5-VL-3B's special-token ids): LFM2-VL's ids 0-13 move to 124893.. (pad 124893,
# bos 124894) and 396-500 to 124907.. (`<image>` 124907, rows from 124908, thumbnail 125008, image
# start/end 125009/125010), so that ordinary tokens sit where LFM2-VL's special ones were.
VOCAB_3B = 128_000


def ids_3b_like(token_id: int) -> int:
    if token_id <= 13:
        return token_id + 124_893
    if 396 <= token_id <= 500:
        return token_id + 124_511
    return token_id


def make_checkpoint_dir(out_dir: Path, reference: str = "lfm2-vl-450m", three_b_like: bool = False) -> Path:
    """Copy a reference checkpoint's processor files to `out_dir` and add the stand-in `tokenizer.json`
    (`three_b_like`: with the 3B's vocabulary size and special-token ids, see `ids_3b_like`)."""
    source = reference_dir(reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    vocab_size = json.loads((source / "config.json").read_text())["text_config"]["vocab_size"]
    added = added_tokens(tokenizer_config)
    if three_b_like:
        vocab_size, added = VOCAB_3B, {ids_3b_like(i): spec for i, spec in added.items()}
    tokenizer = build_tokenizer(tokenizer_config, vocab_size=vocab_size, added=added)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


def make_reference_processor(directory: Path, **image_overrides: Any) -> Any:
    """transformers' `Lfm2VlProcessor` from the files of `directory`.

    transformers cannot load the released 450M `preprocessor_config.json` (it names Siglip2ImageProcessor
    and then asks for remote code), so its image processor is built from the files' values directly, with
    `do_convert_rgb=True`: the files say null, with which the reference fails on non-RGB images.
    `image_overrides` replace file values (e.g. `resample=3`)."""
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor, PreTrainedTokenizerFast

    values: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (directory / name).is_file():
            values.update(json.loads((directory / name).read_text()))
    # `input_data_format: channels_last` (450M file) would make the reference permute the CHW tensors it
    # decodes file paths to; ours reads arrays as channels-last anyway.
    accepted = set(Lfm2VlImageProcessor.valid_kwargs.__annotations__) - {
        "return_tensors",
        "input_data_format",
    }
    image_kwargs = {key: value for key, value in values.items() if key in accepted and value is not None}
    image_kwargs.update(do_convert_rgb=True, **image_overrides)
    processor = Lfm2VlProcessor(
        image_processor=Lfm2VlImageProcessor(**image_kwargs),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(str(directory)),
        chat_template=(directory / "chat_template.jinja").read_text(),
    )
    # a processor-level setting the constructor does not take; __call__ reads the attribute
    processor.use_image_special_tokens = values.get("use_image_special_tokens", True)
    return processor


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic photo-like (H, W, 3) uint8: smooth gradients, edges and noise, so that every resize
    filter tap matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [
            127 + 100 * np.sin(x / max(width, 1) * 7 + y / max(height, 1) * 3),
            255 * x / max(width - 1, 1),
            np.where((x // 37 + y // 29) % 2 == 0, 60.0, 200.0),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


# one uint8 level, after (x/255 - 0.5) / 0.5 normalisation
PIXEL_TOLERANCE = 2 / 255
# share of pixel values that must be exactly equal to the reference's
MIN_EXACT_SHARE = 0.999
# case name -> share of exactly equal pixel values, printed at the end of the test session
PIXEL_PARITY: dict[str, float] = {}


def assert_processor_outputs_match(ours: dict[str, Any], reference: Any, case: str) -> None:
    """Token ids, masks and spatial shapes equal; pixel values within one uint8 step with >= 99.9% exact."""
    assert set(ours) == set(reference.keys()), (sorted(ours), sorted(reference.keys()))
    for key in ("input_ids", "attention_mask", "pixel_attention_mask", "spatial_shapes"):
        if key in ours:
            np.testing.assert_array_equal(ours[key], np.asarray(reference[key]), err_msg=f"{case}: {key}")
            assert ours[key].dtype == np.asarray(reference[key]).dtype, (case, key)
    if "pixel_values" in ours:
        assert_pixels_match(ours["pixel_values"], np.asarray(reference["pixel_values"]), case)


def assert_pixels_match(ours: np.ndarray, reference: np.ndarray, case: str) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype, (
        case,
        ours.shape,
        reference.shape,
    )
    exact = float(np.mean(ours == reference))
    worst = float(np.max(np.abs(ours - reference), initial=0.0))
    assert worst <= PIXEL_TOLERANCE + 1e-6, f"{case}: max |diff| {worst} is more than one uint8 step"
    assert exact >= MIN_EXACT_SHARE, f"{case}: only {exact:.5%} of pixel values equal the reference's"
    PIXEL_PARITY[case] = exact
