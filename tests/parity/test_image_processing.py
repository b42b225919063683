"""Image side of the processor against transformers' live reference: the uint8 resize kernel, the layout
matrix (tiny, tiling threshold, extreme aspect ratios, shared photos; thumbnail on and off), the resample
setting, every accepted input type, and bad images.

Pixel tolerance (see processor_fixtures): both sides resize on uint8, so a difference can only be one
uint8 level from rounding inside the resize, i.e. 2/255 after normalisation; at least 99.9% of values must
be exactly equal (the share per case is printed at the end of the run)."""

from __future__ import annotations

import io
import platform

import numpy as np
import pytest
import torch
from PIL import Image
from processor_fixtures import (
    assert_pixels_match,
    assert_processor_outputs_match,
    image_path,
    make_reference_processor,
    synthetic_image,
)
from torchvision.transforms.v2 import functional as tvF

from lfm2vl_jax.processing.image_processor import Lfm2VlImageProcessor, ProcessorError, load_image
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.processing.resize import (
    BICUBIC,
    BILINEAR,
    LANCZOS,
    NEAREST,
    Normalization,
    resize_streamed,
    resize_uint8,
)

PROMPT = "<|im_start|>user\n<image>Describe this image.<|im_end|>\n<|im_start|>assistant\n"

# torchvision hands uint8 to PyTorch's integer kernel only on these CPUs; elsewhere it resizes in float
# and rounds, which our port does not reproduce bit for bit (the 99.9% bar still applies).
NATIVE_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
    "aarch64",
    "arm64",
)


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC, LANCZOS, NEAREST])
@pytest.mark.parametrize(
    ("source", "target"),
    [((1, 1), (32, 32)), ((15, 40), (96, 256)), ((511, 511), (512, 512)), ((600, 512), (480, 416)),
     ((130, 542), (128, 512)), ((700, 90), (1536, 512)), ((97, 101), (37, 251)),
     ((3000, 300), (512, 64)),  # large downscales: both passes past float32's exact range, in float64
     ((100, 100), (100, 37)), ((100, 100), (37, 100))],  # one pass only: horizontal, vertical
)  # fmt: skip
def test_resize_matches_torchvision_uint8(resample: int, source: tuple, target: tuple) -> None:
    image = np.random.default_rng(sum(source + target)).integers(0, 256, (*source, 3), dtype=np.uint8)
    mode = {
        BILINEAR: tvF.InterpolationMode.BILINEAR,
        BICUBIC: tvF.InterpolationMode.BICUBIC,
        LANCZOS: tvF.InterpolationMode.LANCZOS,
        NEAREST: tvF.InterpolationMode.NEAREST_EXACT,
    }[resample]
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    reference = tvF.resize(chw, list(target), interpolation=mode, antialias=True).permute(1, 2, 0).numpy()
    ours = resize_uint8(image, *target, resample)
    if NATIVE_UINT8_RESIZE or resample == NEAREST:
        # same integer arithmetic (int16 weights, rounding shift, saturation): bit-exact on noise
        np.testing.assert_array_equal(ours, reference)
    else:
        assert np.abs(ours.astype(int) - reference).max() <= 1
        assert np.mean(ours == reference) >= 0.999


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
def test_streamed_resizes_share_work_and_normalise_like_the_reference(resample: int) -> None:
    """Several sizes from one image (the float copy is shared, float32 and float64 passes mixed, blocks on
    worker threads) each give torchvision's uint8 resize, normalised as (x - offset) / scale in float32."""
    image = np.random.default_rng(7).integers(0, 256, (300, 900, 3), dtype=np.uint8)
    sizes = [(512, 1536), (32, 96), (300, 128), (128, 900), (300, 900)]
    offset, scale = np.float32([127.5, 120.0, 100.0]), np.float32([127.5, 60.0, 50.0])
    results = [np.full((*size, 3), np.nan, np.float32) for size in sizes]

    def sink(result: np.ndarray):
        def write(start: int, rows: np.ndarray) -> None:
            result[start : start + len(rows)] = rows.reshape(len(rows), -1, 3)

        return write

    targets = [(size, sink(result)) for size, result in zip(sizes, results, strict=True)]
    resize_streamed(image, targets, resample, Normalization(offset, scale))
    mode = {BILINEAR: tvF.InterpolationMode.BILINEAR, BICUBIC: tvF.InterpolationMode.BICUBIC}[resample]
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    for size, result in zip(sizes, results, strict=True):
        reference = tvF.resize(chw, list(size), interpolation=mode, antialias=True).permute(1, 2, 0).numpy()
        expected = (reference.astype(np.float32) - offset) / scale
        if NATIVE_UINT8_RESIZE:
            np.testing.assert_array_equal(result, expected, err_msg=str(size))
        else:
            assert np.abs(result - expected).max() <= 1.01 / scale.min(), size


