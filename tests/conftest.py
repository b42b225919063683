"""Test tiers and processor fixtures.

Every test is marked by its folder: `unit` (torch-free checks of one piece: a function, a layer, a file
format, an option), `integration` (torch-free runs of whole programs: the model's gradients and cached
decoding, training runs, the batch engine, the server, the command line), `parity` (against transformers),
`multidevice` (8 host devices in a subprocess), `distributed` (a local Ray cluster); `pytest -m unit` runs
one tier alone. The suite runs on one pytest-xdist worker per core (`-n auto --dist loadfile` in
pyproject.toml: a module stays on one worker, with its fixtures and compiled programs); `-n 0` runs in
this process (for a debugger).

Processor fixtures: checkpoint directories with the stand-in tokenizer, ours and transformers' processors
on the same files. The builders live in `processor_fixtures.py` (benchmarks reuse them).

Keeping a new test cheap (the suite must stay under 10 minutes on 2 CPU cores and `-m unit` under 90 s;
on a tiny model nearly all of a test's time is XLA compiling, a second or more of CPU per program and
~10 s for a gradient):
- Take a model from a session fixture here (`model`/`tiny` for bad-input and file tests, `tiny_checkpoint`
  for training and anything that needs processor files, `processor`, `checkpoint_450m`) or a module-scoped
  one built from `tiny_model.tiny_config()`; never build a model per test, and reuse a config (its
  compiled programs come with it) rather than one a little different.
- Jit a function once, at module level (`jit_forward = jax.jit(forward, static_argnums=1)`), not inside
  a test or helper: a fresh `jax.jit` traces again. Draw random weights with `tiny_checkpoints.numpy_params`
  (no compilation) or `tiny_model.tiny_params` of a config other tests use (its per-shape programs are
  compiled already); a jitted `init_params` is one program, but its ~60 unrolled random draws take ~15 s
  to compile.
- Compile only what the assertion needs: a dtype or shape comes from `jax.eval_shape`; run a gradient or
  a training step only if its values are checked. Keep `max_new_tokens`, lengths and batch sizes within
  the ones other tests already use (each new static value is a new program).
- A subprocess costs a fresh JAX start and recompiles; add one only where a process boundary is the
  subject (device count, kill/resume, the console script), and pass `training_fixtures.subprocess_env`.
- The session shares one persistent compilation cache (below), so an identical program built again
  anywhere, subprocesses included, is loaded instead of compiled; it does not help a program that differs
  in any shape, dtype, static argument or XLA flag.
- Check with `pytest --durations=30 FILE`; on a shared machine compare CPU time, not wall time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import pytest
from compile_modes import use_fast_compile
from processor_fixtures import PIXEL_PARITY, make_checkpoint_dir, make_reference_processor
from tiny_checkpoints import write_tiny_checkpoint
from training_fixtures import (
    image_conversations,
    make_tiny_checkpoint,
    subprocess_env,
    train_command,
    uniform_conversations,
)

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.processing.processor import Lfm2VlProcessor

# One persistent compilation cache for the session, in-process and in every subprocess that sets none of
# its own: a program compiled once is loaded, not compiled again, wherever a later test builds it anew (a
# fresh `jax.jit` of the same function, a second trainer, a CLI run in a subprocess). A
# JAX_COMPILATION_CACHE_DIR of the user's is kept.
# pytest-xdist's workers inherit the directory the controlling process made (and removes at the end).
WORKER = "PYTEST_XDIST_WORKER" in os.environ
SESSION_COMPILE_CACHE = None if WORKER else tempfile.mkdtemp(prefix="lfm2vl-tests-compile-")
if SESSION_COMPILE_CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", SESSION_COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

TIERS = ("unit", "integration", "parity", "multidevice", "distributed")
# The command line's own persistent compilation cache stays off in tests (no files in the user's home);
# tests/integration/test_compile_cache.py turns it on where it is the subject.
os.environ.setdefault("LFM2VL_COMPILE_CACHE", "off")


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION_COMPILE_CACHE:
        shutil.rmtree(SESSION_COMPILE_CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (the default, pyproject.toml): one worker per core, at most one per 8 GB of memory (a
    worker holding a 450M-shape model and its compiled programs peaks near 8 GB)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(os.cpu_count() or 1, memory // (8 << 30)))


# Tiers whose programs XLA compiles as users' are: the comparisons with transformers, whose tolerances are
# set for that mode. Every other tier compiles with `jax_disable_most_optimizations` (LLVM at -O0 and no
# expensive LLVM passes; JAX's own test suite uses it), as `training_fixtures.subprocess_env`'s
# subprocesses always did: it cuts the suite's CPU time by about a fifth, nearly all of it compiling. HLO
# passes, hence fusions, kernel counts and copies, are the same; float results differ in the last bits
# (tests/integration/test_compile_mode.py holds the two modes together).
USERS_COMPILE_MODE_TIERS = ("parity",)


@pytest.fixture(autouse=True, scope="module")
def compile_mode(request: pytest.FixtureRequest) -> None:
    """Sets the module's compile mode (`compile_modes.use_fast_compile`)."""
    use_fast_compile(Path(request.node.fspath).parent.name not in USERS_COMPILE_MODE_TIERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def checkpoint_450m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Released 450M processor files (use_thumbnail false) + stand-in tokenizer.json."""
    return make_checkpoint_dir(tmp_path_factory.mktemp("lfm2-vl-450m"), "lfm2-vl-450m")


@pytest.fixture(scope="session")
def checkpoint_1_6b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reconstructed 1.6B processor files (use_thumbnail true, no preprocessor_config.json)."""
    return make_checkpoint_dir(tmp_path_factory.mktemp("lfm2-vl-1.6b"), "lfm2-vl-1.6b")


@pytest.fixture(scope="session")
def processor(checkpoint_450m: Path) -> Lfm2VlProcessor:
    return Lfm2VlProcessor.from_pretrained(checkpoint_450m)


@pytest.fixture(scope="session")
def reference_processor(checkpoint_450m: Path):
    return make_reference_processor(checkpoint_450m)


@pytest.fixture(scope="session")
def processor_thumbnail(checkpoint_1_6b: Path) -> Lfm2VlProcessor:
    return Lfm2VlProcessor.from_pretrained(checkpoint_1_6b)


@pytest.fixture(scope="session")
def reference_processor_thumbnail(checkpoint_1_6b: Path):
    return make_reference_processor(checkpoint_1_6b)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LFM2-VL transformers checkpoint with tokenizer and processor files (fine-tuning)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers checkpoint without processor files (`tiny_checkpoints.tiny_config`:
    vocabulary 512, 64 positions), for bad-input tests."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model") / "ckpt")


