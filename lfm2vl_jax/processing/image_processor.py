"""LFM2-VL image processor: a numpy + Pillow port of transformers' `Lfm2VlImageProcessor` (5.x).

Per image: convert to RGB uint8; if it is "too large" (area test below) resize it to a grid of
`tile_size` tiles chosen by aspect ratio and split it (row-major), adding a thumbnail at the smart-resize
size when `use_thumbnail`; otherwise smart-resize it whole. Resizing runs on uint8 (see `resize.py`),
then each tile is rescaled/normalised, cut into `encoder_patch_size` patches (patch row, patch col, then
pixel row, pixel col, channel) and zero-padded to `max_num_patches` with a 0/1 mask.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import read_json_object
from ..errors import Lfm2VlError
from ..memory import available_host_memory, gigabytes
from .resize import BILINEAR, RESAMPLE_NAMES, SUPPORTED_RESAMPLE, Normalization, RowSink, resize_streamed

ImageInput = Image.Image | np.ndarray | str | os.PathLike


MAX_TILES = 10_000  # tile grids are enumerated up to max_tiles (the released models use 10)


class ProcessorError(Lfm2VlError):
    """Bad input or configuration for the LFM2-VL processor."""


# ---------------------------------------------------------------------------------------------------------
# Loading: anything we accept -> (H, W, 3) uint8 RGB


def _check_size(width: int, height: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise ProcessorError(f"{label} is empty ({width}x{height} pixels)")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ProcessorError(
            f"{label} has {width}x{height} = {width * height} pixels, above Pillow's decompression-bomb "
            f"limit PIL.Image.MAX_IMAGE_PIXELS = {limit}; raise that limit if the image is trusted"
        )


def _pil_to_rgb(image: Image.Image, label: str) -> np.ndarray:
    _check_size(image.width, image.height, label)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ProcessorError(f"{label} could not be decoded: {error}") from error
    # transformers' convert_to_rgb: composite anything with alpha (or a transparent palette entry) on white.
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except ValueError as error:  # modes Pillow cannot convert to RGB (e.g. premultiplied "La", "RGBa")
        raise ProcessorError(
            f"{label}: PIL image mode {image.mode!r} cannot be converted to RGB ({error})"
        ) from None


def check_regular_file(path: str | os.PathLike, label: str) -> None:
    """Refuses, by name and without opening it, an image path that is not a regular file (links
    followed): opening a FIFO waits for a writer forever, a device may never end, a directory is no image."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ProcessorError(f"{label}: file not found") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise ProcessorError(f"{label}: cannot read it ({error})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )  # fmt: skip
        raise ProcessorError(f"{label} is {kind}, not an image file")


