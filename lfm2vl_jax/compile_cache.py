"""JAX's persistent compilation cache: compiled programs kept on disk, so that a process compiles only what
no earlier one did (a cold `lfm2vl generate` spends most of its time compiling).

The command line turns it on by default, in `$XDG_CACHE_HOME/lfm2vl-jax/compile` (`~/.cache/...` when
XDG_CACHE_HOME is unset); `--compile-cache DIR` or the LFM2VL_COMPILE_CACHE environment variable move it,
and the value `off` turns it off. A JAX_COMPILATION_CACHE_DIR set by the user is left alone. The Python API
does not touch global JAX settings on its own; one line opts in:

    >>> import lfm2vl_jax
    >>> lfm2vl_jax.enable_compile_cache()  # or enable_compile_cache("/scratch/jax-cache")

A directory that cannot be created or written gives one warning line; the run goes on uncached.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import jax

ENV_VAR = "LFM2VL_COMPILE_CACHE"
OFF = "off"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lfm2vl-jax/compile`; XDG says to ignore a relative XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "lfm2vl-jax" / "compile"


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Keeps every compiled program in `directory` (default: `default_cache_dir()`) and reuses them in
    later processes. Returns the directory, or None (after one warning line on stderr) if it cannot be
    created or written."""
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only directory would fail only at JAX's first write
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        print(f"lfm2vl: warning: compile cache {path}: {reason}; running without it", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX keeps only programs that took >= 1 s to compile; the many small ones add up to seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def add_compile_cache_argument(parser) -> None:
    """The `--compile-cache` flag of the commands that compile models."""
    parser.add_argument(
        "--compile-cache",
        metavar="DIR",
        help=f"persistent compilation cache ('{OFF}': none; default: ${ENV_VAR}, else "
        "$XDG_CACHE_HOME/lfm2vl-jax/compile)",
    )


def setup_compile_cache(flag: str | None) -> Path | None:
    """The command line's cache: `--compile-cache`, else LFM2VL_COMPILE_CACHE, else (unless the user set
    JAX_COMPILATION_CACHE_DIR, which JAX reads itself) the default directory; `off` turns it off."""
    value = flag if flag is not None else os.environ.get(ENV_VAR)
    if value is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if value is not None and value.strip().lower() == OFF:
        return None
    return enable_compile_cache(value if value else None)