# (height, width): what each exercises
LAYOUT_CASES = {
    "1x1": (1, 1),  # tiny: upscaled to the minimum token budget
    "15x40": (15, 40),
    "511x511 upscale": (511, 511),  # slight upscale, where Pillow's BILINEAR disagrees most
    "720x720 under": (720, 720),  # 720/32 = 22.5 rounds to 22 (banker's): not too large
    "724x724 over": (724, 724),  # rounds to 736x736 > 2 x 256 tokens: split into tiles
    "1024x512 at limit": (1024, 512),  # area exactly at the limit: not too large
    "1024x528 over": (1024, 528),  # one dimension barely larger: area test says too large
    "1100x1100 tie": (1100, 1100),  # 2x2 and 3x3 fit equally; covers > half of 3x3, so 3x3 wins
    "3000x300": (3000, 300),  # extreme aspect ratios: 10x1 grid
    "300x3000": (300, 3000),
}


@pytest.mark.parametrize("thumbnail", [False, True], ids=["450m-no-thumbnail", "1.6b-thumbnail"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_matrix_matches_reference(case: str, thumbnail: bool, request: pytest.FixtureRequest) -> None:
    suffix = "_thumbnail" if thumbnail else ""
    ours = request.getfixturevalue("processor" + suffix)
    reference = request.getfixturevalue("reference_processor" + suffix)
    image = Image.fromarray(synthetic_image(*LAYOUT_CASES[case], seed=len(case)))
    expected = reference(images=[image], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(
        ours(images=[image], text=PROMPT), expected, f"{case} thumbnail={thumbnail}"
    )


@pytest.mark.parametrize("thumbnail", [False, True], ids=["450m-no-thumbnail", "1.6b-thumbnail"])
@pytest.mark.parametrize("name", ["grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"])
def test_shared_photos_match_reference(name: str, thumbnail: bool, request: pytest.FixtureRequest) -> None:
    suffix = "_thumbnail" if thumbnail else ""
    ours = request.getfixturevalue("processor" + suffix)
    reference = request.getfixturevalue("reference_processor" + suffix)
    with Image.open(image_path(name)) as image:
        image.load()
        expected = reference(images=[image], text=PROMPT, return_tensors="np")
        assert_processor_outputs_match(
            ours(images=[image], text=PROMPT), expected, f"{name} thumbnail={thumbnail}"
        )


@pytest.mark.parametrize("resample", [NEAREST, LANCZOS, BICUBIC])
def test_resample_setting_is_honoured(resample: int, checkpoint_450m) -> None:
    ours = Lfm2VlProcessor.from_pretrained(checkpoint_450m, resample=resample)
    reference = make_reference_processor(checkpoint_450m, resample=resample)
    image = Image.fromarray(synthetic_image(300, 700, seed=resample))  # a down- and an up-scaled axis
    result = ours(images=[image], text=PROMPT)
    expected = reference(images=[image], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(result, expected, f"resample={resample}")
    bilinear = Lfm2VlProcessor.from_pretrained(checkpoint_450m)(images=[image], text=PROMPT)
    assert not np.array_equal(result["pixel_values"], bilinear["pixel_values"])


PIL_MODES = ["RGB", "RGBA", "LA", "L", "P+transparency", "CMYK", "I;16"]


def _pil_variant(mode: str) -> Image.Image:
    with Image.open(image_path("Minduka_Present_Blue_Pack.png")) as rgba:
        rgba = rgba.convert("RGBA")
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    luminance = np.asarray(rgba.convert("L")).astype(np.uint16) * 257
    variants = {
        "RGB": lambda: rgba.convert("RGB"),
        "RGBA": lambda: rgba,
        "LA": lambda: rgba.convert("LA"),
        "L": lambda: rgba.convert("L"),
        "P+transparency": lambda: palette,
        "CMYK": lambda: rgba.convert("RGB").convert("CMYK"),
        "I;16": lambda: Image.fromarray(luminance.astype("<u2")),
    }
    image = variants[mode]()
    assert image.mode == mode.split("+")[0]
    return image


@pytest.mark.parametrize("mode", PIL_MODES)
def test_pil_modes_match_reference(mode: str, processor, reference_processor) -> None:
    image = _pil_variant(mode)
    expected = reference_processor(images=[image], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(processor(images=[image], text=PROMPT), expected, f"PIL {mode}")


@pytest.mark.parametrize("layout", ["HWC", "HW", "HW1", "HWC RGBA"])
def test_numpy_arrays_match_reference(layout: str, processor, reference_processor) -> None:
    rgb = synthetic_image(90, 150, seed=7)
    alpha = np.linspace(0, 255, 150, dtype=np.uint8)[None, :].repeat(90, axis=0)
    array = {
        "HWC": rgb,
        "HW": rgb[:, :, 0],
        "HW1": rgb[:, :, :1],
        "HWC RGBA": np.dstack([rgb, alpha]),
    }[layout]
    # the reference takes no 2-D arrays; (H, W, 1) is the same image for it
    reference_array = array[:, :, None] if array.ndim == 2 else array
    expected = reference_processor(images=[reference_array], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(processor(images=[array], text=PROMPT), expected, f"numpy {layout}")


def test_float_arrays_are_quantised_like_uint8(processor, reference_processor) -> None:
    # The reference resizes float arrays in float and then applies x/127.5 - 1 as if they were 0..255,
    # so [0, 1] floats come out near -1; we quantise them to uint8 and compare with the uint8 input.
    rgb = synthetic_image(90, 150, seed=8)
    ours = processor(images=[rgb.astype(np.float32) / 255], text=PROMPT)
    np.testing.assert_array_equal(ours["pixel_values"], processor(images=[rgb], text=PROMPT)["pixel_values"])
    expected = reference_processor(images=[rgb], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(ours, expected, "numpy float32 in [0, 1]")


def test_file_paths_match_reference(processor, reference_processor) -> None:
    path = image_path("grace_hopper.jpg")
    expected = reference_processor(images=[str(path)], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(
        processor(images=[str(path)], text=PROMPT), expected, "path grace_hopper.jpg"
    )


def test_transparent_file_is_composited_on_white(processor) -> None:
    # The reference decodes paths with torchvision, which drops alpha instead of compositing it as it does
    # for PIL images; we treat a path like the PIL image it holds.
    path = image_path("logo2.png")
    with Image.open(path) as image:
        from_pil = processor(images=[image], text=PROMPT)
    from_path = processor(images=[path], text=PROMPT)
    np.testing.assert_array_equal(from_path["pixel_values"], from_pil["pixel_values"])
    assert (load_image(path) == 255).all(axis=2).mean() > 0.5  # the transparent background turned white


def test_image_processor_reads_checkpoint_config(checkpoint_450m) -> None:
    import json

    config = json.loads((checkpoint_450m / "processor_config.json").read_text())
    preprocessor = json.loads((checkpoint_450m / "preprocessor_config.json").read_text())
    image_processor = Lfm2VlImageProcessor.from_pretrained(checkpoint_450m)
    for key in (
        "use_thumbnail",
        "tile_size",
        "min_tiles",
        "max_tiles",
        "max_image_tokens",
        "min_image_tokens",
    ):
        assert getattr(image_processor, key) == config[key], key
    assert image_processor.resample == preprocessor["resample"]
    assert image_processor.image_mean == tuple(preprocessor["image_mean"])
    assert image_processor.max_num_patches == config["max_num_patches"]
    assert Lfm2VlImageProcessor.from_pretrained(checkpoint_450m, use_thumbnail=True).use_thumbnail


# -- bad images ------------------------------------------------------------------------------------------


def test_missing_file(processor, tmp_path) -> None:
    with pytest.raises(ProcessorError, match=r"image 0 .*missing\.png.*file not found"):
        processor(images=[tmp_path / "missing.png"], text=PROMPT)


def test_corrupt_file(processor, tmp_path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png" * 10)
    with pytest.raises(ProcessorError, match=r"garbage\.png.*not a readable image"):
        processor(images=[garbage], text=PROMPT)


def test_truncated_file(processor, tmp_path) -> None:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_path("grace_hopper.jpg").read_bytes()[:20000])
    with pytest.raises(ProcessorError, match=r"truncated\.jpg.*could not be decoded"):
        processor(images=[truncated], text=PROMPT)


@pytest.mark.parametrize(
    "image", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0), np.uint8), Image.new("RGB", (0, 5))]
)
def test_zero_size_image(processor, image) -> None:
    with pytest.raises(ProcessorError, match=r"image 0 is empty"):
        processor(images=[image], text=PROMPT)


def test_decompression_bomb(processor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # grace_hopper.jpg has 307,200 pixels
    with pytest.raises(ProcessorError, match=r"grace_hopper\.jpg.*MAX_IMAGE_PIXELS = 100000"):
        processor(images=[image_path("grace_hopper.jpg")], text=PROMPT)
    with pytest.raises(ProcessorError, match=r"image 0 has 600x600 = 360000 pixels"):
        processor(images=[Image.new("RGB", (600, 600))], text=PROMPT)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros((8, 8, 3), np.int32), r"dtype int32"),
        (np.full((8, 8, 3), 2.0), r"outside \[0, 1\]"),
        (io.StringIO("text"), r"not a readable image|could not be decoded"),
        (42, r"unsupported type int"),
    ],
)
def test_unusable_inputs(processor, image, message: str) -> None:
    with pytest.raises(ProcessorError, match=message):
        processor(images=[image], text=PROMPT)


def test_aspect_ratio_beyond_max_num_patches(processor, reference_processor) -> None:
    sliver = Image.fromarray(synthetic_image(1, 10000))  # its thumbnail / whole view needs 6400 patches
    with pytest.raises(ProcessorError, match=r"image 0 \(10000x1\).*6400 patches.*max_num_patches=1024"):
        processor(images=[sliver], text=PROMPT)
    # the reference returns it unpadded: 6400 patch rows against a 1024-long mask
    expected = reference_processor(images=[sliver], text=PROMPT, return_tensors="np")
    assert expected["pixel_values"].shape[1] != expected["pixel_attention_mask"].shape[1]


def test_pixel_parity_helper_rejects_a_one_level_shift() -> None:
    values = np.zeros((1, 4, 3), np.float32)
    shifted = values.copy()
    shifted[0, 0, 0] += 2 / 255
    with pytest.raises(AssertionError, match="equal the reference"):
        assert_pixels_match(shifted, values, "helper self-check")
