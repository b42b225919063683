"""Numpy port of the uint8 image resize that transformers' LFM2-VL image processor runs.

The reference resizes uint8 CHW tensors with ``torchvision.transforms.v2.functional.resize(antialias=True)``.
On CPUs with AVX2 (or ARM) torchvision hands uint8 straight to PyTorch's separable antialiased kernel
(``aten/src/ATen/native/cpu/UpSampleKernel.cpp`` + ``UpSampleKernelAVXAntialias.h``, itself a port of
Pillow-SIMD's ``Resample.c``), which works in integers:

1. per output index ``i`` along one axis: ``center = scale * (i + 0.5)`` with ``scale = in / out``, a window
   ``[xmin, xmin + xsize)`` of ``support = taps / 2 * max(scale, 1)`` either side, and filter weights
   ``f((j + xmin - center + 0.5) / max(scale, 1))`` normalised to sum to one (all in float64);
2. the weights are quantised to int16 with ``p`` fractional bits, ``p`` the largest that keeps the
   biggest weight below 2**15 (at most 22);
3. each output value is ``clamp((2**(p-1) + sum_j w_j * x_j) >> p, 0, 255)``: exact integer arithmetic;
4. the horizontal pass runs first (only if the width changes), its uint8 result feeds the vertical pass.

Reproducing those integer steps gives the same bytes as the reference; Pillow's own ``resize`` uses a
different rounding and agrees on only ~77% of values for slight upscales.

Each pass here is a product with a banded matrix of those integer weights, done by BLAS in floating point,
one block of output indices at a time against the dense slice of the input window that block reads. It is
exact: the weights are scaled by the power of two ``2**-p``, so every product and partial sum is an integer
times ``2**-p`` whose integer part stays below ``255 * sum|w| + 2**(p-1)``; while that bound is below 2**24
float32 holds all of them exactly (in any summation order, fused or not), otherwise the pass runs in float64
(exact below 2**53). ``floor(acc + 0.5)`` clipped to [0, 255] is then the reference's rounding shift.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import Any, NamedTuple

import numpy as np
from threadpoolctl import ThreadpoolController

# Pillow's resampling constants, as checkpoints store them in `resample`.
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
RESAMPLE_NAMES = {
    NEAREST: "nearest",
    LANCZOS: "lanczos",
    BILINEAR: "bilinear",
    BICUBIC: "bicubic",
    BOX: "box",
    HAMMING: "hamming",
}
# what torchvision resizes tensors with (box and hamming are PIL-only)
SUPPORTED_RESAMPLE = (NEAREST, LANCZOS, BILINEAR, BICUBIC)


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution with a = -0.5 (Pillow's choice), same operation order as PyTorch.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(np.pi * x) / (np.pi * x))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, _sinc(x) * _sinc(x / 3.0), 0.0)


# filter function and its number of taps at scale 1 (PyTorch's `interp_size`)
_AA_FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    BILINEAR: (_triangle, 2),
    BICUBIC: (_keys_cubic, 4),
    LANCZOS: (_lanczos3, 6),
}


@lru_cache(maxsize=512)
def _int16_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Window start indices (out, taps), int32 weights (out, taps) and their precision in bits."""
    filter_fn, interp_size = _AA_FILTERS[resample]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1

    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C casts truncate toward zero.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin

    j = np.arange(taps, dtype=np.int64)
    weights = filter_fn(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale)
    weights = np.where(j[None, :] < xsize[:, None], weights, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(taps):  # sequential sum, as the C loop does
        total += weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)

    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    int_weights = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)

    indices = np.minimum(xmin[:, None] + j[None, :], in_size - 1)  # padded taps carry weight 0
    return indices, int_weights, precision


# Output indices per product: measured best on x86-64 between 8 and 32 (larger blocks read wider windows
# of zeros, smaller ones pay numpy's per-call overhead more often).
_BLOCK = 16


class _Pass(NamedTuple):
    """One resampling pass: per block of output indices (start, stop, window start, window stop, weights
    (stop - start, window) scaled by 2**-p), the float dtype that keeps it exact, and whether results can
    fall below 0 (negative weights) or above 255 (weights summing to more than 2**p), i.e. need clipping."""

    blocks: tuple[tuple[int, int, int, int, np.ndarray], ...]
    dtype: type
    clip_low: bool
    clip_high: bool


