"""Tests outside the parity tier compile with `jax_disable_most_optimizations` (tests/conftest.py); users'
programs, and the parity tier's, with XLA's default optimization. The two differ only in float rounding:
the tiny model's logits and every loss gradient agree within 1e-5 of each tensor's largest value
(float32 rounding through six layers; measured up to 6e-6, where the parity tests allow 1e-5 for logits
and 1e-4 for gradients; key biases, whose gradient is rounding noise, within 1e-5 of the whole gradient's
largest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from compile_modes import FLAG, use_fast_compile
from tiny_checkpoints import numpy_params
from tiny_model import tiny_config, tiny_inputs

from lfm2vl_jax.nn.model import causal_lm_loss, forward


def outputs() -> dict[str, np.ndarray]:
    """Logits and loss gradients (by parameter path) of the tiny model."""
    config = tiny_config()
    params = jax.tree.map(jnp.asarray, numpy_params(config, 0))
    inputs = tiny_inputs(config)

    def loss(p):
        return causal_lm_loss(forward(p, config, **inputs), jnp.asarray(inputs["input_ids"]))

    logits = jax.jit(forward, static_argnums=1)(params, config, **inputs)
    gradients = jax.jit(jax.grad(loss))(params)
    named = {f"grad {jax.tree_util.keystr(p)}": x for p, x in jax.tree.leaves_with_path(gradients)}
    return {"logits": np.asarray(logits), **jax.device_get(named)}


def test_the_tests_compile_mode_computes_what_the_default_one_does():
    assert jax.config.read(FLAG)  # this tier runs in the tests' mode
    ours = outputs()
    use_fast_compile(False)  # the same programs compiled afresh in the default mode
    try:
        default = outputs()
    finally:
        use_fast_compile(True)
    assert sorted(default) == sorted(ours) and len(ours) > 40
    assert any(not np.array_equal(ours[name], default[name]) for name in ours)  # the flag takes effect
    largest_gradient = max(np.abs(value).max() for name, value in default.items() if name.startswith("grad"))
    for name, value in ours.items():
        # A key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys):
        # both modes give rounding noise, held to the scale of the whole gradient.
        scale = largest_gradient if "['k']['bias']" in name else np.abs(default[name]).max()
        assert np.abs(value - default[name]).max() <= 1e-5 * scale, name
