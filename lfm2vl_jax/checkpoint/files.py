"""Crash-safe checkpoint directories: everything is written into a staging directory beside the target,
fsynced, and only then renamed onto it, so a target is either complete or untouched. Also the non-weight
files (tokenizer, processor, chat template, generation config) a checkpoint carries over from its source.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Lfm2VlConfig, config_to_dict
from ..errors import Lfm2VlError

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


class ExportError(Lfm2VlError):
    """An export or conversion that must not proceed, or that did not write what it meant to."""


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


def write_side_files(
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
