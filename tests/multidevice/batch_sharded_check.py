"""Run by test_batch_sharding.py in a fresh process with 8 host CPU devices (XLA_FLAGS must be set before
jax is imported): the continuous-batching engine with params and slot cache sharded over a 2x4 (data x
tensor) mesh vs one device. Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import prompt_inputs, tiny_config, tiny_params  # noqa: E402

from lfm2vl_jax import Lfm2VlForConditionalGeneration  # noqa: E402
from lfm2vl_jax.nn.params import param_shardings  # noqa: E402
from lfm2vl_jax.parallel.mesh import make_mesh  # noqa: E402


def main() -> None:
    config = tiny_config(scan_layers=True)
    params = tiny_params(config)
    generation = {"eos_token_id": 7, "pad_token_id": 0}
    single = Lfm2VlForConditionalGeneration(config, params, generation)
    sharded_config = config.with_runtime(mesh=make_mesh(data=2, tensor=4))
    sharded = Lfm2VlForConditionalGeneration(
        sharded_config, jax.device_put(params, param_shardings(sharded_config)), generation
    )
    workload = [  # prompts in one length bucket, 0 or 1 image: few programs to compile twice
        ([6], {"repetition_penalty": 1.5}),
        ([3, (4, 6), 4], {}),
        ([9], {"do_sample": True, "top_p": 0.8}),
        ([2, (8, 8)], {"do_sample": True, "temperature": 0.8}),
    ]
    requests = [
        {
            "id": i,
            "inputs": prompt_inputs(config, segments, seed=i),
            "seed": i,
            "max_new_tokens": 6 + 2 * i,
            **options,
        }
        for i, (segments, options) in enumerate(workload)
    ]
    results = {}
    for name, model in (("single", single), ("sharded", sharded)):
        engine = model.batch_engine(slots=2, max_length=64, prefill_batch=2, chunk=4)
        results[name] = [r.token_ids for r in engine.generate(requests)]
        if name == "sharded":
            kv = next(e for segment in engine._state.cache.blocks for e in segment if isinstance(e, dict))[
                "k"
            ]
    print(
        json.dumps(
            {
                "devices": len(jax.devices()),
                "tokens_equal": results["single"] == results["sharded"],
                "lengths": [len(t) for t in results["sharded"]],
                "cache_k_spec": str(kv.sharding.spec),
            }
        )
    )


if __name__ == "__main__":
    main()
