"""The tests compile with LLVM at -O0 (tests/conftest.py); users' programs at XLA's default. The two differ
only in float rounding: the tiny model's logits and every loss gradient agree within 1e-5 of each
tensor's largest value (float32 rounding through six layers; measured up to 6e-6, where the parity tests
allow 1e-5 for logits and 1e-4 for gradients; key biases, whose gradient is rounding noise, within 1e-5
of the whole gradient's largest), and greedy tokens are the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from compile_mode_check import outputs
from conftest import TEST_XLA_FLAG
from training_fixtures import subprocess_env

HERE = Path(__file__).resolve().parent


def test_the_tests_compile_mode_computes_what_the_default_one_does(tmp_path):
    assert TEST_XLA_FLAG in os.environ.get("XLA_FLAGS", "")  # this process runs the tests' mode
    env = subprocess_env(tmp_path / "cache") | {"XLA_FLAGS": ""}  # XLA's default optimization
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env["PYTHONPATH"]])
    saved = tmp_path / "default.npz"
    done = subprocess.run(
        [sys.executable, str(HERE / "compile_mode_check.py"), str(saved)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    default, ours = np.load(saved), outputs()
    assert sorted(default.files) == sorted(ours) and len(ours) > 40
    np.testing.assert_array_equal(ours["tokens"], default["tokens"])
    largest_gradient = max(np.abs(default[name]).max() for name in default.files if name.startswith("grad"))
    for name, value in ours.items():
        # A key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys):
        # both modes give rounding noise, held to the scale of the whole gradient.
        scale = largest_gradient if "['k']['bias']" in name else np.abs(default[name]).max()
        assert np.abs(value - default[name]).max() <= 1e-5 * scale, name
