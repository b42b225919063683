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
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

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


# Output rows per task: small enough that a task's int32 buffers stay in cache.
_BLOCK_ROWS = 64


@lru_cache(maxsize=1)
def _thread_pool() -> ThreadPoolExecutor:
    # numpy releases the GIL inside take and ufuncs, so row blocks run in parallel
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _convolve_block(
    source: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray, precision: int, out: np.ndarray
) -> None:
    """Along `axis` of 2-D uint8 `source`: out[i] = clamp((2**(p-1) + sum_k weights[i, k] *
    source[indices[i, k]]) >> p, 0, 255), exact in int32, one tap at a time."""
    acc = np.full(out.shape, 1 << (precision - 1), dtype=np.int32)
    product = np.empty_like(acc)
    gathered = np.empty(out.shape, dtype=np.uint8)
    weight_shape = (-1, 1) if axis == 0 else (1, -1)
    for k in range(indices.shape[1]):
        if not weights[:, k].any():
            continue
        np.take(source, indices[:, k], axis=axis, out=gathered)
        np.multiply(gathered, weights[:, k].reshape(weight_shape), out=product)
        acc += product
    np.right_shift(acc, precision, out=acc)
    np.clip(acc, 0, 255, out=out, casting="unsafe")


def _convolve(
    flat: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray, precision: int
) -> np.ndarray:
    """`_convolve_block` over blocks of output rows (input rows for the horizontal pass, output rows for
    the vertical one), on a thread pool when there is enough work."""
    if axis == 1:
        out = np.empty((flat.shape[0], indices.shape[0]), dtype=np.uint8)
    else:
        out = np.empty((indices.shape[0], flat.shape[1]), dtype=np.uint8)

    def run_block(start: int) -> None:
        rows = slice(start, start + _BLOCK_ROWS)
        if axis == 1:
            _convolve_block(flat[rows], 1, indices, weights, precision, out[rows])
        else:
            _convolve_block(flat, 0, indices[rows], weights[rows], precision, out[rows])

    starts = range(0, out.shape[0], _BLOCK_ROWS)
    if out.size < (1 << 18):
        for start in starts:
            run_block(start)
    else:
        list(_thread_pool().map(run_block, starts))
    return out


def _nearest_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # PyTorch's nearest-exact: floor((i + 0.5) * in/out) with the scale in float32.
    def source(in_size: int, out_size: int) -> np.ndarray:
        scale = np.float32(in_size / out_size)
        pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
        return np.minimum(np.floor(pos).astype(np.int64), in_size - 1)

    return image[source(image.shape[0], height)][:, source(image.shape[1], width)]


def resize_uint8(image: np.ndarray, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width, C) exactly as the reference does on uint8."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize_uint8 expects an (H, W, C) uint8 array, got {image.dtype} {image.shape}")
    if resample == NEAREST:
        return _nearest_exact(image, height, width)
    if resample not in _AA_FILTERS:
        raise ValueError(
            f"resample={resample} is not one of {SUPPORTED_RESAMPLE} (nearest, lanczos, bilinear, bicubic)"
        )
    in_height, in_width, channels = image.shape
    # Work on (H, W*C) so that every numpy loop runs over long rows, not over 3 channels.
    flat = image.reshape(in_height, in_width * channels)
    if width != in_width:
        indices, weights, precision = _int16_weights(in_width, width, resample)
        # one column per (output x, channel): source column x_in * C + c
        channel_indices = (indices[:, None, :] * channels + np.arange(channels)[None, :, None]).reshape(
            -1, indices.shape[1]
        )
        flat = _convolve(flat, 1, channel_indices, np.repeat(weights, channels, axis=0), precision)
    if height != in_height:
        flat = _convolve(flat, 0, *_int16_weights(in_height, height, resample))
    return flat.reshape(height, width, channels)