@lru_cache(maxsize=256)
def _pass(in_size: int, out_size: int, resample: int) -> _Pass:
    indices, weights, precision = _int16_weights(in_size, out_size, resample)
    dense = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.repeat(np.arange(out_size), indices.shape[1])
    np.add.at(dense, (rows, indices.ravel()), weights.ravel())  # padded taps add weight 0
    half = 1 << (precision - 1)
    positive = np.where(dense > 0, dense, 0.0).sum(axis=1).max()
    negative = np.where(dense < 0, -dense, 0.0).sum(axis=1).max()
    dtype = np.float32 if 255 * (positive + negative) + half < 2**24 else np.float64
    clip_low = half - 255 * negative < 0
    clip_high = 255 * positive + half >= 256 << precision
    dense *= 2.0**-precision
    nonzero = dense != 0.0
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), in_size)
    last = np.where(nonzero.any(axis=1), in_size - nonzero[:, ::-1].argmax(axis=1), 0)
    blocks = []
    for start in range(0, out_size, _BLOCK):
        stop = min(start + _BLOCK, out_size)
        lo = int(first[start:stop].min())
        hi = max(int(last[start:stop].max()), lo + 1)
        lo = min(lo, hi - 1)
        block = np.ascontiguousarray(dense[start:stop, lo:hi], dtype=dtype)
        block.flags.writeable = False  # shared through the cache
        blocks.append((start, stop, lo, hi, block))
    return _Pass(tuple(blocks), dtype, bool(clip_low), bool(clip_high))


def _round_clip(pass_: _Pass, acc: np.ndarray, out: np.ndarray) -> None:
    """out = clamp(floor(acc + 0.5), 0, 255), with acc = sum * 2**-p: the reference's
    `clamp((2**(p-1) + sum) >> p)`; clamps only where the pass's weights can leave [0, 255]."""
    np.add(acc, 0.5, out=acc)
    if not (pass_.clip_low or pass_.clip_high):
        np.floor(acc, out=out, casting="same_kind")
        return
    np.floor(acc, out=acc)
    low, high = (0.0 if pass_.clip_low else None), (255.0 if pass_.clip_high else None)
    np.clip(acc, low, high, out=out, casting="same_kind")


class Normalization(NamedTuple):
    """Per-channel float32 `offset` and `scale`: pixel values become (x - offset) / scale, computed as two
    float32 operations in that order (as the reference's fused rescale and normalise)."""

    offset: np.ndarray
    scale: np.ndarray

    def tiled(self, length: int) -> Normalization:
        """The constants repeated along rows of `length` values (pixels, channels last)."""
        repeats = length // self.offset.size
        return Normalization(np.tile(self.offset, repeats), np.tile(self.scale, repeats))

    def __call__(self, values: np.ndarray) -> None:
        """In place; the constants broadcast along `values`' last axis."""
        np.subtract(values, self.offset, out=values)
        np.divide(values, self.scale, out=values)


# Receives (first row, rows): finished rows of a resized image, (n, width * channels) float32, valid only
# during the call; called from several threads at once for disjoint row ranges.
RowSink = Callable[[int, np.ndarray], None]


def _apply_blocks(
    pass_: _Pass,
    blocks: range,
    source: np.ndarray,
    out: np.ndarray,
    normalize: Normalization | None,
    sink: RowSink | None,
) -> None:
    acc = out if out.dtype == pass_.dtype else np.empty((_BLOCK, out.shape[1]), dtype=pass_.dtype)
    for start, stop, lo, hi, weights in pass_.blocks[blocks.start : blocks.stop]:
        block = acc[start:stop] if acc is out else acc[: stop - start]
        np.matmul(weights, source[:, lo:hi].T, out=block)
        _round_clip(pass_, block, out[start:stop])
        if normalize is not None:
            normalize(out[start:stop])
        if sink is not None:
            sink(start, out[start:stop])


