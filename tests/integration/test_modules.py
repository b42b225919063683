"""The Flax modules (`nn.modules`): the same numbers as the functions (bitwise, both layouts, with images),
our params layout and logical axes, per-layer intermediates, swappable blocks, remat, the cached step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_config, tiny_inputs, tiny_params

from lfm2vl_jax.inference import engine, step
from lfm2vl_jax.inference.cache import append
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.nn.model import embed_inputs, forward
from lfm2vl_jax.nn.modules import (
    Attention,
    DecoderLayer,
    Lfm2VlModel,
    ShortConv,
    TextMLP,
    VisionEncoderLayer,
    functional_params,
    module_params,
)
from lfm2vl_jax.nn.params import is_spec, param_specs
from lfm2vl_jax.nn.text import text_hidden_states
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.parallel.rules import DEFAULT_RULES


@pytest.mark.parametrize("scan_layers", [False, True])
def test_module_logits_equal_the_functions_bitwise(scan_layers):
    config = tiny_config(scan_layers=scan_layers)
    params, inputs = tiny_params(config), tiny_inputs(config)
    model = Lfm2VlModel(config)
    functional = jax.jit(lambda p, i: forward(p, config, **i))(params, inputs)
    modules = jax.jit(lambda p, i: model.apply({"params": module_params(p)}, **i)[0])(params, inputs)
    np.testing.assert_array_equal(np.asarray(modules), np.asarray(functional))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_init_declares_our_layout_with_its_logical_axes(scan_layers):
    config = tiny_config(scan_layers=scan_layers)
    inputs = tiny_inputs(config)
    # Shapes and axes only: traced, not run (an eager init compiles a program per operation).
    variables = jax.eval_shape(lambda: Lfm2VlModel(config).init(jax.random.key(0), **inputs))
    specs = param_specs(config)
    shapes = jax.tree.map(lambda x: x.shape, functional_params(variables["params"]))
    assert shapes == jax.tree.map(lambda s: s.shape, specs, is_leaf=is_spec)
    partitions = functional_params(nn.get_partition_spec(variables)["params"])
    expected = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s.axes), specs, is_leaf=is_spec)
    assert jax.tree.leaves(partitions) == jax.tree.leaves(expected)
    mesh = make_mesh()
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, DEFAULT_RULES.rules)
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(variables))
    relaid = jax.eval_shape(lambda: functional_params(module_params(tiny_params(config))))
    assert relaid.keys() == specs.keys()


def test_tabulate_lists_every_block():
    config = tiny_config()
    inputs = tiny_inputs(config)
    table = Lfm2VlModel(config).tabulate(
        jax.random.key(0), **inputs, depth=None, console_kwargs={"width": 250}
    )
    for block in ("VisionEncoderLayer", "VisionAttention", "VisionMLP", "Projector", "DecoderLayer"):
        assert block in table, block
    for block in ("ShortConv", "Attention", "TextMLP", "RMSNorm"):
        assert block in table, block


@pytest.mark.parametrize("scan_layers", [False, True])
def test_sown_hidden_states_equal_the_functions(scan_layers):
    config = tiny_config(scan_layers=scan_layers)
    params, inputs = tiny_params(config), tiny_inputs(config)
    model = Lfm2VlModel(config)
    _, state = model.apply({"params": module_params(params)}, **inputs, mutable="intermediates")
    sown = jax.tree.leaves(state["intermediates"])
    embeds = embed_inputs(params, config, inputs["input_ids"], *list(inputs.values())[2:])
    expected = text_hidden_states(
        params["text"], config.text, config.runtime, embeds, inputs["attention_mask"]
    )
    # sown per module (scanned segments stacked over repeats); put them in layer order
    flat = []
    for leaf in sown:
        flat += list(leaf) if leaf.ndim == 4 else [leaf]
    layers = {tuple(np.asarray(x).ravel()[:4]) for x in flat}
    assert len(flat) == config.text.num_layers
    for want in expected[1:-1]:  # every layer's output but the last (final-normed in `expected`)
        assert tuple(np.asarray(want).ravel()[:4]) in layers


class ScaledMLP(TextMLP):
    scale: float = 2.0

    @nn.compact
    def __call__(self, x):
        return self.scale * super().__call__(x)


def test_a_swapped_block_changes_exactly_its_output():
    config = tiny_config(scan_layers=False)
    params, inputs = tiny_params(config), tiny_inputs(config)
    variables = {"params": module_params(params)}

    def first_layer(model):
        _, state = model.apply(variables, **inputs, capture_intermediates=True, mutable="intermediates")
        return state["intermediates"]["text"]["blocks"]["0"]["0"]["0"]

    plain, scaled = first_layer(Lfm2VlModel(config)), first_layer(Lfm2VlModel(config, mlp_cls=ScaledMLP))
    for name in ("operator_norm", "conv"):
        for a, b in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(scaled[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    # the subclass's own call is recorded last (its super() call first)
    np.testing.assert_allclose(scaled["mlp"]["__call__"][-1], 2 * plain["mlp"]["__call__"][0], rtol=1e-6)
    assert not np.allclose(scaled["__call__"][0][0], plain["__call__"][0][0])


def test_block_classes_are_module_attributes():
    layer = DecoderLayer(tiny_config(), "conv")
    assert (layer.mlp_cls, layer.conv_cls, layer.attention_cls) == (TextMLP, ShortConv, Attention)
    assert issubclass(VisionEncoderLayer, nn.Module)


def test_remat_changes_nothing_and_lowers_gradient_memory():
    inputs = tiny_inputs(tiny_config())

    def grad_and_memory(remat):
        config = tiny_config(scan_layers=True, remat=remat)
        params = module_params(tiny_params(config))
        model = Lfm2VlModel(config)

        def loss(p):
            return model.apply({"params": p}, **inputs)[0].astype(jnp.float32).var()

        step = jax.jit(jax.grad(loss))
        memory = step.lower(params).compile().memory_analysis()
        return step(params), memory.temp_size_in_bytes

    full, memory_full = grad_and_memory("full")
    none, memory_none = grad_and_memory("none")
    # recomputation only reorders XLA's float32 rounding: within 1e-5 of each gradient's largest entry,
    # or 1e-7 absolute for weights whose gradient is float32 noise around zero (~1e-8 here)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(none), strict=True):
        assert np.abs(a - b).max() <= max(1e-5 * np.abs(b).max(), 1e-7)
    assert memory_full < memory_none, (memory_full, memory_none)


def test_the_cached_step_through_the_modules_equals_the_engines():
    config = tiny_config()
    params, inputs = tiny_params(config), tiny_inputs(config)
    batch = engine.prepare_batch(config, **inputs, pad_id=0)
    rows = batch.input_ids.shape[0]
    state, first = step.prefill(
        params,
        config,
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.pixel_attention_mask,
        batch.spatial_shapes,
        None,
        jnp.zeros((2,), jnp.uint32),
        SamplingParams(do_sample=False),
        jnp.full((rows,), 16, jnp.int32),
        jnp.full((rows, 8), 7, jnp.int32),
        jnp.zeros((rows,), bool),
        capacity=batch.input_ids.shape[1] + 16,
    )
    cache, last = jax.tree.map(jnp.copy, state.cache), first[:, None]
    stepped, token = step.decode_step(params, config, state)
    logits, entries = Lfm2VlModel(config).apply(
        {"params": module_params(params)}, last, jnp.ones_like(last), cache=cache
    )
    np.testing.assert_array_equal(jnp.argmax(logits[:, 0], axis=-1), token)
    ours = append(cache, entries, jnp.ones((last.shape[0],), jnp.int32))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(stepped.cache), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
