"""Orbax checkpoints of a model's params, and conversions between them and transformers checkpoints.

An orbax directory holds `config.json` and the carried-over files of a transformers checkpoint, and the
params under `params/` in the canonical per-layer layout (`canonical.py`), so it loads into either text
layout whatever layout saved it, and either format converts to the other alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from ..config import DTypePolicy, Lfm2VlConfig, RuntimeConfig, load_config
from ..nn.params import Params, abstract_params, param_shardings
from .canonical import from_canonical, to_canonical
from .export import DEFAULT_MAX_SHARD_SIZE, as_weight_dtype, parse_size, save_hf_checkpoint
from .files import (
    ExportError,
    check_target,
    check_writer_arguments,
    planned_names,
    staging_directory,
    write_side_files,
)
from .hf import CheckpointReader, load_hf_checkpoint
from .hub import resolve_checkpoint_dir

ORBAX_PARAMS_DIR = "params"


def _orbax_checkpointer() -> ocp.Checkpointer:
    """Synchronous and uncompressed: orbax's default zstd compression saved 7% of the bytes on the 450M
    benchmark (fp32) but held a compressed copy of every array (peak memory 2x the params instead of
    1x) and took 2.5x as long."""
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))


@contextlib.contextmanager
def _without_orbax_warnings() -> Iterator[None]:
    """Orbax logs a warning on reading a damaged checkpoint; the error we raise says it alone."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _drop_abandoned_read_reports() -> None:
    """After a failed orbax read: orbax closes its event loop at the first error, and the reads still in
    flight then report "Event loop is closed", or their own coroutine's failure, as unraisable exceptions
    (tracebacks on stderr) when they finish or are collected, possibly after we return. Those reports, and
    only those, are dropped from then on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        message = str(unraisable.exc_value)
        closed_loop = unraisable.exc_type is RuntimeError and message == "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a read coroutine closed before it finished
        orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or orbax_read):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook

    # tensorstore's threads hand finished reads to the closed loop too; the error they raise there is
    # printed through sys.excepthook (a bare traceback, no "Exception ignored"), possibly at exit.
    previous_excepthook = sys.excepthook

    def excepthook(exc_type: type[BaseException], exc: BaseException, traceback: Any) -> None:
        if not (exc_type is RuntimeError and str(exc) == "Event loop is closed"):
            previous_excepthook(exc_type, exc, traceback)

    sys.excepthook = excepthook


@contextlib.contextmanager
def quiet_orbax_reads() -> Iterator[None]:
    """Around an orbax restore that may fail on damaged or mismatched data: no orbax warnings, and if it
    fails, no "Event loop is closed" reports from its abandoned reads (the caller's error says it all)."""
    try:
        with _without_orbax_warnings():
            yield
    except Exception:
        _drop_abandoned_read_reports()
        raise


def _unreadable(where: Path, problem: str, error: BaseException | None = None) -> ExportError:
    _drop_abandoned_read_reports()
    detail = "" if error is None else f" ({_first_line(error)})"
    return ExportError(f"{where}: {problem}{detail}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_database(params_dir: Path) -> None:
    """Opens the checkpoint's OCDBT database (orbax's default format) and lists it: a cut or corrupt
    manifest fails here, synchronously, rather than inside orbax, whose failing reads race the closing of
    its event loop and print tracebacks of their own."""
    if not (params_dir / "manifest.ocdbt").exists():
        return
    try:
        spec = {"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/"}
        ts.KvStore.open(spec).result().list().result()
    except (OSError, ValueError) as err:
        raise _unreadable(params_dir, "the orbax checkpoint is truncated or corrupt", err) from None


def _stored_arrays(params_dir: Path) -> Params:
    """The orbax checkpoint's tree of array metadata (shape, dtype), read without loading any data."""
    _check_database(params_dir)
    try:
        with _without_orbax_warnings(), _orbax_checkpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir.absolute()).item_metadata
    except (OSError, ValueError) as err:
        raise _unreadable(params_dir, "cannot read the orbax checkpoint's metadata", err) from None
    if metadata is None or metadata.tree is None:
        raise _unreadable(params_dir, "the orbax checkpoint's metadata is missing or corrupt")
    return metadata.tree


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


def _per_layer(config: Lfm2VlConfig) -> Lfm2VlConfig:
    """The config with unstacked, unfused text layers, whose params map one to one onto the canonical
    layout."""
    return config.with_runtime(scan_layers=False, fused_projections=False)


def save_orbax_checkpoint(
    out_dir: str | Path,
    config: Lfm2VlConfig,
    params: Params,
    *,
    overwrite: bool = False,
    source_dir: str | Path | None = None,
    generation_config: dict[str, Any] | None = None,
    processor: Any = None,
    keep_other_files: bool = False,
) -> Path:
    """Writes the params (in `config`'s layout) with orbax to `out_dir/params` in the canonical layout
    (restorable with `ocp.StandardCheckpointer` too), beside config.json and the carried-over files
    (arguments as `save_hf_checkpoint`); the stored tree, shapes and dtypes are checked before the
    rename."""
    check_writer_arguments(overwrite, processor, keep_other_files)
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    canonical = to_canonical(params, config)
    target = Path(out_dir)
    planned = planned_names(source_dir, processor)
    with staging_directory(target, overwrite, source_dir, keep_other_files, planned) as staging:
        write_side_files(
            staging, config, max(dtypes, key=lambda d: d.itemsize), source_dir, generation_config, processor
        )
        params_dir = staging / ORBAX_PARAMS_DIR
        with _orbax_checkpointer() as checkpointer:
            checkpointer.save(params_dir.absolute(), args=ocp.args.PyTreeSave(canonical))
        _check_stored_arrays(params_dir, _stored_arrays(params_dir), canonical, check_dtypes=True)
    return target


def load_orbax_checkpoint(
    directory: str | Path, runtime: RuntimeConfig | None = None, as_numpy: bool = False
) -> tuple[Lfm2VlConfig, Params]:
    """(config, params) from a directory `save_orbax_checkpoint` wrote, in `runtime`'s layout, params
    dtype and mesh. Without a runtime: the stored dtype, per-layer text layers (no copies to stack them),
    one device.

    as_numpy: host numpy arrays instead of device arrays, all an export needs.
    """
    directory = Path(directory)
    config = load_config(directory)
    params_dir = directory / ORBAX_PARAMS_DIR
    if not params_dir.is_dir():
        raise ExportError(f"{directory} holds no orbax checkpoint ({ORBAX_PARAMS_DIR}/ is missing)")
    stored = _stored_arrays(params_dir)
    if runtime is None:
        stored_dtype = max({np.dtype(m.dtype) for m in jax.tree.leaves(stored)}, key=lambda d: d.itemsize)
        runtime = RuntimeConfig(dtypes=DTypePolicy.uniform(stored_dtype), scan_layers=False)
    config = config.replace(runtime=runtime)
    flat = _per_layer(config)
    shapes = to_canonical(abstract_params(flat), flat)
    _check_stored_arrays(params_dir, stored, shapes, check_dtypes=False)
    if as_numpy:
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), shapes)
    else:
        if runtime.mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        else:
            shardings = to_canonical(param_shardings(flat), flat)
        shapes = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings
        )
        # Without a sharding, orbax would restore numpy arrays.
        restore_args = ocp.checkpoint_utils.construct_restore_args(shapes)
    try:
        with _without_orbax_warnings(), _orbax_checkpointer() as checkpointer:
            canonical = checkpointer.restore(
                params_dir.absolute(), args=ocp.args.PyTreeRestore(shapes, restore_args=restore_args)
            )
    except (OSError, ValueError) as err:  # tensorstore reports missing or cut data as ValueError
        raise _unreadable(directory, "the orbax checkpoint is truncated or corrupt", err) from None
    params = from_canonical(canonical, config)
    if runtime.mesh is not None and runtime.fused_projections:  # fused where the parts were: re-place them
        params = jax.device_put(params, param_shardings(config))
    return config, params


