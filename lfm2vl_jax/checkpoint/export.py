"""Export: our params back to a Hugging Face checkpoint directory.

A Hugging Face directory holds `config.json` (transformers 5.x layout, `dtype` stating the weights'),
`model.safetensors` (or, above `max_shard_size`, shards `model-0000i-of-0000n.safetensors` filled in key
order plus `model.safetensors.index.json`) and the non-weight files (generation config, processor,
tokenizer, chat template) carried over from the source.

Writes are crash-safe (`files.staging_directory`): everything is read back and verified (tensor names,
count, dtypes, shapes and a SHA-256 of every tensor's bytes) before the rename. Tensors stream one at a
time: host memory stays near the params plus one tensor.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from ..config import ConfigError, Lfm2VlConfig, floating_dtype
from ..nn.params import Params
from .files import ExportError, check_writer_arguments, planned_names, staging_directory, write_side_files
from .hf import iter_hf_tensors, leaf_at, tensor_map
from .safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x's default
READ_CHUNK = 16 * 2**20
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}  # fmt: skip

Layout = list[tuple[str, np.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor, in file order


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (5 * 10**9) or "500MiB" (500 * 2**20), the units of
    transformers' `max_shard_size`."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer, str)):
        raise ExportError(f"a size must be a number of bytes or a string like '5GB', got {size!r}")
    if isinstance(size, str):
        match = re.fullmatch(r"(\d+)\s*([KMGT]I?B|B)?", size.strip().upper())
        if match is None:
            raise ExportError(f"cannot read {size!r} as a size: use bytes or e.g. '5GB', '500MiB'")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2) or "B"]
    if size <= 0:
        raise ExportError(f"size must be positive, got {size}")
    return size


def _nbytes(entry: tuple[str, np.dtype, tuple[int, ...]]) -> int:
    _, dtype, shape = entry
    return int(np.prod(shape)) * dtype.itemsize


def _hf_layout(config: Lfm2VlConfig, params: Params, dtype: np.dtype | None) -> Layout:
    """What `iter_hf_tensors` will yield, known before any tensor is computed (the header comes first)."""
    table = tensor_map(config)
    return [
        (
            key,
            dtype or np.dtype(leaf_at(params, table[key].path).dtype),
            table[key].hf_shape,
        )
        for key in sorted(table)
    ]


def _plan_shards(layout: Layout, max_shard_bytes: int) -> list[Layout]:
    """Consecutive runs of tensors of at most `max_shard_bytes` each (a larger tensor gets a shard alone)."""
    shards: list[Layout] = [[]]
    size = 0
    for entry in layout:
        if shards[-1] and size + _nbytes(entry) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry)
    return shards


def _hashing(
    tensors: Iterable[tuple[str, np.ndarray]], layout: Layout, digests: dict[str, bytes], bar: tqdm
) -> Iterator[np.ndarray]:
    """Passes the tensors on, recording the SHA-256 of the bytes handed to the writer."""
    for (key, array), (name, _, _) in zip(tensors, layout, strict=True):
        if key != name:  # same-shaped tensors would otherwise be written under each other's names
            raise ExportError(f"tensor order mismatch: got {key!r} where the layout has {name!r}")
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        digests[key] = hashlib.sha256(data).digest()
        bar.update(data.nbytes)
        yield array


def _sha256_of_range(f: BinaryIO, begin: int, end: int, buffer: memoryview) -> bytes:
    """Hashes through a small reused buffer: reading whole tensors back (`SafetensorsFile.read`) would add
    the largest tensor to the peak memory (0.15x the checkpoint for the 450M's embedding)."""
    digest = hashlib.sha256()
    f.seek(begin)
    while begin < end:
        n = f.readinto(buffer[: min(len(buffer), end - begin)])
        if not n:
            break
        digest.update(buffer[:n])
        begin += n
    return digest.digest()


def verify_safetensors(path: Path, layout: Layout, digests: dict[str, bytes]) -> None:
    """Reads a written file back: the tensors `layout` declares, in order, with their dtypes and shapes,
    and bytes whose SHA-256 equals what was handed to the writer."""
    try:
        file = SafetensorsFile(path)
    except (OSError, SafetensorsError) as err:
        raise ExportError(f"verifying {path}: {err}") from None
    written = [(name, file.dtype(name), file.shape(name)) for name in file.keys()]  # noqa: SIM118
    if written != layout:
        expected = {name: (dtype, shape) for name, dtype, shape in layout}
        found = {name: (dtype, shape) for name, dtype, shape in written}
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        differ = [n for n in expected if n in found and expected[n] != found[n]]
        problem = (
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong dtype or shape {differ[:5]}"
            if missing or unexpected or differ
            else "the tensors are out of order"
        )
        raise ExportError(
            f"verifying {path}: holds {len(written)} tensors, expected {len(layout)}; {problem}"
        )
    buffer = memoryview(bytearray(READ_CHUNK))
    with open(path, "rb") as f:
        for name in file.keys():  # noqa: SIM118
            if _sha256_of_range(f, *file.data_range(name), buffer) != digests[name]:
                raise ExportError(
                    f"verifying {path}: tensor {name!r} reads back different from what was written"
                )


def _write_weights(
    staging: Path,
    config: Lfm2VlConfig,
    params: Params,
    dtype: np.dtype | None,
    layout: Layout,
    max_shard_bytes: int,
    progress: bool,
) -> None:
    shards = _plan_shards(layout, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    tensors = iter_hf_tensors(config, params, dtype)
    digests: dict[str, bytes] = {}
    total = sum(map(_nbytes, layout))
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="writing safetensors", disable=not progress
    ) as bar:
        for name, shard in zip(names, shards, strict=True):
            # islice, not the shared iterator itself: the writer's strict zip would consume the next shard's
            # first tensor when checking that this shard's stream is exhausted.
            stream = _hashing(itertools.islice(tensors, len(shard)), shard, digests, bar)
            write_safetensors(staging / name, shard, stream, metadata={"format": "pt"})
            verify_safetensors(staging / name, shard, digests)
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(int(np.prod(shape)) for _, _, shape in layout),
                "total_size": total,
            },
            "weight_map": {
                key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard
            },
        }
        (staging / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )


def as_weight_dtype(dtype: Any) -> np.dtype | None:
    """The dtype weights are to be written in (None: as held); only floating-point types."""
    if dtype is None:
        return None
    try:
        return floating_dtype(dtype, "dtype of the written weights")
    except ConfigError as err:
        raise ExportError(str(err)) from None


def save_hf_checkpoint(
    out_dir: str | Path,
    config: Lfm2VlConfig,
    params: Params,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    source_dir: str | Path | None = None,
    generation_config: dict[str, Any] | None = None,
    processor: Any = None,
    progress: bool = True,
    keep_other_files: bool = False,
) -> Path:
    """Writes a transformers checkpoint directory that `Lfm2VlForConditionalGeneration.from_pretrained` of
    transformers (and ours) loads.

    dtype: the weights' dtype on disk (default: the params' own); casts round to nearest even, as torch.
    max_shard_size: bytes or a string like "5GB"; above it the weights are split into shards.
    source_dir: a checkpoint directory whose non-weight files (tokenizer, processor, chat template,
        generation config, ...) are copied over.
    generation_config: written as generation_config.json (replacing a copied one) when non-empty.
    processor: an object with `save_pretrained(directory)` (e.g. `Lfm2VlProcessor`), saved in too.
    overwrite: replace the checkpoint files of an existing directory (stale shards dropped).
    keep_other_files: write into a directory holding other files (which are kept); refused otherwise.
    """
    max_shard_bytes = parse_size(max_shard_size)
    dtype = as_weight_dtype(dtype)
    check_writer_arguments(overwrite, processor, keep_other_files)
    layout = _hf_layout(config, params, dtype)
    config_dtype = max({d for _, d, _ in layout}, key=lambda d: d.itemsize)  # "auto" loads lose nothing
    target = Path(out_dir)
    planned = planned_names(source_dir, processor)
    with staging_directory(target, overwrite, source_dir, keep_other_files, planned) as staging:
        write_side_files(staging, config, config_dtype, source_dir, generation_config, processor)
        _write_weights(staging, config, params, dtype, layout, max_shard_bytes, progress)
    return target
