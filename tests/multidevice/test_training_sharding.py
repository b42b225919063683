"""Sharded fine-tuning on 8 host CPU devices (in a subprocess: the device count is fixed when jax
starts): one train step on meshes data=8, data=2 x fsdp=2 x tensor=2 and fsdp=8 equals the step on one
device; a batch that does not divide the mesh is refused before any compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training_fixtures import subprocess_env

# fp32: the sharded matmuls and reductions add the same terms in other orders.
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5  # per tensor, relative to its largest entry, after one AdamW update (lr 1e-2)


def test_train_step_on_meshes_equals_one_device(tmp_path, tiny_checkpoint, tiny_conversations):
    env = subprocess_env(tmp_path / "cache", devices=8)
    script = Path(__file__).with_name("train_step_check.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoint), str(tiny_conversations), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for mesh in ("data=8", "data=2,fsdp=2,tensor=2", "fsdp=8"):
        result = report[mesh]
        got, expected = result["metrics"], result["reference_metrics"]
        for key in ("loss", "grad_norm"):
            assert abs(got[key] - expected[key]) <= LOSS_RTOL * abs(expected[key]), (mesh, key)
        assert got["tokens"] == expected["tokens"]
        name, error = result["worst_param"]
        assert error <= PARAM_RTOL, (mesh, name, error)
    # Weights are sharded as the rules say: the MLP over fsdp (embed) and tensor (mlp).
    assert report["fsdp=8"]["gate_spec"] == "P(None, 'fsdp', None)" and report["fsdp=8"]["gate_shards"] == 8
    assert "'tensor'" in report["data=2,fsdp=2,tensor=2"]["gate_spec"]
    assert "do not divide over the mesh's 8 batch shards" in report["divisibility_error"]
