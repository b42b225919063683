"""Run by test_sharding.py in a fresh process with 8 host CPU devices (XLA_FLAGS must be set before jax
is imported): generation and logits with params and cache sharded over a 2x4 (data x tensor) mesh vs
one device. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.inference import engine
from lfm2vl_jax.parallel.mesh import make_mesh


def main(directory: str, inputs_file: str) -> None:
    inputs = dict(np.load(inputs_file))
    single = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    mesh = make_mesh(data=2, tensor=4)
    sharded = Lfm2VlForConditionalGeneration.from_pretrained(
        directory, mesh=mesh, scan_layers=True, progress=False
    )
    mlp = sharded.params["text"]["blocks"][0][0]["mlp"]["gate"]
    attn = next(
        layer["attn"] for segment in sharded.params["text"]["blocks"] for layer in segment if "attn" in layer
    )
    options = dict(max_new_tokens=24, repetition_penalty=2.0)
    ours = sharded.generate(**inputs, **options)
    per_layer = Lfm2VlForConditionalGeneration.from_pretrained(
        directory, mesh=mesh, scan_layers=False, progress=False
    )
    logits = np.asarray(sharded(**inputs).logits)
    reference_logits = np.asarray(single(**inputs).logits)
    # The cache prefill lays out: rows over `data`; kv heads (2) do not divide tensor=4, so replicated.
    request = sharded.request(inputs, max_new_tokens=4, seed=0, options={})
    state, _ = next(engine.run(sharded.params, sharded.config, request))
    kv = next(e for segment in state.cache.blocks for e in segment if isinstance(e, dict))["k"]
    result = {
        "cache_k_spec": str(kv.sharding.spec),
        "devices": len(jax.devices()),
        "mlp_gate_spec": str(mlp.sharding.spec),
        "mlp_gate_shards": len(mlp.addressable_shards),
        "attn_q_spec": str(attn["q"].sharding.spec),
        "attn_k_spec": str(attn["k"].sharding.spec),
        "tokens_equal": bool(np.array_equal(ours, single.generate(**inputs, **options))),
        "per_layer_tokens_equal": bool(np.array_equal(ours, per_layer.generate(**inputs, **options))),
        "logits_relative_error": float(
            np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
