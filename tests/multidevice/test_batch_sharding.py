"""The continuous-batching engine sharded over 8 host CPU devices (slots over `data`, heads over
`tensor`) gives every request the tokens it gets on one device (in a subprocess: the device count is
fixed when jax starts; compiled without XLA's backend optimisations, as every multidevice run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training_fixtures import subprocess_env


def test_batch_engine_sharded_over_8_devices_matches_one_device(tmp_path):
    env = subprocess_env(tmp_path / "cache", devices=8)
    script = Path(__file__).with_name("batch_sharded_check.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["tokens_equal"], result
    assert sum(result["lengths"]) >= 12  # (limits 6, 8, 10, 12; the eos may end one early)
    # (layers, slots, kv heads, capacity, head dim): slots over data; 2 kv heads do not divide tensor=4.
    assert result["cache_k_spec"] == "P(None, 'data')", result["cache_k_spec"]
