"""Fine-tuning runs on a tiny model (torch-free): overfitting, the metrics and run directory, LoRA's
zero-initialised adapters, the Flax modules, the command line and the checks made before any compute."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from training_fixtures import conversation, tiny_config, write_jsonl

from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.cli import build_parser, main, train_options
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.nn.params import init_params
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training import trainer as trainer_module
from lfm2vl_jax.training.config import SFTConfig, TrainingError
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations
from lfm2vl_jax.training.lora import LoraConfig, init_adapters
from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
from lfm2vl_jax.training.step import (
    Trainable,
    TrainState,
    abstract_state,
    make_train_step,
    state_shardings,
    token_loss_sum,
)
from lfm2vl_jax.training.trainer import SFTTrainer, global_batch


def test_overfits_four_image_conversations(tmp_path, tiny_checkpoint, tiny_conversations):
    """Loss falls by 90% within 60 steps; metrics.jsonl, final/, TensorBoard and the loss curve."""
    steps = 40
    config = SFTConfig(
        model=str(tiny_checkpoint),
        data=str(tiny_conversations),
        output=str(tmp_path / "run"),
        eval_data=str(tiny_conversations),
        steps=steps,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=2,
        save_every=100,
        tensorboard=True,
        progress=False,
    )
    summary = SFTTrainer(config).train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train] == list(range(1, steps + 1))
    assert train[-1]["loss"] <= 0.1 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    for line in train:
        assert {"learning_rate", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(line)
    assert train[0]["learning_rate"] == 0.0 and train[2]["learning_rate"] == pytest.approx(1e-2)
    assert train[-1]["learning_rate"] < 1e-3  # cosine decay towards 0
    assert train[0]["mfu"] is None  # CPU: no datasheet peak
    # Every step trains on all 4 conversations: the same loss tokens each time.
    assert len({line["tokens"] for line in train}) == 1
    (evaluation,) = [line for line in lines if "eval_loss" in line]
    assert evaluation["step"] == steps and evaluation["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert evaluation["eval_loss"] < 0.2 * train[0]["loss"]

    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0
    assert any((run / "tensorboard").iterdir())
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (run / "final" / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    _, params = load_hf_checkpoint(run / "final", progress=False)
    _, base = load_hf_checkpoint(tiny_checkpoint, progress=False)
    assert not np.array_equal(params["text"]["embed"], base["text"]["embed"])


def test_zero_initialised_lora_adapters_give_the_base_loss(tiny_checkpoint, tiny_conversations):
    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    dataset = read_conversations(tiny_conversations, processor, 1024)
    plan = BatchPlan(
        dataset.examples, 4, max_length=1024, max_patches=processor.image_processor.max_num_patches
    )
    batch = next(BatchLoader(dataset, plan, processor, RowSlice(0, 4), 1024, 1).iterator(1))
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    config, params = load_hf_checkpoint(tiny_checkpoint, RuntimeConfig(mesh=make_mesh()), progress=False)
    full = Trainable(config, ("vision", "projector", "text"))
    lora = Trainable(config, ("vision", "text"), LoraConfig(rank=4))
    adapters = init_adapters(lora.adapted, lora.lora, jax.random.key(0))
    # Every targeted weight got one, in both towers; A is drawn, B is zero.
    assert any(k.startswith("vision/") for k in adapters) and any("conv/in_proj" in k for k in adapters)
    assert all(float(jnp.abs(a["a"]).max()) > 0 and not jnp.any(a["b"]) for a in adapters.values())

    loss = jax.jit(lambda t, f: token_loss_sum(full, t, f, batch, 2048))
    lora_loss = jax.jit(lambda t, f: token_loss_sum(lora, t, f, batch, 2048))
    base = loss(*full.split(params))
    assert float(lora_loss(adapters, params)) == float(base)
    moved = jax.tree.map(lambda x: x + 0.05, adapters)
    assert float(lora_loss(moved, params)) != float(base)


def test_optimizer_groups_multipliers_and_frozen_components():
    """Norms and biases get no weight decay; each component's update scales with its multiplier; a frozen
    component is not in the trainable tree and has no optimizer state."""
    config = tiny_config()
    trainable = Trainable(config, ("projector", "text"))  # vision frozen
    specs = trainable.specs()
    labels = parameter_labels(specs)
    assert set(labels) == {"projector", "text"}
    assert labels["text"]["final_norm"]["scale"] == "language/no_decay"
    assert labels["projector"]["fc1"]["bias"] == "projector/no_decay"
    assert labels["text"]["embed"] == "language/decay"
    options = OptimizerConfig(
        learning_rate=1.0, total_steps=10, lr_multipliers={"projector": 0.25}, max_grad_norm=None
    )
    tx = make_optimizer(options, labels)
    params, _ = trainable.split(init_params(config, jax.random.key(0)))
    state = jax.jit(tx.init)(params)
    leaves = jax.tree.leaves(state)
    # Two moments per trainable weight, a few step counts, nothing for the vision tower.
    moments = 2 * sum(x.size for x in jax.tree.leaves(params))
    assert moments <= sum(x.size for x in leaves) <= moments + 16
    grads = jax.tree.map(jnp.ones_like, params)
    schedule = options.schedule()
    update = jax.jit(tx.update)
    state = update(grads, state, params)[1]
    updates, _ = update(grads, state, params)
    # Adam's step on constant gradients is lr * (1 - tiny): the update is minus the learning rate.
    lr = float(schedule(1))
    np.testing.assert_allclose(updates["text"]["final_norm"]["scale"], -lr, rtol=1e-4)
    np.testing.assert_allclose(updates["projector"]["fc1"]["bias"], -0.25 * lr, rtol=1e-4)


def test_gradient_accumulation_equals_one_batch(tmp_path, tiny_checkpoint):
    """Two micro-batches of two rows give the loss (the mean over all the step's loss tokens, rows of
    different lengths) and update of one batch of four."""
    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    records = [conversation([], "Hi?", "Hello " * n, "Be brief." if n % 2 else None) for n in (1, 9, 3, 17)]
    dataset = read_conversations(write_jsonl(tmp_path / "t.jsonl", records), processor, 256)
    config, params = load_hf_checkpoint(tiny_checkpoint, RuntimeConfig(mesh=make_mesh()), progress=False)
    trainable = Trainable(config, ("projector", "text"))
    options = OptimizerConfig(learning_rate=1e-2, total_steps=10, eps=1e-3)
    tx = make_optimizer(options, parameter_labels(trainable.specs()))
    shardings = state_shardings(trainable, tx, abstract_state(trainable, tx))
    trained, frozen = trainable.split(params)
    results = []
    for micro_batches in (1, 2):
        plan = BatchPlan(dataset.examples, 4, micro_batches=micro_batches, max_length=256)
        local = next(
            BatchLoader(dataset, plan, processor, RowSlice(0, 4 // micro_batches), 256, 1).iterator(1)
        )
        state = TrainState.create(jax.tree.map(jnp.copy, trained), tx, jax.random.PRNGKey(0))
        step = make_train_step(trainable, options.schedule(), shardings, 2048)
        state, metrics = step(
            state, frozen, global_batch(local, config.runtime.mesh, config.runtime.rules, 1)
        )
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (one, params_one), (two, params_two) = results
    assert one["tokens"] == two["tokens"]
    for key in ("loss", "grad_norm"):
        assert abs(one[key] - two[key]) <= 1e-6 * abs(one[key]), key
    for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_config_file_mirrors_the_flags_and_flags_win(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        yaml.safe_dump({"model": "m", "data": "d.jsonl", "output": "o", "steps": 5, "learning-rate": 0.1})
    )
    args = build_parser().parse_args(
        ["train", "--config", str(config_file), "--steps", "7", "--freeze", "vision"]
    )
    config = SFTConfig.from_dict(train_options(args))
    assert (config.steps, config.learning_rate, config.freeze, config.batch_size) == (7, 0.1, ("vision",), 8)
    with pytest.raises(TrainingError, match="unknown options"):
        SFTConfig.from_dict({"model": "m", "data": "d", "output": "o", "stepz": 3})
    for bad, message in [
        ({"batch_size": 6, "grad_accum": 4}, "not a multiple of --grad-accum"),
        ({"freeze": "vision,language,projector"}, "nothing would train"),
        ({"freeze": "text"}, "unknown components"),
        ({"lr_multiplier": "vision=fast"}, "not a number"),
        ({"steps": 0}, "--steps must be a positive integer"),
        ({"eval_every": 5}, "--eval-every needs --eval-data"),
    ]:
        with pytest.raises(TrainingError, match=message):
            SFTConfig(model="m", data="d", output="o", **bad)


def test_a_bad_line_stops_the_run_before_anything_is_trained(tmp_path, tiny_checkpoint, capsys):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [conversation([], "Hi?", "Hello."), conversation(["nope.png"], "What?", "A")],
    )
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--output", str(out), "--quiet"]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{data}:2:" in error and "not found" in error
    assert not out.exists()


def test_state_that_does_not_fit_is_refused_before_loading(
    tmp_path, tiny_checkpoint, tiny_conversations, monkeypatch
):
    monkeypatch.setattr(trainer_module, "device_memory_bytes", lambda: 1000)
    monkeypatch.setattr(trainer_module, "load_hf_checkpoint", lambda *a, **k: pytest.fail("loaded weights"))
    config = SFTConfig(
        model=str(tiny_checkpoint), data=str(tiny_conversations), output=str(tmp_path / "run"), progress=False
    )
    with pytest.raises(TrainingError, match=r"need .* per device .*--mesh fsdp=N"):
        SFTTrainer(config).train()
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(TrainingError, match="already holds a run"):
        SFTTrainer(config).train()
