"""LoRA applied unmerged (torch-free): the lowered train step takes no full-size weight gradient, the
adapter's update survives bfloat16 compute, dropout follows peft's semantics, the memory estimate counts
what LoRA holds, peft-format adapters round-trip and mismatched ones are refused, bad options are one
error each. (Runs: tests/integration/test_lora_runs.py. Gradients, logits and adapter files against peft
itself: tests/parity/test_lora_peft.py.)"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_stats import computations
from training_fixtures import tiny_config

from lfm2vl_jax.nn.layers import LoraWeight, lora_update, project
from lfm2vl_jax.nn.params import abstract_params, is_spec, param_specs
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.training.config import SFTConfig, TrainingError
from lfm2vl_jax.training.lora import LoraConfig, LoraError, init_adapters
from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
from lfm2vl_jax.training.peft_adapter import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from lfm2vl_jax.training.step import Trainable, abstract_state, make_train_step, state_shardings
from lfm2vl_jax.training.trainer import memory_needs


def _config(**runtime):
    config = tiny_config()
    return config.with_runtime(mesh=make_mesh(), **runtime)


def _train_step_hlo(trainable: Trainable) -> str:
    """The unoptimised HLO of a train step (3 rows of 40 tokens, 5 image tiles of 24 patches: no size
    that a weight has)."""
    tx = make_optimizer(OptimizerConfig(1e-3, 10), parameter_labels(trainable.specs()))
    abstract = abstract_state(trainable, tx)
    step = make_train_step(trainable, lambda s: 1e-3, state_shardings(trainable, tx, abstract), 64)
    _, frozen = trainable.split(abstract_params(trainable.config))
    shape = jax.ShapeDtypeStruct
    patch = trainable.config.vision.num_channels * trainable.config.vision.patch_size**2
    batch = {
        "input_ids": shape((1, 3, 40), jnp.int32),
        "attention_mask": shape((1, 3, 40), jnp.int32),
        "loss_mask": shape((1, 3, 40), jnp.int32),
        "pixel_values": shape((1, 5, 24, patch), jnp.float32),
        "pixel_attention_mask": shape((1, 5, 24), jnp.int32),
        "spatial_shapes": shape((1, 5, 2), jnp.int32),
    }
    return step.lower(abstract, frozen, batch).as_text(dialect="hlo")


def _weight_shapes(specs) -> set[tuple[int, ...]]:
    """Every shape a product computing a weight's gradient could give: each weight matrix's own (per
    layer and stacked), transposed, and with its axes merged into (inputs, outputs) either way."""
    shapes = set()
    for spec in jax.tree.leaves(specs, is_leaf=is_spec):
        if len(spec.shape) > 1 and spec.init == "zeros":  # biases (norms are 1-D)
            continue
        for shape in (spec.shape, spec.shape[1:] if spec.axes[0] == "layers" else spec.shape):
            if len(shape) < 2:
                continue
            shapes |= {shape, shape[::-1]}
            for cut in range(1, len(shape)):
                merged = (math.prod(shape[:cut]), math.prod(shape[cut:]))
                shapes |= {merged, merged[::-1]}
    return shapes


def _product_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Output shapes of every matrix product (dot, convolution) in any computation of the program."""
    found = set()
    for instructions in computations(hlo)[0].values():
        for ins in instructions:
            if ins.op in ("dot", "convolution"):
                dims = re.match(r"\w+\[([\d,]*)\]", ins.shape).group(1)
                found.add(tuple(int(d) for d in dims.split(",") if d))
    return found


def test_lora_train_step_takes_no_full_size_weight_gradient_and_draws_dropout_masks():
    config = _config()
    lora = Trainable(config, ("vision", "text"), LoraConfig(rank=4, dropout=0.1))
    # Frozen weights' shapes, less an adapter gradient's (the grid (4, 4, 32) merges to A's 128 x 4).
    weights = _weight_shapes(param_specs(config)) - _weight_shapes(lora.specs())
    hlo = _train_step_hlo(lora)
    found = _product_shapes(hlo) & weights
    assert not found, found
    assert "threefry2x32" in hlo  # the dropout masks are drawn in the step (none without dropout)
    assert "threefry2x32" not in _train_step_hlo(Trainable(config, ("vision", "text"), LoraConfig(rank=4)))
    # The same reading of a full fine-tuning step finds its weight gradients.
    full = Trainable(config, ("vision", "projector", "text"))
    assert len(_product_shapes(_train_step_hlo(full)) & weights) >= 10


