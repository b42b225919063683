"""Crash-safe checkpoint directories: everything is written into a staging directory beside the target,
fsynced, and only then renamed onto it, so a target is either complete or untouched. Also the non-weight
files (tokenizer, processor, chat template, generation config) a checkpoint carries over from its source.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

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


class WriteError(ExportError, OSError):
    """The file system refused a write (no permission, disk full, ...); names the user's target."""


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _overlap(target: Path, source: Path) -> str | None:
    """How `target` overlaps `source` once links are resolved ("is", "is inside", "contains"), or None."""
    real_target, real_source = Path(os.path.realpath(target)), Path(os.path.realpath(source))
    if real_target == real_source:
        return "is"
    if real_source in real_target.parents:
        return "is inside"
    if real_target in real_source.parents:
        return "contains"
    return None


# What a checkpoint directory holds: with `overwrite`, these are replaced (stale shards of an earlier save
# dropped); any other entry is a user's, which no write deletes (`keep_other_files` writes beside them).
CHECKPOINT_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "params",  # an orbax checkpoint's arrays
)
PROCESSOR_FILE_NAMES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_FILES_HINT = "keep_other_files=True (--keep-other-files)"


def _owned(name: str, written: set[str]) -> bool:
    return name in written or any(fnmatch.fnmatchcase(name, p) for p in CHECKPOINT_FILE_PATTERNS)


def planned_names(source: str | Path | None, processor: Any) -> set[str]:
    """The names a write will put in its directory beyond `CHECKPOINT_FILE_PATTERNS`, known before it
    starts: the source's carried-over files and a processor's."""
    names = set(PROCESSOR_FILE_NAMES) if processor is not None else set()
    if source is not None and Path(source).is_dir():
        names.update(path.name for path in Path(source).iterdir() if _is_carried_over(path))
    return names


def _other_files(target: Path, written: set[str]) -> list[str]:
    return sorted(entry.name for entry in target.iterdir() if not _owned(entry.name, written))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_target(
    target: Path,
    overwrite: bool,
    source: str | Path | None = None,
    keep_other_files: bool = False,
    written: set[str] | None = None,
) -> None:
    """Refuses, before anything is written:
    - whatever `overwrite` says, a target overlapping `source` (the directory being converted or copied
      from): a write must never destroy its own input;
    - a target that is not a directory (a file, a link, a device): never replaced;
    - a directory holding a checkpoint's files, unless `overwrite`;
    - a directory holding other files (the user's: names neither in `CHECKPOINT_FILE_PATTERNS` nor in
      `written`, what this write puts there), unless `keep_other_files`, which keeps them beside the new
      checkpoint."""
    if source is not None:
        if not Path(source).is_dir():
            raise ExportError(f"source directory {source} does not exist or is not a directory")
        relation = _overlap(target, Path(source))
        if relation is not None:
            raise ExportError(
                f"refusing to write {target}: it {relation} the source checkpoint {source}, and a write must "
                "not replace or alter its own input; choose another destination"
            )
    if not _exists(target):
        return
    if target.is_symlink() or not target.is_dir():
        kind = "a symbolic link" if target.is_symlink() else "a file, not a directory"
        raise ExportError(
            f"{target} is {kind}; refusing to replace it with a checkpoint directory: remove it or choose "
            "another destination"
        )
    written = written or set()
    others = _other_files(target, written)
    ours = any(_owned(entry.name, written) for entry in target.iterdir())
    if ours and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if others and not keep_other_files:
        raise ExportError(
            f"{target} holds files that are not part of a checkpoint ({_listing(others)}); a write replaces "
            f"only checkpoint files, never these: choose another directory, move them away, or pass "
            f"{OTHER_FILES_HINT} to write the checkpoint beside them"
        )


def _link_tree(path: Path, destination: Path) -> None:
    """Hard links of `path`'s files at `destination` (directories recreated, symbolic links copied): the
    new checkpoint directory keeps a user's files without copying them, and the old one holds them until
    the new one is in place."""
    if path.is_symlink():
        os.symlink(os.readlink(path), destination)
    elif path.is_dir():
        destination.mkdir()
        for entry in path.iterdir():
            _link_tree(entry, destination / entry.name)
        _fsync(destination)
    else:
        os.link(path, destination)


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


# Staging (`.NAME.partial-XXXXXXXX`) and moved-aside (`.NAME.old-XXXXXXXX`) directories beside a target.
# Their writer holds an exclusive `flock` on each while it exists, which the kernel drops when the
# process dies however it dies, so one we can lock was left behind by a killed write.


