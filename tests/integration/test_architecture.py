"""Torch-free checks of the model's structure: the two text layouts agree, cached decoding equals a full
recompute, gradients are finite and remat does not change them, the dtype policy holds, the decode step
updates its donated cache in place, orbax checkpoints survive a change of layout, and the sharding rules
refuse conflicts and warn on replication.

Tolerances: everything is float32 on the CPU. Two programs computing the same math in another fusion or
summation order differ by float32 rounding only (~1e-7 relative); 1e-5 leaves room for the longer chains
(vision tower -> projector -> six text layers) and is far below what any real bug (a wrong index, axis or
mask) produces.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from tiny_model import tiny_config, tiny_inputs, tiny_params

from lfm2vl_jax.checkpoint.canonical import from_canonical, to_canonical
from lfm2vl_jax.checkpoint.orbax import load_orbax_checkpoint, save_orbax_checkpoint
from lfm2vl_jax.config import DTypePolicy, Quantization
from lfm2vl_jax.inference.cache import append, init_cache
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import decode_step, empty_rows
from lfm2vl_jax.nn.model import embed_inputs, forward
from lfm2vl_jax.nn.params import quantize_params
from lfm2vl_jax.nn.text import embed_tokens, lm_logits, text_forward
from lfm2vl_jax.parallel.rules import DEFAULT_RULES, ShardingRuleError

RTOL = 1e-5
jit_forward = jax.jit(forward, static_argnums=1)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    config = tiny_config(scan_layers=True)
    return config, tiny_params(config), tiny_inputs(config)


def test_both_layouts_compute_the_same_logits_and_convert_losslessly(model):
    scanned, params, inputs = model
    per_layer = scanned.with_runtime(scan_layers=False)
    flat = from_canonical(to_canonical(params, scanned), per_layer)
    assert isinstance(flat["text"]["blocks"][0][0], list)
    assert (
        relative_error(jit_forward(flat, per_layer, **inputs), jit_forward(params, scanned, **inputs)) <= RTOL
    )
    back = from_canonical(to_canonical(flat, per_layer), scanned)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize(
    ("scan_layers", "quantization"),
    [(True, None), (False, None), (False, Quantization("int8")), (True, Quantization("int4", 16))],
    ids=["scanned", "per-layer", "per-layer-int8", "scanned-int4"],
)
def test_cached_decode_equals_full_recompute(model, scan_layers, quantization):
    """Prefill a ragged batch (text row, image row), decode 5 tokens through the cache, and compare each
    step's logits with a forward pass over prompt + tokens so far (the same quantized params for both)."""
    config, params, inputs = model
    if not scan_layers:
        config, params = (
            config.with_runtime(scan_layers=False),
            from_canonical(to_canonical(params, config), config.with_runtime(scan_layers=False)),
        )
    if quantization is not None:
        config = config.with_runtime(quantization=quantization)
        params = quantize_params(params, config)
    runtime = config.runtime
    images = [inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")]
    mask = jnp.asarray(inputs["attention_mask"], bool)

    @jax.jit
    def prefill(params, ids, mask, images):
        embeds = embed_inputs(params, config, ids, *images)
        _, entries = text_forward(params["text"], config.text, runtime, embeds, mask)
        return append(init_cache(config, 2, 64), entries, mask.sum(1))

    @jax.jit
    def step(params, cache, tokens):
        embeds = embed_tokens(params["text"], tokens[:, None], runtime)
        hidden, entries = text_forward(
            params["text"], config.text, runtime, embeds, jnp.ones((2, 1), bool), cache
        )
        return append(cache, entries, jnp.ones(2, jnp.int32)), lm_logits(params["text"], hidden[:, 0])

    cache = prefill(params, inputs["input_ids"], mask, images)
    lengths = inputs["attention_mask"].sum(1)
    sequences = [list(inputs["input_ids"][i, : lengths[i]]) for i in range(2)]
    width = 32
    for new in np.random.default_rng(0).integers(10, 390, (5, 2)):
        cache, cached = step(params, cache, jnp.asarray(new, jnp.int32))
        ids = np.zeros((2, width), np.int32)
        for i, token in enumerate(new):
            sequences[i].append(int(token))
            ids[i, : len(sequences[i])] = sequences[i]
        full_mask = (np.arange(width)[None] < np.array([len(s) for s in sequences])[:, None]).astype(np.int32)
        full = np.asarray(jit_forward(params, config, ids, full_mask, *images))
        for i in range(2):
            assert relative_error(cached[i], full[i, len(sequences[i]) - 1]) <= RTOL, f"row {i}"
    assert cache.capacity == 64 and np.array_equal(cache.lengths, [len(s) for s in sequences])


def loss_fn(params, config, inputs):
    """Next-token cross-entropy over the valid positions, as a training step computes it."""
    logits = forward(params, config, **inputs)[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    mask = (inputs["attention_mask"][:, 1:] * inputs["attention_mask"][:, :-1]).astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum()


# One jitted function for the module: each config's gradient program compiles once (the remat tests
# compare three policies against the same float32 program).
gradients = jax.jit(jax.grad(loss_fn), static_argnums=1)


def test_gradients_are_finite_and_reach_every_component(model):
    config, params, inputs = model
    grads = gradients(params, config, inputs)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    for part in ("vision", "projector", "text"):
        assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[part])), part