@pytest.fixture(scope="session")
def model(tiny: Path) -> Lfm2VlForConditionalGeneration:
    """`tiny`, loaded (shared: tests must not change it)."""
    return Lfm2VlForConditionalGeneration.from_pretrained(tiny, progress=False)


@pytest.fixture(scope="session")
def tiny_conversations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl: 4 image conversations (system turns, a second turn) over tests/data/images."""
    return image_conversations(tmp_path_factory.mktemp("conversations"), 4)


@pytest.fixture(scope="session")
def training_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl: 4 one-image conversations whose batches of two share one padded shape."""
    return uniform_conversations(tmp_path_factory.mktemp("training-data"))


@pytest.fixture(scope="session")
def reference_training_run(tmp_path_factory, tiny_checkpoint, training_data) -> Path:
    """RUN_DIR of an uninterrupted `lfm2vl train` subprocess on `training_data`
    (training_fixtures.TRAIN_FLAGS), started with --resume on an empty directory (so: fresh). Its
    compilation cache sits beside it."""
    root = tmp_path_factory.mktemp("reference-run")
    out = root / "run"
    command = train_command(tiny_checkpoint, training_data, out, "--resume")
    done = subprocess.run(
        command, env=subprocess_env(root / "cache"), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def pytest_sessionfinish(session: pytest.Session) -> None:
    if WORKER:  # what this worker measured goes to the controlling process, which prints the summary
        session.config.workeroutput["pixel_parity"] = dict(PIXEL_PARITY)


def pytest_testnodedown(node, error) -> None:
    PIXEL_PARITY.update(getattr(node, "workeroutput", {}).get("pixel_parity", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if PIXEL_PARITY:
        terminalreporter.section("processor pixel parity: share of pixel values equal to transformers'")
        for case, share in sorted(PIXEL_PARITY.items()):
            terminalreporter.write_line(f"{share:9.5%}  {case}")
