"""Export: our params back to a Hugging Face checkpoint directory; orbax checkpoints; the conversion CLIs.

A Hugging Face directory holds `config.json` (transformers 5.x layout, `dtype` stating the weights'),
`model.safetensors` (or, above `max_shard_size`, shards `model-0000i-of-0000n.safetensors` filled in key
order plus `model.safetensors.index.json`) and the non-weight files (generation config, processor,
tokenizer, chat template) carried over from the source. An orbax directory holds the same `config.json`
and carried-over files, and the params pytree under `params/`, so either converts to the other alone.

Writes are crash-safe: everything goes to a staging directory beside the target, is read back and
verified (tensor names, count, dtypes, shapes and a SHA-256 of every tensor's bytes), fsynced, and only
then renamed onto the target, so the target is either a complete checkpoint or untouched. Tensors
stream one at a time: host memory stays near the params plus one tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader, iter_hf_tensors, leaf_at, load_hf_checkpoint, tensor_map
from .config import Lfm2VlConfig, config_to_dict, load_config
from .errors import Lfm2VlError
from .hub import resolve_checkpoint_dir
from .params import Params, abstract_params, layers_are_stacked
from .safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x's default
ORBAX_PARAMS_DIR = "params"
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
# Weights the source may hold in other formats: stale after export, never carried over.
WEIGHT_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
)
READ_CHUNK = 16 * 2**20
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}  # fmt: skip

Layout = list[tuple[str, np.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor, in file order


class ExportError(Lfm2VlError):
    """An export or conversion that must not proceed, or that did not write what it meant to."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (5 * 10**9) or "500MiB" (500 * 2**20), the units of
    transformers' `max_shard_size`."""
    if isinstance(size, str):
        match = re.fullmatch(r"(\d+)\s*([KMGT]I?B|B)?", size.strip().upper())
        if match is None:
            raise ExportError(f"cannot read {size!r} as a size: use bytes or e.g. '5GB', '500MiB'")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2) or "B"]
    if size <= 0:
        raise ExportError(f"size must be positive, got {size}")
    return size


# Output directories ---------------------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_target(target: Path, overwrite: bool) -> None:
    """Refuses an existing target (an empty directory aside) unless `overwrite`."""
    if _exists(target) and not _is_empty_dir(target) and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    check_target(target, overwrite)  # again: something may have appeared there while we wrote
    if _is_empty_dir(target):
        target.rmdir()
    if not _exists(target):
        os.rename(staging, target)
    else:  # the old checkpoint is moved aside, not deleted, until the new one is in place
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    _fsync(target.parent)


@contextlib.contextmanager
def staging_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory beside `target` (same filesystem) to write into: fsynced and renamed onto `target`
    if the block completes, deleted if it raises."""
    target = Path(os.path.abspath(target))  # a name to put the staging directory beside, even for "."
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        _move_into_place(staging, target, overwrite)
    finally:
        if _exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


# Non-weight files -----------------------------------------------------------------------------------------


def _is_carried_over(path: Path) -> bool:
    name = path.name
    if not path.is_file() or name == "config.json" or name.startswith("."):
        return False
    return not any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def _write_side_files(
    staging: Path,
    config: Lfm2VlConfig,
    dtype: np.dtype,
    source_dir: str | Path | None,
    generation_config: dict[str, Any] | None,
    processor: Any,
) -> None:
    """The source's non-weight files, then the generation config and processor given (which win over the
    copies), then config.json."""
    if source_dir is not None:
        for path in sorted(Path(source_dir).iterdir()):
            if _is_carried_over(path):
                shutil.copyfile(path, staging / path.name)
    if generation_config:
        generation_file = staging / "generation_config.json"
        # An unchanged generation config keeps the source's file byte for byte.
        if not generation_file.exists() or json.loads(generation_file.read_text()) != generation_config:
            generation_file.write_text(json.dumps(generation_config, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(staging)
    config_json = config_to_dict(config) | {"dtype": dtype.name}
    (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")


# Hugging Face checkpoints ---------------------------------------------------------------------------------


def _nbytes(entry: tuple[str, np.dtype, tuple[int, ...]]) -> int:
    _, dtype, shape = entry
    return int(np.prod(shape)) * dtype.itemsize


def _hf_layout(config: Lfm2VlConfig, params: Params, dtype: np.dtype | None) -> Layout:
    """What `iter_hf_tensors` will yield, known before any tensor is computed (the header comes first)."""
    table = tensor_map(config, layers_are_stacked(params))
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


def _as_dtype(dtype: Any) -> np.dtype | None:
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


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
) -> Path:
    """Writes a transformers checkpoint directory that `Lfm2VlForConditionalGeneration.from_pretrained` of
    transformers (and ours) loads.

    dtype: the weights' dtype on disk (default: the params' own); casts round to nearest even, as torch.
    max_shard_size: bytes or a string like "5GB"; above it the weights are split into shards.
    source_dir: a checkpoint directory whose non-weight files (tokenizer, processor, chat template,
        generation config, ...) are copied over.
    generation_config: written as generation_config.json (replacing a copied one) when non-empty.
    processor: an object with `save_pretrained(directory)` (e.g. `Lfm2VlProcessor`), saved in too.
    """
    max_shard_bytes = parse_size(max_shard_size)
    dtype = _as_dtype(dtype)
    layout = _hf_layout(config, params, dtype)
    config_dtype = max({d for _, d, _ in layout}, key=lambda d: d.itemsize)  # "auto" loads lose nothing
    target = Path(out_dir)
    with staging_directory(target, overwrite) as staging:
        _write_side_files(staging, config, config_dtype, source_dir, generation_config, processor)
        _write_weights(staging, config, params, dtype, layout, max_shard_bytes, progress)
    return target


# Orbax checkpoints ----------------------------------------------------------------------------------------


def _orbax_checkpointer() -> ocp.Checkpointer:
    """Synchronous and uncompressed: orbax's default zstd compression saved 7% of the bytes on the 450M
    benchmark (fp32) but held a compressed copy of every array (peak memory 2x the params instead of
    1x) and took 2.5x as long."""
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


def _stored_arrays(params_dir: Path) -> Params:
    """The orbax checkpoint's tree of array metadata (shape, dtype), read without loading any data."""
    with _orbax_checkpointer() as checkpointer:
        return checkpointer.metadata(params_dir.absolute()).item_metadata.tree


