"""The command line's persistent compilation cache: a second `lfm2vl generate` compiles nothing (every
program comes from the cache, counted by JAX's own compile events in the subprocess); where the directory is
set and how it is turned off; an unusable directory warns once and the run goes on uncached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lfm2vl_jax.compile_cache import ENV_VAR, default_cache_dir, enable_compile_cache, setup_compile_cache

TESTS = Path(__file__).resolve().parents[1]
REPOSITORY = TESTS.parent
# The CLI in a subprocess, counting the programs XLA compiles: JAX's compile events, less the persistent
# cache's hits (a hit is reported as a compile too).
DRIVER = """
import sys
from jax import monitoring
sys.path.insert(0, sys.argv[1])
from compile_counter import CompileCounter
counter, hits = CompileCounter(), []
monitoring.register_event_listener(lambda event, **_: hits.append(event.endswith("/cache_hits")))
from lfm2vl_jax.cli import main
status = main(sys.argv[2:])
print(f"compiled {counter.count - sum(hits)}", file=sys.stderr)
sys.exit(status)
"""


def generate(checkpoint: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    argv = ["generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "3", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPOSITORY), **(env or {})}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop(ENV_VAR, None)
    command = [sys.executable, "-c", DRIVER, str(TESTS), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, int(done.stderr.rsplit("compiled ", 1)[1])


def test_second_run_compiles_nothing_new(tmp_path, tiny_checkpoint):
    """The first run fills the default directory (under XDG_CACHE_HOME); a second one, pointed there by the
    flag, compiles nothing and prints the same answer."""
    answer, compiled = generate(tiny_checkpoint, env={"XDG_CACHE_HOME": str(tmp_path)})
    cache = tmp_path / "lfm2vl-jax" / "compile"
    assert compiled > 0 and any(cache.iterdir())
    again, recompiled = generate(tiny_checkpoint, "--compile-cache", str(cache))
    assert (again, recompiled) == (answer, 0)


@pytest.fixture
def jax_cache_settings():
    """Restores JAX's cache settings that the in-process calls below change."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_where_the_cache_goes(tmp_path, monkeypatch, jax_cache_settings):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lfm2vl-jax" / "compile"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # XDG: ignored
    assert default_cache_dir() == Path.home() / ".cache" / "lfm2vl-jax" / "compile"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert setup_compile_cache(None) == tmp_path / "env"
    assert setup_compile_cache(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    monkeypatch.setenv(ENV_VAR, "off")
    assert setup_compile_cache(None) is None
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "users"))  # the user's own: left to JAX
    assert setup_compile_cache(None) is None


def test_unusable_directory_warns_once_and_runs_uncached(tmp_path, capsys, jax_cache_settings):
    before = jax.config.jax_compilation_cache_dir
    (tmp_path / "file").write_text("in the way")
    assert enable_compile_cache(tmp_path / "file" / "cache") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: compile cache" in err and "running without it" in err
    assert jax.config.jax_compilation_cache_dir == before


def test_read_only_directory_warns(tmp_path, capsys, monkeypatch, jax_cache_settings):
    """A directory it cannot write into (simulated: the tests run as root, who writes anywhere)."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    assert enable_compile_cache(tmp_path / "cache") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err