def _hidden_sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def _lock(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_abandoned(target: Path, kind: str) -> list[Path]:
    """Removes the `kind` ("partial" or "old") directories that killed writes to `target` left beside it:
    only directories named exactly by our scheme, and only those no live writer holds. Returns them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-[0-9a-f]{{8}}")
    removed = []
    for entry in sorted(target.parent.iterdir()):
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:  # not ours to remove after all
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            os.close(fd)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # the new target is in place: a leftover is only clutter
    else:
        path.unlink()


def _move_into_place(
    staging: Path, target: Path, overwrite: bool, source: str | Path | None, keep_other_files: bool
) -> None:
    written = {entry.name for entry in staging.iterdir()}
    # Again, knowing exactly what was written: something may have appeared there while we wrote.
    check_target(target, overwrite, source, keep_other_files, written)
    if _exists(target):
        for name in _other_files(target, written):  # kept: the user's files move with the directory
            _link_tree(target / name, staging / name)
        _fsync(staging)
    if _is_empty_dir(target):
        target.rmdir()
    if not _exists(target):
        os.rename(staging, target)
    else:  # the old checkpoint is moved aside, not deleted, until the new one is in place
        old = _hidden_sibling(target, "old")
        lock = _lock(target) if target.is_dir() and not target.is_symlink() else None
        try:
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
            _remove(old)
        finally:
            if lock is not None:
                os.close(lock)
    _fsync(target.parent)


def _write_error(error: OSError, target: Path, staging: Path) -> WriteError:
    """`error` restated about the user's `target`: the hidden staging path would mean nothing to them."""
    where = error.filename
    if where is not None:
        path = Path(os.fsdecode(where))
        if path == staging or staging in path.parents:
            where = target / path.relative_to(staging)
    detail = "" if where is None or Path(where) == target else f" ({where})"
    wrapped = WriteError(f"cannot write {target}: {error.strerror or error}{detail}")
    wrapped.errno = error.errno
    return wrapped


@contextlib.contextmanager
def staging_directory(
    target: str | Path,
    overwrite: bool = False,
    source: str | Path | None = None,
    keep_other_files: bool = False,
    planned: set[str] | None = None,
) -> Iterator[Path]:
    """A fresh directory beside `target` (same filesystem) to write into: fsynced and renamed onto `target`
    if the block completes, deleted if it raises. `source`: the directory the content comes from, which
    `target` must not overlap; `planned`: the names the block will write (see `check_target`). With
    `keep_other_files`, the target's files that are not the checkpoint's are hard-linked into the new
    directory before the swap. Staging directories abandoned by killed writes to the same target are
    removed first, moved-aside ones after the new target is in place. File-system errors name `target`."""
    target = Path(os.path.abspath(target))  # a name to put the staging directory beside, even for "."
    check_target(target, overwrite, source, keep_other_files, planned)
    staging = _hidden_sibling(target, "partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target, "partial")
        staging.mkdir()
    except OSError as err:
        raise _write_error(err, target, staging) from err
    lock = _lock(staging)
    try:
        try:
            yield staging
            _fsync_tree(staging)
            _move_into_place(staging, target, overwrite, source, keep_other_files)
        except OSError as err:
            raise _write_error(err, target, staging) from err
        remove_abandoned(target, "old")
    finally:
        if _exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)


def check_writer_arguments(overwrite: Any, processor: Any, keep_other_files: Any = False) -> None:
    """Arguments of the checkpoint writers that would otherwise be misread silently or fail midway."""
    for name, value in (("overwrite", overwrite), ("keep_other_files", keep_other_files)):
        if not isinstance(value, (bool, np.bool_)):
            raise ExportError(f"{name} must be True or False, got {value!r}")
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise ExportError(f"processor {type(processor).__name__} has no save_pretrained(directory) method")


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


@contextlib.contextmanager
def staging_file(target: str | Path, overwrite: bool = False) -> Iterator[BinaryIO]:
    """A fresh hidden file beside `target` (same filesystem) to write into: fsynced and put in place of
    `target` when the block completes, deleted if it raises. Without `overwrite`, a `target` that exists
    (or appeared while the block wrote) is never replaced: the file is linked into place, which fails
    rather than clobbers. The caller checks beforehand that an existing target is one it may replace."""
    target = Path(os.path.abspath(target))
    staging = _hidden_sibling(target, "partial")
    try:
        with open(staging, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(staging, target)
        else:
            try:
                os.link(staging, target)
            except FileExistsError:
                raise ExportError(f"{target} appeared while it was being written; left as it is") from None
        _fsync(target.parent)
    finally:
        if staging.exists():
            staging.unlink()
