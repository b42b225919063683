"""`RuntimeConfig.fused_projections`: q/k/v in one kernel (per KV head: its query heads, key, value) and
gate/up in one. The same model as the separate kernels (logits, greedy tokens), fused from the same
checkpoint tensors at load time and split back on export and in orbax checkpoints (the files do not
change), refused where a tensor axis cannot split the fused kernel by KV head."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from tiny_checkpoints import numpy_params, tiny_config, write_tiny_checkpoint

from lfm2vl_jax import Lfm2VlForConditionalGeneration, RuntimeConfig
from lfm2vl_jax.checkpoint.canonical import from_canonical, to_canonical
from lfm2vl_jax.checkpoint.orbax import load_orbax_checkpoint, save_orbax_checkpoint
from lfm2vl_jax.checkpoint.safetensors_io import SafetensorsFile
from lfm2vl_jax.config import ConfigError
from lfm2vl_jax.nn.params import param_shardings

BASE = tiny_config()
# 4 query heads on 2 KV heads: the fused kernel must keep each KV head's query group together.
CONFIG = dataclasses.replace(
    BASE, text=dataclasses.replace(BASE.text, num_heads=4, num_kv_heads=2, head_dim=8)
)
IDS = np.random.default_rng(0).integers(1, 400, (2, 12))


def model(scan_layers: bool, fused: bool) -> Lfm2VlForConditionalGeneration:
    canonical = to_canonical(numpy_params(CONFIG), CONFIG)
    config = CONFIG.with_runtime(scan_layers=scan_layers, fused_projections=fused)
    return Lfm2VlForConditionalGeneration(config, jax.tree.map(np.asarray, from_canonical(canonical, config)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fused_model_equals_separate(scan_layers):
    separate, fused = model(scan_layers, False), model(scan_layers, True)
    assert "qkv" in str(jax.tree_util.tree_structure(fused.params))
    expected = np.asarray(separate(IDS).logits)
    got = np.asarray(fused(IDS).logits)
    # The same products, each output's sum over D in a possibly different blocking: float32 rounding.
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    tokens = np.asarray(separate.generate(IDS, max_new_tokens=8, eos_token_id=[]))
    np.testing.assert_array_equal(np.asarray(fused.generate(IDS, max_new_tokens=8, eos_token_id=[])), tokens)


def test_checkpoint_tensors_are_fused_at_load_and_split_on_export(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "source", CONFIG)
    runtime = RuntimeConfig(scan_layers=True, fused_projections=True)
    loaded = Lfm2VlForConditionalGeneration.from_pretrained(source, runtime=runtime, progress=False)
    expected = model(True, True).params
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), expected)
    loaded.save_pretrained(tmp_path / "export")
    original, exported = (
        SafetensorsFile(source / "model.safetensors"),
        SafetensorsFile(tmp_path / "export" / "model.safetensors"),
    )
    assert sorted(exported.keys()) == sorted(original.keys())
    for key in original.keys():  # noqa: SIM118
        np.testing.assert_array_equal(exported.read(key), original.read(key), err_msg=key)


def test_orbax_checkpoints_store_the_separate_kernels(tmp_path):
    fused = model(False, True)
    save_orbax_checkpoint(tmp_path / "ckpt", fused.config, fused.params)
    config, params = load_orbax_checkpoint(tmp_path / "ckpt")  # the stored layout: per layer, separate
    assert not config.runtime.fused_projections
    jax.tree.map(np.testing.assert_array_equal, params, model(False, False).params)
    _, again = load_orbax_checkpoint(
        tmp_path / "ckpt", RuntimeConfig(scan_layers=True, fused_projections=True)
    )
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again), model(True, True).params)


def test_tensor_axis_that_kv_heads_do_not_divide_is_refused():
    mesh = AbstractMesh((4,), ("tensor",))
    fine = CONFIG.with_runtime(mesh=AbstractMesh((2,), ("tensor",)), fused_projections=True)
    param_shardings(fine)  # 2 KV heads on a 2-way axis: each shard holds one KV head's q, k and v
    with pytest.raises(ConfigError, match=r"'tensor',\) \(4-way\), which its 2 KV heads do not divide"):
        param_shardings(CONFIG.with_runtime(mesh=mesh, fused_projections=True))
    with warnings.catch_warnings():  # separate kernels: the KV heads stay replicated, with a warning
        warnings.simplefilter("ignore")
        param_shardings(CONFIG.with_runtime(mesh=mesh))
