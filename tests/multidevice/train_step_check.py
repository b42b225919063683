"""Run by test_training_sharding.py in a fresh process with 8 host CPU devices: one train step (full
fine-tuning, AdamW) on meshes data=8, data=2 x fsdp=2 x tensor=2 and fsdp=8 against the same step on one
device; and the batch-divisibility check. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.config import RuntimeConfig
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.config import SFTConfig, TrainingError
from lfm2vl_jax.training.data import BatchLoader, BatchPlan, RowSlice, read_conversations
from lfm2vl_jax.training.optimizer import OptimizerConfig, make_optimizer, parameter_labels
from lfm2vl_jax.training.step import Trainable, TrainState, abstract_state, make_train_step, state_shardings
from lfm2vl_jax.training.trainer import SFTTrainer, global_batch

MESHES = {
    "one device": {},
    "data=8": {"data": 8},
    "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp=8": {"fsdp": 8},
}


def one_step(model: str, local: dict, sizes: dict) -> dict:
    mesh = make_mesh(**sizes)
    config, params = load_hf_checkpoint(model, RuntimeConfig(mesh=mesh), progress=False)
    trainable = Trainable(config, ("vision", "projector", "text"))
    # eps 1e-3: AdamW's first update is lr * g / (|g| + eps) per entry, which for eps 1e-8 turns the
    # rounding of gradients near zero into updates of +-lr; a larger eps keeps the comparison about the
    # sharded computation, not about that amplification.
    options = OptimizerConfig(learning_rate=1e-2, total_steps=10, weight_decay=0.1, eps=1e-3)
    tx = make_optimizer(options, parameter_labels(trainable.specs()))
    shardings = state_shardings(trainable, tx, abstract_state(trainable, tx))
    create = jax.jit(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(0)), out_shardings=shardings)
    state = create(params)
    step = make_train_step(trainable, options.schedule(), shardings, 64)
    state, metrics = step(state, {}, global_batch(local, mesh, config.runtime.rules, 1))
    gate = state.params["text"]["blocks"][0][0]["mlp"]["gate"]
    return {
        "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
        "params": jax.device_get(state.params),
        "mu_spec": str(jax.tree.leaves(state.opt_state)[1].sharding.spec),
        "gate_spec": str(gate.sharding.spec),
        "gate_shards": len({s.device for s in gate.addressable_shards}),
    }


def main(model: str, data: str, out: str) -> None:
    processor = Lfm2VlProcessor.from_pretrained(model)
    dataset = read_conversations(data, processor, 1024)
    plan = BatchPlan(
        dataset.examples,
        8,
        tile_multiple=8,
        max_length=1024,
        max_patches=processor.image_processor.max_num_patches,
    )
    local = next(BatchLoader(dataset, plan, processor, RowSlice(0, 8), 1024, 2).iterator(1))
    results = {name: one_step(model, local, sizes) for name, sizes in MESHES.items()}
    reference = results.pop("one device")
    report = {"devices": jax.device_count()}
    for name, result in results.items():
        errors = {}
        for path, expected in jax.tree_util.tree_flatten_with_path(reference["params"])[0]:
            key = jax.tree_util.keystr(path)
            if "['attn']['k']['bias']" in key:
                continue  # its gradient is rounding noise (exactly 0 in exact arithmetic)
            got = next(v for p, v in jax.tree_util.tree_flatten_with_path(result["params"])[0] if p == path)
            errors[key] = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))
        report[name] = {
            "metrics": result["metrics"],
            "reference_metrics": reference["metrics"],
            "worst_param": max(errors.items(), key=lambda item: item[1]),
            "gate_spec": result["gate_spec"],
            "gate_shards": result["gate_shards"],
        }
    try:
        SFTTrainer(
            SFTConfig(model=model, data=data, output=out, batch_size=4, mesh="data=8", progress=False)
        ).train()
        report["divisibility_error"] = None
    except TrainingError as err:
        report["divisibility_error"] = str(err)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
