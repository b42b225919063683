"""Resolving `path_or_hub_id` arguments to a local checkpoint directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import Lfm2VlError

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja")
PROCESSOR_FILES = ("*.json", "*.jinja")


class CheckpointNotFoundError(Lfm2VlError, FileNotFoundError):
    pass


def resolve_checkpoint_dir(path_or_hub_id: str | Path, files: tuple[str, ...] = MODEL_FILES) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub id, whose `files` (glob patterns) are
    downloaded (or found in the local hub cache) with `huggingface_hub`. Offline or unknown ids give one
    error saying what to do."""
    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise CheckpointNotFoundError(
            f"a checkpoint must be a directory path or a hub id 'owner/name', got {path_or_hub_id!r}"
        )
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists():
        raise CheckpointNotFoundError(f"{name} is a file; expected a checkpoint directory or a hub id")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointNotFoundError(
            f"no checkpoint directory at {name!r} (and it is not a hub id 'owner/name')"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=list(files)))
    except Exception as err:  # network errors, offline mode, unknown repository, gated repository
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointNotFoundError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(err).__name__}: {reason}). "
            "Download the checkpoint elsewhere and pass its local directory instead."
        ) from None
