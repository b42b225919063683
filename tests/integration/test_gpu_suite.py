"""benchmarks/gpu_suite.py cannot rot: its smoke plan has every step of the device plan, and its quickest
step runs end to end on the CPU (subprocess, JSON, summary table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))
import gpu_suite  # noqa: E402


def test_smoke_runs_every_step_of_the_device_suite():
    for experiments in (False, True):
        full = [s.name for s in gpu_suite.steps(smoke=False, torch_gpu=True, experiments=experiments)]
        smoke = [s.name for s in gpu_suite.steps(smoke=True, torch_gpu=False, experiments=experiments)]
        assert smoke == full and len(set(full)) == len(full)
    assert sum(s.limit_s for s in gpu_suite.steps(False, True, False)) <= 450  # the default budget


def test_quickest_step_runs(tmp_path):
    # Unoptimised code (half the compile time): the run is checked, not its speed.
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
    }
    suite = REPOSITORY / "benchmarks" / "gpu_suite.py"
    argv = [sys.executable, str(suite), "--smoke", "--out", str(tmp_path), "--steps", "generate-1.6b"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert record["status"] == "ok", record
    generate = record["result"]["models"]["tiny"]
    assert generate["roofline"]["fractions"]["per-layer_device_loop"]["measured"] > 0
    assert record["result"]["bandwidth"]["probe"] == "read"  # the CPU keeps its read probe
    assert "generate-1.6b" in done.stdout and "roofline" in done.stdout