def test_a_small_update_survives_bfloat16_compute():
    """At ||dW|| / ||W|| = 1e-4 on a bfloat16 weight (checkpoints are bfloat16), W + dW rounds back to W
    in bfloat16 almost everywhere: a merged weight applies 2% of the entries of the update, which is off by
    99% (relative). The unmerged adapter's update, computed from bfloat16 inputs, is the float32 update
    within bfloat16's relative error (measured 0.4%). (Logits are no measure of this: a forward pass in
    bfloat16 rounds every activation to 2^-9 relative, 40x such an update, in peft as here.)"""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 16, 64))
    w = (jax.random.normal(keys[1], (64, 4, 16)) / 8).astype(jnp.bfloat16).astype(jnp.float32)
    a = jax.random.normal(keys[2], (64, 8)) / 8
    b = jax.random.normal(keys[3], (8, 4, 16))
    dw = jnp.einsum("dr,rnh->dnh", a, b)
    b = b * 1e-4 * jnp.linalg.norm(w) / jnp.linalg.norm(dw)
    adapted = LoraWeight(w, a, b, scale=1.0)
    equation = "btd,dnh->btnh"
    exact = lora_update(equation, x, adapted)
    dw = jnp.einsum("dr,rnh->dnh", a, b)
    applied = (w + dw).astype(jnp.bfloat16).astype(jnp.float32) - w  # what a merged bf16 forward applies
    assert jnp.linalg.norm(applied - dw) >= 0.9 * jnp.linalg.norm(dw)
    low = jax.tree.map(lambda t: t.astype(jnp.bfloat16), adapted)
    update = lora_update(equation, x.astype(jnp.bfloat16), low).astype(jnp.float32)
    assert jnp.abs(update - exact).max() <= 2e-2 * jnp.abs(exact).max()
    assert project(equation, x.astype(jnp.bfloat16), low).dtype == jnp.bfloat16


def test_dropout_zeroes_inputs_with_its_rate_and_rescales_the_rest():
    x = jnp.ones((4, 256, 32))
    a = jnp.eye(32, 32)
    b = jnp.eye(32, 32)
    key = jax.random.key_data(jax.random.key(3))
    dropped = LoraWeight(jnp.zeros((32, 32)), a, b, key, scale=1.0, dropout=0.25)
    y = project("btd,de->bte", x, dropped)  # x @ A @ B = dropout(x)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, float(np.float32(1 / 0.75))}
    assert abs(float((y == 0).mean()) - 0.25) < 0.01
    other = project("btd,de->bte", x, dropped.replace(dropout_key=jax.random.key_data(jax.random.key(4))))
    assert not jnp.array_equal(y, other)  # another key, another mask
    assert jnp.array_equal(project("btd,de->bte", x, dropped.replace(dropout_key=None)), x)  # evaluation


def test_memory_estimate_counts_what_lora_holds():
    """Adapters, their gradients and two Adam moments, plus the whole frozen base (float32) and the
    optimizer's counts; no merged copies, no full-size gradients."""
    config = _config()
    lora = Trainable(config, ("vision", "text"), LoraConfig(rank=4))
    tx = make_optimizer(OptimizerConfig(1e-3, 10), parameter_labels(lora.specs()))
    needs = memory_needs(lora, tx)
    adapter_bytes = 4 * sum(math.prod(s.shape) for s in jax.tree.leaves(lora.specs(), is_leaf=is_spec))
    base_bytes = 4 * sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(config), is_leaf=is_spec))
    assert needs["adapters"] == needs["their gradients"] == adapter_bytes
    assert needs["frozen weights"] == base_bytes
    assert 2 * adapter_bytes <= needs["optimizer state"] <= 2 * adapter_bytes + 1024  # mu, nu, counts
    full = Trainable(config, ("vision", "projector", "text"))
    full = memory_needs(full, make_optimizer(OptimizerConfig(1e-3, 10), parameter_labels(full.specs())))
    assert full["trained weights"] == base_bytes and full["their gradients"] == base_bytes


