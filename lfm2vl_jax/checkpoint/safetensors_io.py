"""Reading and writing the safetensors format with numpy alone (bfloat16 included, via ml_dtypes).

The `safetensors` package's numpy backend cannot represent bfloat16, and its torch backend would make
torch a run-time dependency, so we read the (simple) format ourselves: an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data. Reads copy one
tensor at a time into a fresh array (a memory map would keep every page read resident in the process
until it is closed: the whole file beside the params built from it); writes stream tensor by tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from ..errors import Lfm2VlError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(Lfm2VlError):
    """A safetensors file that is truncated, corrupt or not what it claims."""


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """Lazy view of one .safetensors file: the header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{self.path}: truncated file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(
                    f"{self.path}: corrupt header length {header_len} (file has {size} bytes)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                raise SafetensorsError(f"{self.path}: corrupt header ({err})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(
                f"{self.path}: corrupt header (a JSON {type(header).__name__}, not an object)"
            )
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path}: corrupt header (__metadata__ must map names to strings)")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                if not all(_is_count(x) for x in (*shape, begin, end)):
                    raise ValueError("sizes and offsets must be non-negative integers")
            except (KeyError, TypeError, ValueError):
                shown = json.dumps(entry)
                shown = shown if len(shown) <= 200 else shown[:197] + "..."
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {shown}"
                ) from None
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has inconsistent offsets for its shape")
            if end > data_size:
                raise SafetensorsError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of the data section "
                    f"but the file holds only {data_size} data bytes"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def data_range(self, name: str) -> tuple[int, int]:
        """The tensor's bytes, as [begin, end) offsets in the file."""
        _, _, begin, end = self._entries[name]
        return self._data_start + begin, self._data_start + end

    def read(self, name: str) -> np.ndarray:
        """The tensor, read into a new array."""
        dtype, shape, _, _ = self._entries[name]
        begin, end = self.data_range(name)
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(begin)
            read = f.readinto(out.reshape(-1).view(np.uint8))
        if read != end - begin:
            raise SafetensorsError(f"{self.path}: truncated file: tensor {name!r} is cut short")
        return out


def _header(tensors: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned


def write_safetensors(
    path: str | Path,
    layout: list[tuple[str, np.dtype, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors declared by `layout` (name, dtype, shape), their data coming one by one from
    `arrays` in the same order, so only one tensor needs to be in memory at a time."""
    header = _header(layout, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (name, dtype, shape), array in zip(layout, arrays, strict=True):
            _write_array(f, name, np.asarray(array), dtype, shape)


def _write_array(f: BinaryIO, name: str, array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if array.dtype != dtype or tuple(array.shape) != tuple(shape):
        raise SafetensorsError(f"tensor {name!r}: got {array.dtype}{array.shape}, declared {dtype}{shape}")
    f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
