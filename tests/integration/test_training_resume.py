"""Exact resume: `lfm2vl train` killed with SIGKILL (mid-way through an asynchronous checkpoint save, then
at another moment) and restarted with the same command plus --resume logs exactly the losses of a run
never stopped (the session's reference run, itself started with --resume on an empty directory: with no
checkpoint, --resume starts fresh).

Every run is a subprocess; they share the reference run's compilation cache, so nothing recompiles."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

from training_fixtures import TRAIN_STEPS, read_metrics, subprocess_env, train_command

DRIVER = Path(__file__).with_name("train_driver.py")


def _run(command: list[str], env: dict[str, str], kill_when=None, timeout: float = 600) -> None:
    """Runs `command` to its end, or SIGKILLs it as soon as `kill_when(stdout lines so far)` holds."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if kill_when is not None and kill_when(lines):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
    expected = -signal.SIGKILL if kill_when is not None else 0
    assert process.returncode == expected, process.stderr.read()[-3000:]


def _complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def _losses(out: Path) -> dict[int, tuple]:
    return {s: (m["loss"], m["grad_norm"], m["learning_rate"]) for s, m in read_metrics(out).items()}


def test_killed_runs_resume_with_exactly_the_losses_of_an_unstopped_run(
    tmp_path, tiny_checkpoint, training_data, reference_training_run
):
    expected = _losses(reference_training_run)
    assert sorted(expected) == list(range(1, TRAIN_STEPS + 1))
    cache = reference_training_run.parent / "cache"
    env = subprocess_env(cache)
    out = tmp_path / "run"
    command = train_command(tiny_checkpoint, training_data, out, "--resume", driver=DRIVER)

    # 1. Killed while step 4's checkpoint is being written in the background: step 2's is the last complete.
    slow = subprocess_env(cache, LFM2VL_TEST_SLOW_SAVE="4:60")
    _run(command, slow, kill_when=lambda lines: "saving step 4\n" in lines)
    assert _complete_checkpoints(out)[-1] == 2
    assert max(read_metrics(out)) >= 3  # steps past the checkpoint were logged, and will be redone
    # 2. Resumed, then killed at some moment after step 6 was logged.
    metrics = out / "metrics.jsonl"
    _run(command, env, kill_when=lambda _: metrics.exists() and '"step": 6,' in metrics.read_text())
    assert _complete_checkpoints(out)[-1] >= 4
    # 3. Resumed to the end.
    _run(command, env)
    assert _losses(out) == expected
    final = "final/model.safetensors"
    assert (out / final).read_bytes() == (reference_training_run / final).read_bytes()
