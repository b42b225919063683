"""Checkpoint import: layouts, sharding, dtypes, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from reference_models import build_reference, save_reference, tiny_config
from safetensors.numpy import load_file, save_file

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.hf import CheckpointError, iter_hf_tensors, load_hf_checkpoint
from lfm2vl_jax.checkpoint.hub import CheckpointNotFoundError
from lfm2vl_jax.checkpoint.safetensors_io import SafetensorsError
from lfm2vl_jax.config import DTypePolicy, RuntimeConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path_factory.mktemp("ckpt")
    reference = build_reference(tiny_config(), seed=7)
    save_reference(reference, directory)
    return directory, load_file(directory / "model.safetensors")


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    shutil.copytree(saved[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_every_tensor_lands_where_the_export_reads_it_back(saved):
    """Import then walk the same table backwards: every reference tensor comes back bit for bit."""
    directory, tensors = saved
    config, params = load_hf_checkpoint(directory, progress=False)
    exported = dict(iter_hf_tensors(config, params))
    assert sorted(exported) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_per_layer_layout_reads_and_writes_every_tensor(saved):
    directory, tensors = saved
    config, params = load_hf_checkpoint(directory, RuntimeConfig(scan_layers=False), progress=False)
    exported = dict(iter_hf_tensors(config, params))
    assert sorted(exported) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_sharded_checkpoint_with_index(saved, tmp_path):
    directory, tensors = saved
    shutil.copy(directory / "config.json", tmp_path)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, tmp_path / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_hf_checkpoint(tmp_path, progress=False)
    _, single = load_hf_checkpoint(directory, progress=False)
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_duplicated_tensor_across_shards_is_refused(saved, tmp_path):
    directory, tensors = saved
    shutil.copy(directory / "config.json", tmp_path)
    key = "model.language_model.embed_tokens.weight"
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({key: tensors[key]}, tmp_path / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in tensors} | {key: "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"{key}.*appears twice"):
        load_hf_checkpoint(tmp_path, progress=False)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop("model.language_model.layers.2.self_attn.q_proj.weight"),
            r"missing.*layers\.2\.self_attn\.q_proj",
        ),
        (
            lambda t: t.update({"model.language_model.layers.2.extra.weight": np.zeros(3, np.float32)}),
            r"no place.*extra",
        ),
        (
            lambda t: t.update({"model.multi_modal_projector.linear_2.bias": np.zeros(3, np.float32)}),
            r"linear_2\.bias.*shape \(3,\), expected \(64,\)",
        ),
    ],
    ids=["missing", "unmapped", "wrong-shape"],
)
def test_bad_tensors_are_refused_naming_the_key(copy, edit, message):
    edit_tensors(copy, edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(copy, progress=False)


def test_bfloat16_cast_and_untouched_bfloat16_checkpoint(saved, tmp_path):
    directory, tensors = saved
    _, params = load_hf_checkpoint(directory, uniform(jnp.bfloat16), progress=False)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    embed = tensors["model.language_model.embed_tokens.weight"]
    expected = torch.from_numpy(embed).to(torch.bfloat16).float().numpy()  # torch's rounding
    np.testing.assert_array_equal(np.asarray(params["text"]["embed"], np.float32), expected)

    # A bf16 checkpoint (as released) loads without torch and round-trips exactly.
    reference = build_reference(tiny_config(), seed=7, dtype=torch.bfloat16)
    save_reference(reference, tmp_path)
    config, params = load_hf_checkpoint(tmp_path, uniform(jnp.bfloat16), progress=False)
    exported = dict(iter_hf_tensors(config, params))
    for name, value in reference.state_dict().items():
        if name in exported:
            np.testing.assert_array_equal(exported[name], value.float().numpy().astype(ml_dtypes.bfloat16))


def test_truncated_safetensors_names_the_file(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: truncated"):
        load_hf_checkpoint(copy, progress=False)


def test_corrupt_header_names_the_file(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at "
    path.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=r"model\.safetensors: corrupt header"):
        load_hf_checkpoint(copy, progress=False)


def test_missing_weights_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(tmp_path, progress=False)


def test_mlp_width_disagreeing_with_config_is_taken_from_the_weights(copy):
    raw = json.loads((copy / "config.json").read_text())
    raw["text_config"]["intermediate_size"] = 400  # the auto-adjust rule now gives 288, the weights hold 128
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="MLP width"):
        config, _ = load_hf_checkpoint(copy, progress=False)
    assert config.text.intermediate_size == 128


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointNotFoundError, match="could not fetch 'LiquidAI/LFM2-VL-450M'.*local directory"
    ):
        Lfm2VlForConditionalGeneration.from_pretrained("LiquidAI/LFM2-VL-450M")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        Lfm2VlForConditionalGeneration.from_pretrained("./does/not/exist")


def uniform(dtype, scan_layers: bool = True) -> RuntimeConfig:
    return RuntimeConfig(dtypes=DTypePolicy.uniform(dtype), scan_layers=scan_layers)
