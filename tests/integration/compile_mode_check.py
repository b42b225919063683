"""Run by test_compile_mode.py, in-process and in a fresh process under XLA's default CPU optimization:
the tiny model's logits, loss gradients and greedy tokens, saved to the .npz named on the command line."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tiny_checkpoints import numpy_params
from tiny_model import tiny_config, tiny_inputs

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.nn.model import causal_lm_loss, forward


def outputs() -> dict[str, np.ndarray]:
    config = tiny_config()
    params = jax.tree.map(jnp.asarray, numpy_params(config, 0))
    inputs = tiny_inputs(config)

    def loss(p):
        return causal_lm_loss(forward(p, config, **inputs), jnp.asarray(inputs["input_ids"]))

    logits = jax.jit(forward, static_argnums=1)(params, config, **inputs)
    gradients = jax.jit(jax.grad(loss))(params)
    tokens = Lfm2VlForConditionalGeneration(config, params).generate(**inputs, max_new_tokens=6)
    named = {f"grad {jax.tree_util.keystr(p)}": x for p, x in jax.tree.leaves_with_path(gradients)}
    return {"logits": np.asarray(logits), "tokens": np.asarray(tokens), **jax.device_get(named)}


if __name__ == "__main__":
    np.savez(sys.argv[1], **outputs())