def test_peft_adapter_round_trip_and_mismatches(tmp_path):
    config = _config()
    lora = LoraConfig(rank=4, alpha=16.0, dropout=0.1)
    trainable = Trainable(config, ("vision", "text"), lora)
    adapters = init_adapters(trainable.adapted, lora, jax.random.key(0))
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.5, adapters)
    save_peft_adapter(tmp_path / "adapter", config, adapters, trainable.adapted, lora, "base-model")
    written = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 16.0 and written["lora_dropout"] == 0.1
    assert "model.language_model.layers.1.self_attn.q_proj" in written["target_modules"]
    assert len(written["target_modules"]) == 36
    loaded = load_peft_adapter(tmp_path / "adapter", config, trainable.adapted, lora)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)

    def refused(message: str, other: Trainable, directory: Path = tmp_path / "adapter") -> None:
        with pytest.raises(LoraError, match=message):
            load_peft_adapter(directory, config, other.adapted, other.lora)

    refused(r"rank r=4, but --lora-rank 8", Trainable(config, ("vision", "text"), LoraConfig(8, 16.0)))
    refused(r"lora_alpha=16.0, but --lora-alpha 8", Trainable(config, ("vision", "text"), LoraConfig(4)))
    text_only = Trainable(config, ("text",), lora)
    refused(r"adapters for modules this run does not adapt: model\.vision_tower", text_only)
    no_conv = Trainable(config, ("vision", "text"), LoraConfig(4, 16.0, ("attn", "mlp")))
    refused(r"targets do not match.*conv\.in_proj.*--lora-targets", no_conv)
    written["use_dora"] = True
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / CONFIG_FILE).write_text(json.dumps(written))
    refused(r"use_dora=True is not supported", trainable, tmp_path / "dora")
    refused(r"not a directory", trainable, tmp_path / "missing")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lora_rank": 4, "lora_dropout": 1.0}, r"--lora-dropout must be a number in \[0, 1\)"),
        ({"lora_rank": 4, "lora_dropout": -0.1}, r"--lora-dropout must be a number in \[0, 1\)"),
        ({"lora_rank": 4, "lora_dropout": float("nan")}, r"--lora-dropout must be a number in \[0, 1\)"),
        ({"lora_dropout": 0.1}, "--lora-dropout applies to LoRA runs: give --lora-rank too"),
        ({"init_adapters": "dir"}, "--init-adapters applies to LoRA runs"),
        ({"lora_rank": 4, "freeze": "vision,language"}, "vision and language are both frozen"),
        ({"quantize": "int4"}, r"--quantize holds the frozen base quantized \(QLoRA\): give --lora-rank"),
        ({"lora_rank": 4, "quantize": "int3"}, "--quantize int3: unknown quantization scheme"),
        ({"lora_rank": 4, "quantize": "int8", "quant_group_size": 32}, "group size 32 is for int4"),
        ({"lora_rank": 4, "quant_group_size": 32}, "--quant-group-size is for --quantize int4"),
    ],
)
def test_bad_lora_options_are_one_error(options, message):
    with pytest.raises(TrainingError, match=message):
        SFTConfig(model="m", data="d", output="o", **options)


def test_lora_refuses_targets_that_are_all_frozen_and_fused_projections():
    with pytest.raises(LoraError, match=r"--lora-targets conv: no such weights .*\(vision\)"):
        _ = Trainable(_config(), ("vision",), LoraConfig(4, targets=("conv",))).adapted
    with pytest.raises(LoraError, match="fused projections"):
        _ = Trainable(_config(fused_projections=True), ("text",), LoraConfig(4)).adapted