# Conversions ----------------------------------------------------------------------------------------------


def _stored_dtype(directory: Path) -> np.dtype:
    """The dtype of a safetensors checkpoint's tensors (the widest, should they differ)."""
    dtypes = {file.dtype(name) for file, name in CheckpointReader(directory).tensors.values()}
    return max(dtypes, key=lambda d: d.itemsize)


def hf_to_orbax(
    src: str | Path,
    dst: str | Path,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    keep_other_files: bool = False,
) -> Path:
    """A transformers checkpoint (directory or hub id) -> an orbax checkpoint directory, in `dtype` (default:
    the checkpoint's own), streaming tensor by tensor. `overwrite`, `keep_other_files`: as
    `save_hf_checkpoint`'s."""
    dtype = as_weight_dtype(dtype)
    check_writer_arguments(overwrite, None, keep_other_files)
    local = src if Path(src).is_dir() else None
    # Before the long part.
    check_target(Path(dst), overwrite, local, keep_other_files, planned_names(local, None))
    source = resolve_checkpoint_dir(src)
    check_target(Path(dst), overwrite, source, keep_other_files, planned_names(source, None))
    dtype = dtype or _stored_dtype(source)
    runtime = RuntimeConfig(dtypes=DTypePolicy.uniform(dtype), scan_layers=False)  # no restacking
    config, params = load_hf_checkpoint(source, runtime=runtime, progress=progress)
    return save_orbax_checkpoint(
        dst, config, params, overwrite=overwrite, source_dir=source, keep_other_files=keep_other_files
    )


def orbax_to_hf(
    src: str | Path,
    dst: str | Path,
    dtype: Any = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
    keep_other_files: bool = False,
) -> Path:
    """An orbax checkpoint directory -> a transformers checkpoint directory, in `dtype` (default: as
    stored). `overwrite`, `keep_other_files`: as `save_hf_checkpoint`'s."""
    as_weight_dtype(dtype)
    parse_size(max_shard_size)
    check_writer_arguments(overwrite, None, keep_other_files)
    check_target(Path(dst), overwrite, src, keep_other_files, planned_names(src, None))
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
        keep_other_files=keep_other_files,
    )