def _apply(
    pass_: _Pass,
    source: np.ndarray,
    out: np.ndarray,
    normalization: Normalization | None = None,
    sink: RowSink | None = None,
) -> None:
    """out[i, :] = round_clip(sum_j w[i, j] * source[:, j]) for 2-D `source` (rows, in): the input index runs
    along source's rows, so both passes are (block x window) @ (window x rows) products with a long N. Then
    `normalization` (out's rows being pixels, channels last) and `sink`, while each block is in cache. Large
    passes split their blocks over threads, BLAS being single-threaded meanwhile (`_single_threaded_blas`)."""
    normalize = normalization.tiled(out.shape[1]) if normalization is not None else None
    workers = max(1, min(_WORKERS, out.size // _MIN_TASK_SIZE, len(pass_.blocks)))
    bounds = np.linspace(0, len(pass_.blocks), workers + 1).astype(int).tolist()
    _in_parallel(
        [
            partial(_apply_blocks, pass_, range(lo, hi), source, out, normalize, sink)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspects every loaded library: ~0.5 ms once torch is loaded


class _SingleThreadedBlas:
    """Context: BLAS on one thread while any thread of ours resizes. Our products are small, so BLAS threads
    gain little on them, spin-wait between calls, and once more threads than cores compete (our workers,
    other processes) make calls many times slower (measured 10-50x on a loaded 2-core machine). BLAS has
    only a process-wide setting: the first thread in sets it, the last one out restores it (nested or
    concurrent resizes would otherwise restore each other's limit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limiter: Any = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._limiter = _blas_controller().limit(limits=1, user_api="blas")
            self._users += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


_single_threaded_blas = _SingleThreadedBlas()


def _in_parallel(tasks: list[Callable[[], None]]) -> None:
    """Run `tasks` on the thread pool, the last one on this thread (which would otherwise only wait)."""
    futures = [_thread_pool().submit(task) for task in tasks[:-1]]
    try:
        tasks[-1]()
    finally:  # never leave tasks writing into buffers that the next call reuses
        for future in futures:
            future.result()


def _copy_rows(out: np.ndarray, source: np.ndarray) -> None:
    """np.copyto(out, source) for arrays of matching leading axis, in row bands over threads (numpy's strided
    casting copy runs well below memory speed, and without the GIL)."""
    workers = max(1, min(_WORKERS, out.size // _MIN_TASK_SIZE, out.shape[0]))
    bounds = np.linspace(0, out.shape[0], workers + 1).astype(int).tolist()
    _in_parallel(
        [
            partial(np.copyto, out[lo:hi], source[lo:hi])
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
    )


_WORKERS = min(4, os.cpu_count() or 1)
_MIN_TASK_SIZE = 1 << 17  # output values per task below which a thread costs more than it saves


@lru_cache(maxsize=1)
def _thread_pool() -> ThreadPoolExecutor:
    # numpy releases the GIL inside matmul and ufuncs
    return ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="resize")


class _Scratch(threading.local):
    """Per-thread reusable buffers: fresh multi-megabyte arrays cost more in page faults than the products
    (the allocator hands large blocks back to the system on free)."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.size < size:
            buffer = self.buffers[name] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)


_scratch = _Scratch()
_PAD = 8  # see resize_float32


def _nearest_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # PyTorch's nearest-exact: floor((i + 0.5) * in/out) with the scale in float32.
    def source(in_size: int, out_size: int) -> np.ndarray:
        scale = np.float32(in_size / out_size)
        pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
        return np.minimum(np.floor(pos).astype(np.int64), in_size - 1)

    return image[source(image.shape[0], height)][:, source(image.shape[1], width)]


def _resize_into(
    image: np.ndarray,
    resample: int,
    out: np.ndarray,
    planar_sources: dict[type, np.ndarray],
    normalization: Normalization | None = None,
    sink: RowSink | None = None,
) -> None:
    """Resize uint8 (H, W, C) `image` into C-contiguous float32 `out` (height, width, C), normalise, and hand
    the rows to `sink`. `planar_sources` keeps the image's planar float copy per dtype for further sizes."""
    in_height, in_width, channels = image.shape
    height, width = out.shape[:2]
    flat_out = out.reshape(height, width * channels)
    normalize = normalization.tiled(width * channels) if normalization is not None else None
    if resample == NEAREST or (height == in_height and width == in_width):
        resized = _nearest_exact(image, height, width) if resample == NEAREST else image
        flat_resized = resized.reshape(height, width * channels)
        step = max(1, _MIN_TASK_SIZE // (width * channels))  # blocks that stay in cache, few numpy calls
        for start in range(0, height, step):
            rows = flat_out[start : start + step]
            np.copyto(rows, flat_resized[start : start + step])
            if normalize is not None:
                normalize(rows)
            if sink is not None:
                sink(start, rows)
        return
    if width == in_width:  # vertical pass only, straight on the (H, W*C) rows
        vertical = _pass(in_height, height, resample)
        rows = _scratch.get("rows", (in_height, in_width * channels), vertical.dtype)
        _copy_rows(rows, image.reshape(in_height, -1))
        _apply(vertical, rows.T, flat_out, normalization, sink)
        return
    # Horizontal pass on channel-planar rows: (C*H, W) -> (width, C*H), i.e. (width, C, H): its output has
    # the input height along rows, the layout the vertical pass reads, whose output is (height, width * C).
    # Rows are padded (zeros) so that no row stride is a multiple of 4 KiB: BLAS reads windows across rows
    # and such strides map them onto the same few cache sets.
    horizontal = _pass(in_width, width, resample)
    padded_height, padded_width = in_height + _PAD, in_width + _PAD
    planar = planar_sources.get(horizontal.dtype)
    if planar is None:
        name = f"planar {horizontal.dtype.__name__}"
        planar = _scratch.get(name, (channels, padded_height, padded_width), horizontal.dtype)
        _copy_rows(planar[:, :in_height, :in_width].transpose(1, 0, 2), image.transpose(0, 2, 1))
        planar[:, in_height:, :in_width] = 0.0
        planar_sources[horizontal.dtype] = planar
    source = planar.reshape(channels * padded_height, padded_width)[:, :in_width]
    if height == in_height:
        across = _scratch.get("across", (width, channels, padded_height), horizontal.dtype)
        _apply(horizontal, source, across.reshape(width, -1))
        np.copyto(out, across[:, :, :in_height].transpose(2, 0, 1))
        if normalize is not None:
            normalize(flat_out)
        if sink is not None:
            sink(0, flat_out)
        return
    vertical = _pass(in_height, height, resample)
    across = _scratch.get("across", (width, channels, padded_height), vertical.dtype)
    _apply(horizontal, source, across.reshape(width, -1))
    _apply(vertical, across.reshape(width * channels, padded_height), flat_out, normalization, sink)


def _check(image: np.ndarray, resample: int) -> None:
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize expects an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    if resample != NEAREST and resample not in _AA_FILTERS:
        raise ValueError(
            f"resample={resample} is not one of {SUPPORTED_RESAMPLE} (nearest, lanczos, bilinear, bicubic)"
        )


def resize_streamed(
    image: np.ndarray,
    targets: Sequence[tuple[tuple[int, int], RowSink]],
    resample: int = BILINEAR,
    normalization: Normalization | None = None,
) -> None:
    """Resize the (H, W, C) uint8 `image` to each target (height, width), exactly as the reference does on
    uint8, and hand the float32 rows (those integer values, normalised if `normalization` is given) to the
    target's sink block by block, while each block is in cache (see `RowSink`). The image's float copy is
    made once for all targets; buffers are per thread and reused."""
    _check(image, resample)
    planar_sources: dict[type, np.ndarray] = {}
    for (height, width), sink in targets:
        out = _scratch.get("out", (height, width, image.shape[2]), np.float32)
        with _single_threaded_blas:
            _resize_into(image, resample, out, planar_sources, normalization, sink)


def resize_float32(image: np.ndarray, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) exactly as the reference does on uint8, as a new
    float32 array of those integer values."""
    _check(image, resample)
    out = np.empty((height, width, image.shape[2]), dtype=np.float32)
    with _single_threaded_blas:
        _resize_into(image, resample, out, {})
    return out


def resize_uint8(image: np.ndarray, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) exactly as the reference does on uint8."""
    return resize_float32(image, height, width, resample).astype(np.uint8)
