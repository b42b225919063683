"""The training loss and the eval loss are the same quantity (mean cross-entropy per loss token, the same
mask): evaluating the training batch with the step's weights gives the loss the step reports. And the
warmup of a run follows --warmup-ratio for any --steps, so that the example config runs with any."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from training_fixtures import conversation, write_jsonl

from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.cli import build_parser, train_options
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.config import SFTConfig, TrainingError
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations
from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
from lfm2vl_jax.training.step import (
    Trainable,
    TrainState,
    abstract_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)
from lfm2vl_jax.training.trainer import global_batch

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "train" / "configs" / "example-450m.yaml"


def test_eval_on_the_training_batch_equals_the_training_loss(tiny_checkpoint, tmp_path):
    """Two micro-batches of two text conversations (images change neither computation's loss rule and
    would only add compile time): the step's loss (weights before its update) against the eval
    step's summed token losses over the same rows, divided by their loss tokens, as `Evaluator` computes
    it. Both are float32 sums of the same ~100 token losses in different fusion orders: 1e-5 relative
    covers the rounding."""
    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    records = [conversation([], "Hi?", "Hello " * n, "Be brief." if n % 2 else None) for n in (1, 9, 3, 17)]
    dataset = read_conversations(write_jsonl(tmp_path / "t.jsonl", records), processor, 256)
    runtime = RuntimeConfig(mesh=make_mesh())
    config, params = load_hf_checkpoint(tiny_checkpoint, runtime, progress=False)
    plan = BatchPlan(dataset.examples, 4, micro_batches=2, max_length=256)
    local = next(BatchLoader(dataset, plan, processor, RowSlice(0, 2), 256, 1).iterator(1))
    batch = global_batch(local, config.runtime.mesh, config.runtime.rules, 1)
    trainable = Trainable(config, ("projector", "text"))
    trained, frozen = trainable.split(params)

    eval_step = make_eval_step(trainable, 2048)
    summed, tokens = 0.0, 0
    for k in range(2):
        loss_sum, count = jax.device_get(
            eval_step(trained, frozen, jax.tree.map(lambda x, k=k: x[k : k + 1], batch))
        )
        summed, tokens = summed + float(loss_sum), tokens + int(count)

    options = OptimizerConfig(learning_rate=1e-3, total_steps=4)
    tx = make_optimizer(options, parameter_labels(trainable.specs()))
    state = TrainState.create(jax.tree.map(jnp.copy, trained), tx, jax.random.PRNGKey(0))
    step = make_train_step(
        trainable, options.schedule(), state_shardings(trainable, tx, abstract_state(trainable, tx)), 2048
    )
    state, metrics = jax.device_get(step(state, frozen, batch))
    assert int(metrics["tokens"]) == tokens > 0
    assert abs(float(metrics["loss"]) - summed / tokens) <= 1e-5 * summed / tokens, (
        metrics["loss"],
        summed / tokens,
    )


def example_run(*flags: str) -> SFTConfig:
    args = build_parser().parse_args(["train", "--config", str(EXAMPLE_CONFIG), *flags])
    return SFTConfig.from_dict(train_options(args), "test")


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (12, 3), (100, 25)])
def test_example_config_warms_up_a_quarter_of_any_number_of_steps(steps: int, warmup: int):
    run = example_run("--steps", str(steps))
    assert run.warmup == warmup
    OptimizerConfig(
        learning_rate=run.learning_rate, total_steps=run.steps, warmup_steps=run.warmup
    )  # accepted
    assert (
        example_run("--steps", str(steps + 5), "--warmup-steps", "2").warmup == 2
    )  # steps win (transformers)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan")])
def test_a_warmup_ratio_outside_0_1_is_refused(ratio: float):
    with pytest.raises(TrainingError, match="--warmup-ratio must be"):
        SFTConfig(model="m", data="d", output="o", warmup_ratio=ratio)
