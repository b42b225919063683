"""Sharded inference: the same `generate` with params and cache sharded over a data x tensor mesh of 8
host CPU devices gives the same tokens as one device (run in a subprocess: the device count is fixed when
jax starts; compiled without XLA's backend optimisations, as every multidevice run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from reference_models import (
    build_reference,
    prompt_with_images,
    ragged_batch,
    random_images,
    save_reference,
    single,
    tiny_config,
)
from training_fixtures import subprocess_env


def test_generate_sharded_over_8_devices_matches_one_device(tmp_path):
    config = tiny_config()
    save_reference(build_reference(config, seed=5), tmp_path / "model")
    rows = [
        single(prompt_with_images(config, [7], seed=1)),
        single(
            prompt_with_images(config, [2, (4, 6), 3], seed=2), random_images(config, [(4, 6)], 64, seed=2)
        ),
        single(
            prompt_with_images(config, [5, (2, 8), 1, (8, 8), 2], seed=3),
            random_images(config, [(2, 8), (8, 8)], 64),
        ),
    ]
    np.savez(tmp_path / "inputs.npz", **ragged_batch(rows))
    env = subprocess_env(tmp_path / "cache", devices=8)
    script = Path(__file__).with_name("sharded_check.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "inputs.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert "tensor" in result["mlp_gate_spec"] and result["mlp_gate_shards"] == 8
    # 4 query heads split over tensor=4; 2 kv heads do not divide by 4 and stay replicated.
    assert "tensor" in result["attn_q_spec"] and "tensor" not in result["attn_k_spec"]
    assert result["tokens_equal"] and result["per_layer_tokens_equal"]
    assert result["cache_k_spec"] == "P(None, 'data')", result[
        "cache_k_spec"
    ]  # (repeats, rows, seq, heads, dim)
    # Sharded matmuls sum their partial products in another order: float32 rounding only.
    assert result["logits_relative_error"] <= 1e-5