def _open_file(path: str | os.PathLike | BinaryIO, label: str) -> np.ndarray:
    if isinstance(path, (str, os.PathLike)):
        label = f"{label} ({os.fspath(path)!r})"
        check_regular_file(path, label)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; we refuse anything above it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image.width, image.height, label)
                image.load()
                # The reference decodes files with EXIF orientation applied.
                return _pil_to_rgb(ImageOps.exif_transpose(image), label)
    except ProcessorError:
        raise
    except FileNotFoundError as error:
        raise ProcessorError(f"{label}: file not found") from error
    except IsADirectoryError as error:
        raise ProcessorError(f"{label}: is a directory, not an image file") from error
    except UnidentifiedImageError as error:
        raise ProcessorError(f"{label}: not a readable image file (unknown or corrupt format)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ProcessorError(
            f"{label}: {error} (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; raise that limit if "
            "the image is trusted)"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises on truncated or bad data
        raise ProcessorError(f"{label} could not be decoded: {error}") from error


CHANNEL_FORMATS = ("channels_first", "channels_last")
_CHANNEL_COUNTS = (1, 3, 4)  # what transformers' image processors take as a channel axis


def _channels_last(array: np.ndarray, label: str, channel_format: str | None) -> np.ndarray:
    """(H, W) or a 3-D array with the channel axis first or last -> (H, W, C). Without `channel_format`
    the axis is inferred as transformers' `infer_channel_dimension_format` does with channel counts 1, 3
    and 4: the first axis if it can be one (so an ambiguous (3, H, 3) is channels-first), else the last."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        if channel_format is None:
            if array.shape[0] in _CHANNEL_COUNTS:
                channel_format = "channels_first"
            elif array.shape[2] in _CHANNEL_COUNTS:
                channel_format = "channels_last"
        axis = {"channels_first": 0, "channels_last": 2}.get(channel_format)
        if axis is not None and array.shape[axis] in _CHANNEL_COUNTS:
            return np.moveaxis(array, 0, 2) if axis == 0 else array
    where = f" ({channel_format})" if channel_format else ""
    raise ProcessorError(
        f"{label} is an array of shape {array.shape}{where}; expected (H, W), channels-last (H, W, C) or "
        "channels-first (C, H, W) with C in 1, 3, 4"
    )


def _array_to_rgb(array: np.ndarray, label: str, channel_format: str | None = None) -> np.ndarray:
    array = _channels_last(array, label, channel_format)
    _check_size(array.shape[1], array.shape[0], label)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ProcessorError(f"{label} is a float array with values outside [0, 1] (or not finite)")
        # The reference resizes on uint8, so float images are quantised first.
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ProcessorError(f"{label} has dtype {array.dtype}; expected uint8, or float in [0, 1]")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        # transformers' tensor convert_to_rgb, in float32: rgb * a + (1 - a), back with x * 255.999 truncated.
        scaled = array.astype(np.float32) * np.float32(1.0 / 255.0)
        rgb, alpha = scaled[:, :, :3], scaled[:, :, 3:]
        composite = rgb * alpha + (np.float32(1.0) - alpha)
        return (composite * np.float32(255.0 + 1.0 - 1e-3)).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_image(image: Any, label: str = "image", channel_format: str | None = None) -> np.ndarray:
    """A PIL image, array (numpy, or anything `np.asarray` reads: torch tensors, jax arrays), file path or
    binary file object as an (H, W, 3) uint8 RGB array.

    `label` names the image in errors. Arrays may be channels-first or channels-last (`channel_format`,
    else inferred as transformers infers it). Alpha (and a palette's transparent colour) is composited on
    white; files get their EXIF orientation applied; float arrays must lie in [0, 1] and are rounded to
    uint8."""
    if channel_format is not None and channel_format not in CHANNEL_FORMATS:
        raise ProcessorError(
            f"input_data_format must be one of {', '.join(CHANNEL_FORMATS)}, got {channel_format!r}"
        )
    if isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        return _open_file(image, label)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, label)
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        try:
            array = np.asarray(image)
        except (TypeError, ValueError, RuntimeError) as error:  # e.g. a tensor on a GPU or needing grad
            raise ProcessorError(
                f"{label} ({type(image).__name__}) cannot be read as a numpy array: {error}"
            ) from None
        return _array_to_rgb(array, label, channel_format)
    raise ProcessorError(
        f"{label} has unsupported type {type(image).__name__}; expected a PIL image, an array (numpy, torch, "
        "jax, ...) or a file path"
    )


# ---------------------------------------------------------------------------------------------------------
# Layout decisions (ported from transformers, Python float and rounding semantics kept)


def round_by_factor(number: float, factor: int) -> int:
    """Closest multiple of `factor`; Python's round, so halves go to the even multiple."""
    return round(number / factor) * factor


@lru_cache(maxsize=64)
def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols * rows <= max_tiles, by increasing tile count.

    Built as the reference builds it (list -> set -> stable sort by tile count), since among grids with the
    same tile count the order is the set's and it decides exact ties in find_closest_aspect_ratio. The
    reference's list, `(w, h) for n in range(min_tiles, max_tiles + 1) for w in range(1, n + 1) for h in
    range(1, n + 1)` filtered by tile count, holds each grid many times (cubic in max_tiles); a set built
    from the grids in order of first occurrence, at n = max(w, h, min_tiles), is the same set, same
    iteration order included (repeated additions leave a set's table as it was)."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(-(-min_tiles // w), max_tiles // w + 1)]
    grids.sort(key=lambda grid: (max(*grid, min_tiles), *grid))
    return sorted(set(grids), key=lambda ratio: ratio[0] * ratio[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: Sequence[tuple[int, int]], width: int, height: int, tile_size: int
) -> tuple[int, int]:
    """Grid (cols, rows) whose aspect is closest; on a tie the later (larger) grid wins if the image
    covers more than half of its area."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _real_numbers(value: Any, size: int, positive: bool) -> bool:
    """A finite real number, or (size > 1) a sequence of `size` of them; all > 0 if `positive`."""
    values = (
        list(value) if size > 1 and isinstance(value, (list, tuple)) and len(value) in (1, size) else [value]
    )
    return all(
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v)
        and (v > 0 or not positive)
        for v in values
    )


class Lfm2VlImageProcessor:
    """Turns images into LFM2-VL `pixel_values`, `pixel_attention_mask` and `spatial_shapes`."""

    # config keys this processor reads from processor_config.json / preprocessor_config.json
    config_keys = (
        "downsample_factor",
        "do_image_splitting",
        "min_tiles",
        "max_tiles",
        "use_thumbnail",
        "min_image_tokens",
        "max_image_tokens",
        "encoder_patch_size",
        "tile_size",
        "max_pixels_tolerance",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_pad",
        "do_convert_rgb",
    )

    def __init__(
        self,
        *,
        downsample_factor: int = 2,
        do_image_splitting: bool = True,
        min_tiles: int = 2,
        max_tiles: int = 10,
        use_thumbnail: bool = True,
        min_image_tokens: int = 64,
        max_image_tokens: int = 256,
        encoder_patch_size: int = 16,
        tile_size: int = 512,
        max_pixels_tolerance: float = 2.0,
        resample: int = BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = (0.5, 0.5, 0.5),
        image_std: float | Sequence[float] = (0.5, 0.5, 0.5),
        do_pad: bool = True,
        do_convert_rgb: bool | None = None,
    ) -> None:
        for name, value in (
            ("downsample_factor", downsample_factor),
            ("min_tiles", min_tiles),
            ("max_tiles", max_tiles),
            ("min_image_tokens", min_image_tokens),
            ("max_image_tokens", max_image_tokens),
            ("encoder_patch_size", encoder_patch_size),
            ("tile_size", tile_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProcessorError(
                    f"image processor config: {name} must be a positive integer, not {value!r}"
                )
        for name, value in (
            ("do_image_splitting", do_image_splitting),
            ("use_thumbnail", use_thumbnail),
            ("do_rescale", do_rescale),
            ("do_normalize", do_normalize),
            ("do_pad", do_pad),
            ("do_convert_rgb", True if do_convert_rgb is None else do_convert_rgb),
        ):
            if not isinstance(value, (bool, np.bool_)):
                raise ProcessorError(f"image processor config: {name} must be true or false, not {value!r}")
        for name, value, size in (
            ("max_pixels_tolerance", max_pixels_tolerance, 1),
            ("rescale_factor", rescale_factor, 1),
            ("image_std", image_std, 3),
            ("image_mean", image_mean, 3),
        ):
            if not _real_numbers(value, size, positive=name != "image_mean"):
                kind = "a positive number" if size == 1 else f"a number or {size} numbers"
                raise ProcessorError(
                    f"image processor config: {name} must be {kind}"
                    f"{', all positive' if name == 'image_std' else ''}, not {value!r}"
                )
        if tile_size % encoder_patch_size:
            raise ProcessorError(
                f"image processor config: tile_size ({tile_size}) is not a multiple of encoder_patch_size "
                f"({encoder_patch_size})"
            )
        if do_image_splitting and min_tiles > max_tiles:
            raise ProcessorError(f"image processor config: min_tiles ({min_tiles}) > max_tiles ({max_tiles})")
        if max_tiles > MAX_TILES:
            raise ProcessorError(
                f"image processor config: max_tiles ({max_tiles}) is above the {MAX_TILES} supported"
            )
        if min_image_tokens > max_image_tokens:
            raise ProcessorError(
                f"image processor config: min_image_tokens ({min_image_tokens}) > max_image_tokens "
                f"({max_image_tokens})"
            )
        if resample not in SUPPORTED_RESAMPLE:
            supported = ", ".join(f"{value} ({RESAMPLE_NAMES[value]})" for value in SUPPORTED_RESAMPLE)
            raise ProcessorError(
                f"image processor config: resample={resample!r} is not supported; the reference supports "
                f"{supported}"
            )
        if not do_pad:
            raise ProcessorError("image processor config: do_pad=false is not supported (the model needs it)")
        if do_convert_rgb is False:
            raise ProcessorError("image processor config: do_convert_rgb=false is not supported (RGB model)")
        self.downsample_factor = downsample_factor
        self.do_image_splitting = bool(do_image_splitting)
        self.min_tiles = min_tiles
        self.max_tiles = max_tiles
        self.use_thumbnail = bool(use_thumbnail)
        self.min_image_tokens = min_image_tokens
        self.max_image_tokens = max_image_tokens
        self.encoder_patch_size = encoder_patch_size
        self.tile_size = tile_size
        self.max_pixels_tolerance = float(max_pixels_tolerance)
        self.resample = int(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = tuple(float(v) for v in np.broadcast_to(np.asarray(image_mean, dtype=float), (3,)))
        self.image_std = tuple(float(v) for v in np.broadcast_to(np.asarray(image_std, dtype=float), (3,)))
        self.do_pad = True
        self.do_convert_rgb = do_convert_rgb
        with np.errstate(all="ignore"):  # pixels 0 and 255 must normalise to finite float32 values
            self._channel_scale, self._channel_offset = self._normalisation_constants()
            extremes = (np.float32([[0.0], [255.0]]) - self._channel_offset) / self._channel_scale
        if not np.isfinite(extremes).all():
            raise ProcessorError(
                "image processor config: image_mean, image_std and rescale_factor give non-finite pixel "
                f"values in float32 (mean {list(self.image_mean)}, std {list(self.image_std)}, "
                f"rescale_factor {self.rescale_factor})"
            )
        most_tiles = self.max_tiles + self.use_thumbnail if self.do_image_splitting else 1
        self._check_memory(most_tiles, "one image at these settings (max_tiles, tile_size, max_image_tokens)")

    # -- configuration ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> Lfm2VlImageProcessor:
        """Build from a config dict; keys that are not image-processor settings are ignored."""
        values = {key: config[key] for key in cls.config_keys if config.get(key) is not None}
        values.update(overrides)
        return cls(**values)

    def with_options(self, options: Mapping[str, Any]) -> Lfm2VlImageProcessor:
        """This processor with some settings replaced for one call (transformers' per-call image kwargs:
        `do_image_splitting`, `min_image_tokens`, `max_image_tokens`, `use_thumbnail`, ...; None keeps the
        setting), validated as the constructor validates a checkpoint's settings."""
        options = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(options) - set(self.config_keys))
        if unknown:
            raise ProcessorError(
                f"unknown image option(s): {', '.join(unknown)}; supported: {', '.join(self.config_keys)}"
            )
        if not options:
            return self
        try:
            return type(self).from_dict(self.to_dict(), **options)
        except ProcessorError as error:  # the constructor names the setting; say it came from this call
            message = str(error).removeprefix("image processor config: ")
            raise ProcessorError(f"image option(s) {options}: {message}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Lfm2VlImageProcessor:
        """Read `preprocessor_config.json` then `processor_config.json` (later files win) from a directory."""
        return cls.from_dict(read_image_processor_config(Path(path)), **overrides)

    def to_dict(self) -> dict[str, Any]:
        values = {key: getattr(self, key) for key in self.config_keys}
        values["image_mean"] = list(self.image_mean)
        values["image_std"] = list(self.image_std)
        return values

    @property
    def max_num_patches(self) -> int:
        """Patches per padded row of `pixel_values`: as the reference derives it, not from the config."""
        thumbnail_patches = self.max_image_tokens * self.downsample_factor**2
        tile_patches = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(thumbnail_patches, tile_patches)

    def _normalisation_constants(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float32 (scale, offset) such that pixel = (x - offset) / scale, matching the
        reference's fused rescale+normalise (mean and std multiplied by 1/rescale_factor in float32)."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        if self.do_rescale and self.do_normalize:
            inverse = np.float32(1.0 / self.rescale_factor)
            return std * inverse, mean * inverse
        if self.do_normalize:
            return std, mean
        return np.ones(3, np.float32), np.zeros(3, np.float32)

    def _check_memory(self, tiles: int, what: str) -> None:
        """Refuses, before anything is allocated, `tiles` rows of pixel values (each row also bounds the
        uint8 tile it is cut from) beyond the memory the host has available."""
        needed = tiles * self.max_num_patches * 3 * self.encoder_patch_size**2 * 4  # float32
        available = available_host_memory()
        if available is not None and needed > available:
            raise ProcessorError(
                f"{what} would need {tiles} x {self.max_num_patches} patches of pixel values, "
                f"{gigabytes(needed)}, more than the {gigabytes(available)} of memory available"
            )

    def num_tiles(self, height: int, width: int) -> int:
        """Rows of `pixel_values` an image of this size becomes (its tiles and thumbnail, or one)."""
        grid = self.grid_layout(height, width)
        if grid is None:
            return 1
        rows, cols = grid
        return rows * cols + (self.use_thumbnail and rows * cols != 1)

    # -- layout ----------------------------------------------------------------------------------------

    def smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """(height, width), multiples of patch * downsample, area within the min/max image-token budget."""
        factor = self.encoder_patch_size * self.downsample_factor
        min_pixels = self.min_image_tokens * self.encoder_patch_size**2 * self.downsample_factor**2
        max_pixels = self.max_image_tokens * self.encoder_patch_size**2 * self.downsample_factor**2
        h_bar = max(factor, round_by_factor(height, factor))
        w_bar = max(factor, round_by_factor(width, factor))
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt((height * width) / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def is_image_too_large(self, height: int, width: int) -> bool:
        """Area test (not per dimension); note the floor is one patch, not patch * downsample."""
        factor = self.encoder_patch_size * self.downsample_factor
        h_bar = max(self.encoder_patch_size, round_by_factor(height, factor))
        w_bar = max(self.encoder_patch_size, round_by_factor(width, factor))
        limit = (
            self.max_image_tokens
            * self.encoder_patch_size**2
            * self.downsample_factor**2
            * self.max_pixels_tolerance
        )
        return h_bar * w_bar > limit

    def grid_layout(self, height: int, width: int) -> tuple[int, int] | None:
        """(rows, cols) of tiles when the image is split, None when it is resized whole."""
        splitting = self.do_image_splitting and not (self.min_tiles == self.max_tiles == 1)
        if not (splitting and self.is_image_too_large(height, width)):
            return None
        cols, rows = find_closest_aspect_ratio(
            width / height, target_ratios(self.min_tiles, self.max_tiles), width, height, self.tile_size
        )
        return rows, cols

    def image_num_tokens(self, resized_size: tuple[int, int]) -> tuple[int, int]:
        """(tokens per tile, tokens of the whole-image view at `resized_size`: the single image or the
        thumbnail); a token is a downsample x downsample group of patches."""
        per_tile = math.ceil((self.tile_size // self.encoder_patch_size) / self.downsample_factor) ** 2
        height, width = resized_size
        whole = math.ceil((height // self.encoder_patch_size) / self.downsample_factor) * math.ceil(
            (width // self.encoder_patch_size) / self.downsample_factor
        )
        return per_tile, whole

    def layout(self, height: int, width: int) -> tuple[int, int, tuple[int, int]]:
        """(tile rows, tile cols, smart-resize size, which is the thumbnail's or the whole image's size); one
        row and column when the image is resized whole."""
        rows, cols = self.grid_layout(height, width) or (1, 1)
        return rows, cols, self.smart_resize(height, width)

    def views(self, height: int, width: int) -> list[tuple[tuple[int, int], int, int]]:
        """The resized views of an image in model order, each ((height, width), tile rows, tile cols): the
        grid cut into tiles of `tile_size` (row-major), then the thumbnail; or the whole image, resized."""
        grid = self.grid_layout(height, width)
        whole = self.smart_resize(height, width)
        if grid is None:
            return [(whole, 1, 1)]
        rows, cols = grid
        views = [((rows * self.tile_size, cols * self.tile_size), rows, cols)]
        if self.use_thumbnail and rows * cols != 1:
            views.append((whole, 1, 1))
        return views

    # -- pixels ----------------------------------------------------------------------------------------

    def _patch_writer(self, out: np.ndarray, grid: tuple[int, int], tile: tuple[int, int]) -> RowSink:
        """A sink for the rows of a resized view cut into a (rows, cols) `grid` of (height, width) `tile`s:
        writes them into `out` (one row per tile, max_num_patches x p*p*3), one patch per row in (patch row,
        patch col) order, each laid out as (pixel row, pixel col, channel)."""
        p = self.encoder_patch_size
        (rows, cols), (tile_height, tile_width) = grid, tile
        patch_rows, patch_cols = tile_height // p, tile_width // p
        patches = out[:, : patch_rows * patch_cols].reshape(rows, cols, patch_rows, patch_cols, p, p * 3)

        def write(start: int, values: np.ndarray) -> None:
            # values: (n, cols * tile_width * 3) pixel rows start.. of the view; split where a patch row ends
            y, stop = start, start + len(values)
            while y < stop:
                row, tile_y = divmod(y, tile_height)
                patch_row, pixel_row = divmod(tile_y, p)
                n = min(stop - y, p - pixel_row)
                if patch_row < patch_rows:  # rows past the last whole patch are not used
                    block = values[y - start : y - start + n].reshape(n, cols, tile_width * 3)
                    block = block[:, :, : patch_cols * p * 3].reshape(n, cols, patch_cols, p * 3)
                    np.copyto(
                        patches[row, :, patch_row, :, pixel_row : pixel_row + n], block.transpose(1, 2, 0, 3)
                    )
                y += n

        return write

    def preprocess(self, images: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> dict[str, Any]:
        """Process already-loaded (H, W, 3) uint8 RGB images (see `load_image`); `labels` name them in
        errors. Returns the model inputs and, per image, its tile rows, cols and smart-resize size."""
        labels = labels or [f"image {index}" for index in range(len(images))]
        tiles = sum(self.num_tiles(*image.shape[:2]) for image in images)
        self._check_memory(tiles, f"{len(images)} image(s)")
        p = self.encoder_patch_size
        max_patches = self.max_num_patches
        # every row is written up to its tile's patch count and zeroed past it
        pixel_values = np.empty((tiles, max_patches, 3 * p * p), dtype=np.float32)
        pixel_attention_mask = np.zeros((tiles, max_patches), dtype=np.int32)
        spatial_shapes = np.zeros((tiles, 2), dtype=np.int64)
        normalization = Normalization(self._channel_offset, self._channel_scale)
        row = 0
        for image, label in zip(images, labels, strict=True):
            targets: list[tuple[tuple[int, int], RowSink]] = []
            for (height, width), grid_rows, grid_cols in self.views(*image.shape[:2]):
                tile = (height // grid_rows, width // grid_cols)
                patch_rows, patch_cols = tile[0] // p, tile[1] // p
                if patch_rows * patch_cols > max_patches:
                    raise ProcessorError(
                        f"{label} ({image.shape[1]}x{image.shape[0]}) resizes to {tile[1]}x{tile[0]}: "
                        f"{patch_rows * patch_cols} patches, more than max_num_patches={max_patches}: its "
                        "aspect ratio is too extreme for this configuration (the reference returns it "
                        "unpadded, inconsistent with its mask)"
                    )
                rows = slice(row, row + grid_rows * grid_cols)
                pixel_values[rows, patch_rows * patch_cols :] = 0.0
                pixel_attention_mask[rows, : patch_rows * patch_cols] = 1
                spatial_shapes[rows] = (patch_rows, patch_cols)
                targets.append(
                    ((height, width), self._patch_writer(pixel_values[rows], (grid_rows, grid_cols), tile))
                )
                row = rows.stop
            resize_streamed(image, targets, self.resample, normalization)
        layouts = [self.layout(*image.shape[:2]) for image in images]
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_attention_mask,
            "spatial_shapes": spatial_shapes,
            "image_rows": [rows for rows, _, _ in layouts],
            "image_cols": [cols for _, cols, _ in layouts],
            "image_sizes": [list(size) for *_, size in layouts],
        }

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> dict[str, Any]:
        """Process one image or a flat list of images (PIL images, arrays or file paths)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        loaded = [load_image(image, f"image {index}") for index, image in enumerate(images)]
        return self.preprocess(loaded)


def read_image_processor_config(directory: Path) -> dict[str, Any]:
    """Merged image-processor settings of a checkpoint directory: preprocessor_config.json, then the flat
    keys of processor_config.json, then its nested "image_processor" dict (later wins)."""
    config: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        data = read_json_object(directory / name, ProcessorError)
        if data is None:
            continue
        nested = data.get("image_processor") or {}
        if not isinstance(nested, dict):
            raise ProcessorError(f"{directory / name}: image_processor must be an object, got {nested!r:.60}")
        config.update({k: v for k, v in data.items() if k != "image_processor"})
        config.update(nested)
    return config
