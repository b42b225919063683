"""A 2-process `jax.distributed` run on the CPU (localhost coordinator, one device per process, mesh
data=2): each process loads its own rows of every batch, and the run logs the single-process losses (the
session's reference run: same command, one process)."""

from __future__ import annotations

import socket
import subprocess

from training_fixtures import TRAIN_STEPS, read_metrics, subprocess_env, train_command

# The gradient is summed over the two processes' rows by a collective instead of in one device's
# reduction: float32 rounding only.
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_run_gives_the_single_process_losses(
    tmp_path, tiny_checkpoint, training_data, reference_training_run
):
    out = tmp_path / "run"
    address = f"localhost:{_free_port()}"
    env = subprocess_env(tmp_path / "cache")
    processes = [
        subprocess.Popen(
            train_command(
                tiny_checkpoint,
                training_data,
                out,
                *("--mesh", "data=2", "--coordinator-address", address),
                *("--num-processes", "2", "--process-id", str(rank)),
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        results = [p.communicate(timeout=900) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    ours, expected = read_metrics(out), read_metrics(reference_training_run)
    assert sorted(ours) == list(range(1, TRAIN_STEPS + 1))
    for step, line in expected.items():
        assert abs(ours[step]["loss"] - line["loss"]) <= LOSS_RTOL * line["loss"], step
        assert ours[step]["tokens"] == line["tokens"]
    # Each process saved its own data-iterator state; process 0 alone wrote the trained model.
    last = out / "checkpoints" / str(TRAIN_STEPS) / "data"
    assert sorted(p.name for p in last.glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert (out / "final" / "model.safetensors").exists()