@pytest.mark.parametrize("policy", ["full", "dots", "qkv_conv"])
def test_remat_policies_recompute_the_same_gradients(model, policy):
    config, params, inputs = model
    expected = gradients(params, config, inputs)
    got = gradients(params, config.with_runtime(remat=policy), inputs)
    # Recomputation fuses differently: float32 rounding only, per leaf relative to its scale. Some
    # gradients are zero up to rounding (a key bias shifts every score of a query alike), so the scale
    # has a floor of 1e-2 of the largest gradient.
    floor = 1e-2 * max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(expected))
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        error = np.abs(a - b).max() / max(np.abs(b).max(), floor)
        assert error <= RTOL, (jax.tree_util.keystr(path), error)


def test_dtype_policy_fp32_master_weights_with_bf16_compute(model):
    """One setting: params stay float32 (gradients too), matmuls run in bfloat16, the cache is bfloat16."""
    config, params, inputs = model
    mixed = config.with_runtime(dtypes=DTypePolicy(params=jnp.float32, compute=jnp.bfloat16))
    assert mixed.runtime.dtypes.cache == jnp.bfloat16
    logits = jit_forward(params, mixed, **inputs)
    assert logits.dtype == jnp.float32
    # bf16 has 8 bits of mantissa: the tiny model's logits agree to ~1e-2 of their scale.
    assert relative_error(logits, jit_forward(params, config, **inputs)) < 5e-2
    grads = jax.eval_shape(lambda p: gradients(p, mixed, inputs), params)  # dtypes: fixed when traced
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(init_cache(mixed, 2, 16).blocks)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "per-layer"])
def test_decode_step_updates_the_donated_cache_in_place(scan_layers):
    """The compiled step aliases every cache buffer to its output and copies none of them."""
    config = tiny_config(scan_layers=scan_layers)
    params = jax.eval_shape(lambda: tiny_params(config))
    batch, capacity = 2, 96
    sampling = SamplingParams(repetition_penalty=1.1)
    state = jax.eval_shape(lambda: empty_rows(config, batch, capacity, sampling, (2,), per_row=False))
    compiled = decode_step.lower(params, config, state).compile()
    hlo = compiled.as_text()
    cache_leaves = jax.tree.leaves(state.cache.blocks)
    kv_shapes = {tuple(x.shape) for x in cache_leaves if x.shape[-2] == capacity}
    assert kv_shapes
    for shape in kv_shapes:
        dims = ",".join(map(str, shape))
        copies = [line for line in hlo.splitlines() if re.search(rf"f32\[{dims}\]\S* copy\(", line)]
        assert not copies, f"cache-sized copy of {shape}: {copies[:2]}"
    aliased = hlo.count("may-alias") + hlo.count("must-alias")
    assert aliased >= len(cache_leaves), "every cache buffer is donated to the step's output"


@pytest.mark.parametrize("saved_scanned", [True, False], ids=["save-scanned", "save-per-layer"])
def test_orbax_checkpoint_loads_into_the_other_layout(model, tmp_path, saved_scanned):
    config, params, _ = model
    per_layer = config.with_runtime(scan_layers=False)
    flat = from_canonical(to_canonical(params, config), per_layer)
    save_config, save_params = (config, params) if saved_scanned else (per_layer, flat)
    save_orbax_checkpoint(tmp_path / "ckpt", save_config, save_params)
    load_runtime = (per_layer if saved_scanned else config).runtime
    loaded_config, loaded = load_orbax_checkpoint(tmp_path / "ckpt", runtime=load_runtime)
    assert loaded_config.runtime == load_runtime
    jax.tree.map(np.testing.assert_array_equal, loaded, flat if saved_scanned else params)


MESH = AbstractMesh((2, 2, 4), ("data", "fsdp", "tensor"))


def test_sharding_rules_place_weights_batches_and_cache():
    spec = DEFAULT_RULES.partition_spec
    assert spec((64, 256), ("embed", "mlp"), MESH) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert spec((8, 10), ("batch", None), MESH) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert spec((8, 4, 96, 16), ("batch", "kv_heads", "cache_seq", "head_dim"), MESH) == (
        jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
    )


def test_sharding_rules_warn_when_a_dimension_is_replicated_and_refuse_conflicts():
    with pytest.warns(UserWarning, match="'kv_heads' of size 2 does not divide .*tensor"):
        assert DEFAULT_RULES.partition_spec(
            (64, 2, 16), ("embed", "kv_heads", "head_dim"), MESH, "k_proj"
        ) == (jax.sharding.PartitionSpec("fsdp", None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dividing dimensions: no warning
        DEFAULT_RULES.partition_spec((64, 8, 16), ("embed", "heads", "head_dim"), MESH)
    with pytest.raises(ShardingRuleError, match="'embed' and 'vision_embed' both map to mesh axis 'fsdp'"):
        DEFAULT_RULES.partition_spec((64, 64), ("embed", "vision_embed"), MESH, "bad")