def _check_stored_arrays(params_dir: Path, stored: Params, expected: Params, check_dtypes: bool) -> None:
    """`stored` must have `expected`'s tree structure and shapes (and dtypes, if `check_dtypes`)."""
    stored_paths = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    expected_paths = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    if stored_paths.keys() != expected_paths.keys():
        missing = sorted(map(jax.tree_util.keystr, expected_paths.keys() - stored_paths.keys()))
        unexpected = sorted(map(jax.tree_util.keystr, stored_paths.keys() - expected_paths.keys()))
        raise ExportError(
            f"{params_dir}: the stored params do not match config.json; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for path, want in expected_paths.items():
        got = stored_paths[path]
        if tuple(got.shape) != tuple(want.shape) or (check_dtypes and got.dtype != want.dtype):
            raise ExportError(
                f"{params_dir}: {jax.tree_util.keystr(path)} is stored as {got.dtype}{tuple(got.shape)}, "
                f"expected {want.dtype if check_dtypes else ''}{tuple(want.shape)}"
            )


def save_orbax_checkpoint(
    out_dir: str | Path,
    config: Lfm2VlConfig,
    params: Params,
    *,
    overwrite: bool = False,
    source_dir: str | Path | None = None,
    generation_config: dict[str, Any] | None = None,
    processor: Any = None,
) -> Path:
    """Writes the params with orbax to `out_dir/params` (restorable with `ocp.StandardCheckpointer` too),
    beside config.json and the carried-over files (arguments as `save_hf_checkpoint`); the stored tree,
    shapes and dtypes are checked against the params before the rename."""
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    target = Path(out_dir)
    with staging_directory(target, overwrite) as staging:
        _write_side_files(
            staging, config, max(dtypes, key=lambda d: d.itemsize), source_dir, generation_config, processor
        )
        params_dir = staging / ORBAX_PARAMS_DIR
        with _orbax_checkpointer() as checkpointer:
            checkpointer.save(params_dir.absolute(), args=ocp.args.PyTreeSave(params))
        _check_stored_arrays(params_dir, _stored_arrays(params_dir), params, check_dtypes=True)
    return target


def load_orbax_checkpoint(
    directory: str | Path, shardings: Params | None = None, as_numpy: bool = False
) -> tuple[Lfm2VlConfig, Params]:
    """(config, params) from a directory `save_orbax_checkpoint` wrote; dtypes and layer layout (stacked or
    per layer) as stored.

    shardings: pytree of `jax.sharding.Sharding` (in the stored layout) to restore onto; default: the
        first device. as_numpy: host numpy arrays instead, all an export needs (no device copies).
    """
    directory = Path(directory)
    config = load_config(directory)
    params_dir = directory / ORBAX_PARAMS_DIR
    if not params_dir.is_dir():
        raise ExportError(f"{directory} holds no orbax checkpoint ({ORBAX_PARAMS_DIR}/ is missing)")
    try:
        stored = _stored_arrays(params_dir)
    except (OSError, ValueError) as err:
        raise ExportError(f"{params_dir}: cannot read the orbax checkpoint's metadata ({err})") from None
    shapes = abstract_params(config, scan_layers=layers_are_stacked(stored))
    _check_stored_arrays(params_dir, stored, shapes, check_dtypes=False)
    if as_numpy:
        target = jax.tree.map(lambda s, meta: jax.ShapeDtypeStruct(s.shape, meta.dtype), shapes, stored)
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    else:
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        target = jax.tree.map(
            lambda s, meta, sharding: jax.ShapeDtypeStruct(s.shape, meta.dtype, sharding=sharding),
            shapes,
            stored,
            shardings,
        )
        # Without a sharding, orbax would restore numpy arrays.
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with _orbax_checkpointer() as checkpointer:
        return config, checkpointer.restore(
            params_dir.absolute(), args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
        )


# Conversions ----------------------------------------------------------------------------------------------


def _stored_dtype(directory: Path) -> np.dtype:
    """The dtype of a safetensors checkpoint's tensors (the widest, should they differ)."""
    dtypes = {file.dtype(name) for file, name in CheckpointReader(directory).tensors.values()}
    return max(dtypes, key=lambda d: d.itemsize)


def hf_to_orbax(
    src: str | Path, dst: str | Path, dtype: Any = None, overwrite: bool = False, progress: bool = True
) -> Path:
    """A transformers checkpoint (directory or hub id) -> an orbax checkpoint directory, in `dtype` (default:
    the checkpoint's own), streaming tensor by tensor."""
    check_target(Path(dst), overwrite)  # before the long part
    source = resolve_checkpoint_dir(src)
    dtype = _as_dtype(dtype) or _stored_dtype(source)
    config, params = load_hf_checkpoint(source, dtype=dtype, progress=progress)
    return save_orbax_checkpoint(dst, config, params, overwrite=overwrite, source_dir=source)


def orbax_to_hf(
    src: str | Path,
    dst: str | Path,
    dtype: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """An orbax checkpoint directory -> a transformers checkpoint directory, in `dtype` (default: as
    stored)."""
    check_target(Path(dst), overwrite)
    parse_size(max_shard_size)
    config, params = load_orbax_checkpoint(src, as_numpy=True)
    return save_hf_checkpoint(
        dst,
        config,
        params,
        dtype=dtype,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        source_dir=src,
        progress=progress,
    )


# Command line ---------------------------------------------------------------------------------------------

# What a conversion reports as one line (exit status 2, as `lfm2vl`) rather than a traceback: bad input,
# a refused target, and I/O errors (unreadable source, full disk, no permission).
CONVERSION_ERRORS = (Lfm2VlError, OSError)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, help="dtype of the written weights (default: as stored)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_hf_to_orbax_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="transformers checkpoint directory or hub id")
    parser.add_argument("dst", metavar="DST", help="orbax checkpoint directory to create")
    _common_arguments(parser)


def add_orbax_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="orbax checkpoint directory (written by hf_to_orbax)")
    parser.add_argument("dst", metavar="DST", help="transformers checkpoint directory to create")
    _common_arguments(parser)
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"split the weights into shards above this size (default {DEFAULT_MAX_SHARD_SIZE})",
    )


def _report(convert: Callable[[], Path]) -> int:
    try:
        out = convert()
    except CONVERSION_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e9:.2f} GB)")
    return 0


def run_hf_to_orbax(args: argparse.Namespace) -> int:
    return _report(lambda: hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite, not args.quiet))


def run_orbax_to_hf(args: argparse.Namespace) -> int:
    return _report(
        lambda: orbax_to_hf(
            args.src, args.dst, args.dtype, args.overwrite, args.max_shard_size, not args.quiet
        )
    )


def hf_to_orbax_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf_to_orbax", description="Convert a transformers LFM2-VL checkpoint to an orbax checkpoint."
    )
    add_hf_to_orbax_arguments(parser)
    return run_hf_to_orbax(parser.parse_args(argv))


def orbax_to_hf_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orbax_to_hf", description="Convert an orbax LFM2-VL checkpoint to a transformers checkpoint."
    )
    add_orbax_to_hf_arguments(parser)
    return run_orbax_to_hf(parser.parse_args(argv))
