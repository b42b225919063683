"""LoRA runs (torch-free): a LoRA run with dropout stopped and resumed logs exactly the losses of an
unstopped run, and QLoRA trains on an int4 base and exports a float checkpoint.
(The pieces: tests/unit/test_lora.py; against peft: tests/parity/test_lora_peft.py.)"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_fixtures import read_metrics

from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.nn.model import forward
from lfm2vl_jax.nn.quant import QuantizedWeight
from lfm2vl_jax.training import trainer as trainer_module
from lfm2vl_jax.training.config import SFTConfig
from lfm2vl_jax.training.lora import LoraConfig
from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
from lfm2vl_jax.training.step import Trainable
from lfm2vl_jax.training.trainer import SFTTrainer, memory_needs


def test_a_lora_run_with_dropout_stopped_and_resumed_logs_the_losses_of_an_unstopped_run(
    tmp_path, tiny_checkpoint, training_data, monkeypatch
):
    """Dropout masks come from the state's key and update count, so the resumed steps draw the masks the
    unstopped run drew (two micro-batches per step: each its own masks)."""

    def run(output: Path, **options) -> None:
        settings = {"steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 2, "learning_rate": 1e-2}
        settings |= {"lora_rank": 4, "lora_dropout": 0.3, "progress": False}
        paths = {"model": str(tiny_checkpoint), "data": str(training_data), "output": str(output)}
        SFTTrainer(SFTConfig(**paths, **(settings | options))).train()

    run(tmp_path / "unstopped")
    original, calls = trainer_module.global_batch, []

    def stop_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # after step 2's checkpoint, as a kill would
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "global_batch", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped")
    monkeypatch.setattr(trainer_module, "global_batch", original)
    assert max(read_metrics(tmp_path / "stopped")) == 2
    run(tmp_path / "stopped", resume=True)
    expected, resumed = read_metrics(tmp_path / "unstopped"), read_metrics(tmp_path / "stopped")
    assert [resumed[s]["loss"] for s in range(1, 5)] == [expected[s]["loss"] for s in range(1, 5)]
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "stopped" / weights).read_bytes() == (tmp_path / "unstopped" / weights).read_bytes()


def test_qlora_trains_adapters_on_an_int4_base_and_exports_a_float_checkpoint(
    tmp_path, tiny_checkpoint, training_data
):
    """--quantize int4 --lora-rank: the frozen projections are held int4 (the memory estimate counts that),
    the adapters train in float32, final/ holds the dequantized base with the adapters merged (what the
    QLoRA forward computes), adapter/ the adapters."""
    options = {"steps": 2, "batch_size": 2, "save_every": 2, "learning_rate": 1e-2, "progress": False}
    paths = {"model": str(tiny_checkpoint), "data": str(training_data), "output": str(tmp_path / "run")}
    trainer = SFTTrainer(SFTConfig(**paths, **options, lora_rank=4, quantize="int4", quant_group_size=16))
    trainer.train()
    run = trainer.run
    leaves = jax.tree.leaves(run.frozen, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    quantized = [x for x in leaves if isinstance(x, QuantizedWeight)]
    assert len(quantized) >= 10 and all(x.bits == 4 for x in quantized)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run").values()]
    assert all(np.isfinite(losses)) and losses[1] != losses[0]

    config, merged = load_hf_checkpoint(tmp_path / "run" / "final", progress=False)
    ids = jnp.asarray([[1, 5, 9, 200, 7, 3]])
    mask = jnp.ones_like(ids)
    forward_fn = jax.jit(forward, static_argnames="config")
    ours = forward_fn(run.trainable.assemble(run.state.params, run.frozen), run.config, ids, mask)
    exported = forward_fn(merged, config, ids, mask)
    assert jnp.abs(ours - exported).max() <= 1e-4 * jnp.abs(exported).max()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()

    tx = make_optimizer(OptimizerConfig(1e-3, 10), parameter_labels(run.trainable.specs()))
    float_lora = Trainable(run.config.with_runtime(quantization=None), ("vision", "text"), LoraConfig(4))
    quantized_bytes = memory_needs(run.trainable, tx)["frozen weights"]
    assert quantized_bytes == sum(x.nbytes for x in jax.tree.leaves(run.frozen))  # what the run holds
    # The tiny model's float embedding is 40% of its weights; every projection is int4.
    assert quantized_bytes < 0.6 * memory_needs(float_lora, tx)["frozen weights"]
