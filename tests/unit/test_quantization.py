"""Weight-only quantization (`nn.quant`): each weight rounded to its nearest level, the quantized product
equal to the product with the dequantized weight, quantized as the checkpoint streams in exactly as
`model.quantize` does (and sharded), exported dequantized, one error per bad option, a decode step at the
real 450M widths that never writes a full-size dequantized weight nor holds many chunks at once, and the
XLA flag that keeps it so (`xla_flags.py`).

(Quantized cached decoding against a quantized full recompute: tests/integration/test_architecture.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_stats import computations
from processor_fixtures import reference_dir

from lfm2vl_jax import Lfm2VlForConditionalGeneration, xla_flags
from lfm2vl_jax.cli import main
from lfm2vl_jax.config import ATTENTION, CONV, ConfigError, Quantization, load_config
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import decode_step, empty_rows
from lfm2vl_jax.nn import quant
from lfm2vl_jax.nn.params import abstract_params, param_specs, quantize_params, tree_bytes
from lfm2vl_jax.nn.quant import QuantizedWeight
from lfm2vl_jax.parallel.mesh import make_mesh
from lfm2vl_jax.xla_flags import FLAG

RNG = np.random.default_rng(0)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def on_device(w: QuantizedWeight) -> QuantizedWeight:
    return jax.tree.map(jnp.asarray, w)


@pytest.mark.parametrize(("bits", "group", "levels"), [(8, None, 127), (4, 8, 7)])
def test_each_weight_is_rounded_to_its_nearest_level(bits, group, levels):
    w = RNG.standard_normal((3, 32, 6)).astype(np.float32)  # (stacked, inputs, outputs)
    q = quant.quantize(w, bits, group, 1, 1)
    size = 32 if group is None else group
    grouped = w.reshape(3, 32 // size, size, 6)
    scales = np.abs(grouped).max(axis=2) / levels
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)
    expected = (np.rint(grouped / scales[:, :, None]) * scales[:, :, None]).reshape(w.shape)
    got = np.asarray(quant.dequantize(on_device(q)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)  # packing and unpacking lose nothing
    step = np.repeat(scales, size, axis=1)
    assert (np.abs(got - w) <= step / 2 * (1 + 1e-5)).all()  # the nearest level
    assert q.values.dtype == (np.int8 if bits == 8 else np.uint8)
    assert q.values.nbytes == w.size * bits // 8


@pytest.mark.parametrize(
    ("equation", "shape", "first", "count", "x_shape"),
    [
        ("btd,dnh->btnh", (1024, 4, 8), 0, 1, (2, 3, 1024)),  # chunked on a CPU: 2 x 512 inputs
        ("btd,dn->btn", (1040, 8), 0, 1, (2, 3, 1040)),  # 512 + 512 + the 16 left (1040 = 16 x 65)
        ("bte,ed->btd", (4, 16, 24), 0, 2, (2, 3, 64)),  # an attention output kernel, its (N, H) merged
        ("...d,vd->...v", (8200, 64), 1, 1, (2, 3, 64)),  # the tied head: 3 chunks of vocabulary rows
    ],
)
@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 16)])
def test_quantized_product_equals_the_product_with_the_dequantized_weight(
    equation, shape, first, count, x_shape, bits, group
):
    w = on_device(quant.quantize(RNG.standard_normal(shape).astype(np.float32), bits, group, first, count))
    x = jnp.asarray(RNG.standard_normal(x_shape).astype(np.float32))
    with jax.default_matmul_precision("highest"):
        expected = jnp.einsum(equation, x, quant.dequantize(w))
        got = quant.quantized_einsum(equation, x, w)
    # The same products summed in chunks: float32 rounding.
    assert float(jnp.abs(got - expected).max()) <= 1e-5 * float(jnp.abs(expected).max())


def test_cpu_chunks_hold_the_most_whole_groups_that_fit():
    # The 1.6B vision MLP's 4304 inputs (16 x 269) in int4 groups of 16: 8 chunks of 512 and one of 208,
    # not 269 chunks of 16 (a divisor of the width), which made its image prefill 5x slower.
    for bits, group, width, chunk in [
        (4, 16, 4304, 512),
        (4, 48, 4304 * 3, 480),
        (8, None, 4304, 512),
        (8, None, 48, 48),
    ]:
        w = quant.quantize(np.ones((width, 2), np.float32), bits, group, 0, 1)
        assert quant.chunk_size(width, w) == chunk


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """conftest's tiny model (widths 32 to 128, all divisible by 16) with tokenizer and processor files."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def float_model(checkpoint):
    return Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False)


@pytest.mark.parametrize(("scheme", "group"), [("int8", None), ("int4", 16)])
def test_loading_quantizes_as_quantize_does_and_shards(checkpoint, float_model, scheme, group):
    quantized = float_model.quantize(scheme, group)
    loaded = Lfm2VlForConditionalGeneration.from_pretrained(
        checkpoint, progress=False, quantize=scheme, quant_group_size=group, mesh=make_mesh()
    )
    assert loaded.config.runtime.quantization == quantized.config.runtime.quantization
    jax.tree.map(np.testing.assert_array_equal, loaded.params, quantized.params)
    weights = jax.tree.leaves(loaded.params, is_leaf=is_quantized)
    # the head, the projector, 2 conv and 2 attention layers, the vision tower (stacked) and patch embedding
    assert sum(map(is_quantized, weights)) == 1 + 2 + (2 * 5 + 2 * 7) + (6 + 1)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(loaded.params))
    # Bytes: bits/8 per quantized weight and a float32 scale per group; the rest as it was.
    bits = 8 if scheme == "int8" else 4

    def expected_bytes(leaf, node) -> float:
        return leaf.size * (bits / 8 + 4 / node.group_size) if is_quantized(node) else leaf.nbytes

    expected = jax.tree.map(expected_bytes, float_model.params, loaded.params, is_leaf=is_quantized)
    assert tree_bytes(loaded.params) == sum(jax.tree.leaves(expected))
    if (
        scheme == "int8"
    ):  # close to the float model (int4's error at real shapes: benchmarks/quant_accuracy.py)
        ids = np.random.default_rng(1).integers(10, 2000, (1, 9))
        expected, got = np.asarray(float_model(ids).logits), np.asarray(loaded(ids).logits)
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_default_int4_group_falls_back_to_a_divisor_where_64_does_not_divide(float_model):
    params = float_model.quantize("int4").params
    assert params["text"]["blocks"][0][0][0]["mlp"]["down"].group_size == 64  # input width 128
    assert params["projector"]["fc2"]["kernel"].group_size == 48  # input width 48


def test_embeddings_kept_in_float_by_option(float_model):
    quantized = float_model.quantize("int8", embeddings=False)
    assert not is_quantized(quantized.params["text"]["embed"])
    assert is_quantized(quantized.params["text"]["blocks"][0][0][0]["mlp"]["down"])


def test_xla_flags_turn_the_concurrency_order_off_unless_the_user_or_a_started_jax_says(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_started", lambda: False)
    devices = "--xla_force_host_platform_device_count="
    for before, after in [
        ("", f"{FLAG}=false"),
        (f"{devices}1", f"{devices}1 {FLAG}=false"),
        (f"{devices}8", f"{devices}8"),  # several CPU devices: their collectives stopped meeting
        (f"{FLAG}=true", f"{FLAG}=true"),  # the user's value wins
    ]:
        monkeypatch.setenv("XLA_FLAGS", before)
        xla_flags.prefer_memory_scheduler()
        assert os.environ["XLA_FLAGS"] == after
        assert xla_flags.memory_scheduler_on() == after.endswith("=false")
    monkeypatch.setenv("XLA_FLAGS", "")
    with monkeypatch.context() as patch:  # several CPU devices asked for through JAX's config
        patch.setattr(xla_flags, "jax", SimpleNamespace(config=SimpleNamespace(jax_num_cpu_devices=8)))
        xla_flags.prefer_memory_scheduler()
    assert os.environ["XLA_FLAGS"] == ""
    with monkeypatch.context() as patch:  # a jaxlib the flag was not checked on: it might abort on it
        patch.setattr(xla_flags, "CHECKED_JAXLIB", ())
        xla_flags.prefer_memory_scheduler()
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.setattr(xla_flags, "_backends_started", lambda: True)  # too late: XLA read its flags
    monkeypatch.setenv("XLA_FLAGS", "")
    xla_flags.prefer_memory_scheduler()
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=false {FLAG}")  # XLA's parser: the last one wins
    assert not xla_flags.memory_scheduler_on()


def test_a_quantized_model_warns_where_xla_orders_cpu_programs_for_concurrency(float_model, monkeypatch):
    assert xla_flags.memory_scheduler_on()  # importing lfm2vl_jax set it, before the tests started JAX
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        float_model.quantize("int8")
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(UserWarning, match="holds every weight dequantized in float32 at once"):
        float_model.quantize("int8")


def test_a_quantized_model_exports_its_dequantized_weights(float_model, tmp_path):
    quantized = float_model.quantize("int4", 16)
    exported = Lfm2VlForConditionalGeneration.from_pretrained(
        quantized.save_pretrained(tmp_path / "export", progress=False), progress=False
    )
    down = quantized.params["text"]["blocks"][0][0][0]["mlp"]["down"]
    np.testing.assert_array_equal(
        exported.params["text"]["blocks"][0][0][0]["mlp"]["down"], quant.dequantize(down)
    )
    np.testing.assert_array_equal(quant.dequantize_on_host(down), quant.dequantize(down))
    ids = np.random.default_rng(2).integers(10, 2000, (1, 7))
    np.testing.assert_allclose(exported(ids).logits, quantized(ids).logits, rtol=0, atol=1e-4)


def test_bad_quantization_options_are_one_error_each(checkpoint, float_model):
    with pytest.raises(ConfigError, match="unknown quantization scheme 'int3'"):
        Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False, quantize="int3")
    with pytest.raises(
        ConfigError, match=r"group size 32 does not divide the input width 48 of weight projector.fc2.kernel"
    ):
        float_model.quantize("int4", 32)
    with pytest.raises(ConfigError, match="even integer"):
        Quantization("int4", 7)
    with pytest.raises(ConfigError, match="is for int4"):
        Quantization("int8", 64)
    with pytest.raises(ConfigError, match="already quantized"):
        float_model.quantize("int8").quantize("int4", 16)
    with pytest.raises(Exception, match="already quantized"):
        quantize_params(float_model.quantize("int8").params, float_model.config)


def test_command_line_quantizes_and_refuses_bad_options_before_writing(checkpoint, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "messages": [{"role": "user", "content": "Hello"}]}\n')
    output = tmp_path / "out.jsonl"
    argv = ["batch", "--model", str(checkpoint), "--input", str(requests), "--output", str(output), "--quiet"]
    argv += ["--slots", "1", "--max-new-tokens", "3"]
    assert main([*argv, "--quantize", "int4", "--quant-group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group size 32 does not divide" in err and "projector.fc2" in err, err
    assert not output.exists()
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main([*argv, "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    assert main([*argv, "--quantize", "int4", "--quant-group-size", "16"]) == 0
    assert '"id": "a"' in output.read_text()


@functools.cache
def compiled_decode_step(scheme: str) -> tuple[str, tuple, int]:
    """The 450M decode step at its real widths and vocabulary (two layers: a conv and an attention one),
    quantized, compiled from shapes; the float shapes of its quantized weights, whole; and the bytes of
    its temporaries (XLA's buffer assignment)."""
    config = load_config(reference_dir("lfm2-vl-450m"))
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, layer_types=(CONV, ATTENTION)))
    group = 64 if scheme == "int4" else None
    config = config.with_runtime(scan_layers=False, quantization=Quantization(scheme, group))
    state = jax.eval_shape(lambda: empty_rows(config, 1, 256, SamplingParams(), (2,), per_row=False))
    lowered = decode_step.lower(abstract_params(config), config, state)
    text_weights = jax.tree.leaves(param_specs(config)["text"], is_leaf=is_quantized)
    compiled = lowered.compile()
    weights = tuple(w.shape for w in text_weights if is_quantized(w))
    return compiled.as_text(), weights, compiled.memory_analysis().temp_size_in_bytes


def float_buffers(hlo: str) -> set[tuple[int, ...]]:
    """The shapes of every float array an instruction of the program writes (dims as XLA lays them)."""
    shapes = set()
    for instructions in computations(hlo)[0].values():
        for ins in instructions:
            if ins.shape.startswith(("f32[", "bf16[")):
                shapes.add(tuple(int(d) for d in ins.shape.split("[")[1].split("]")[0].split(",") if d))
    return shapes


def whole(weight: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The shapes of a buffer holding a whole weight: its own, or (inputs, outputs)."""
    return {tuple(weight), (weight[0], int(np.prod(weight[1:])))}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_step_never_writes_a_full_size_dequantized_weight(scheme, monkeypatch):
    hlo, weights, temporaries = compiled_decode_step(scheme)
    assert len(weights) == 13  # conv in/out, attention q/k/v/o, 2 x MLP gate/up/down, the tied embedding
    written = float_buffers(hlo)
    assert not [w for w in weights if whole(w) & written]
    # Nor holds the chunks of many weights at once: about one dequantized chunk is live at a time (the
    # largest: CPU_HEAD_ROWS rows of the LM head). XLA's concurrency-ordered CPU programs (which importing
    # lfm2vl_jax turns off, see xla_flags.py) held them all: 411 MB here, against 17 MB.
    hidden, intermediate = weights[-1][1], max(w[-1] for w in weights[:-1])
    largest_chunk = 4 * max(quant.CPU_HEAD_ROWS * hidden, quant.CPU_CHUNK * intermediate)
    assert temporaries < 2 * largest_chunk, (temporaries, largest_chunk)
    # The control: dequantizing each weight whole writes it out in full before the dot. (Traces are cached
    # by function and arguments, not by the module constants: cleared before and after.)
    if scheme == "int8":
        with monkeypatch.context() as patch:
            patch.setattr(quant, "CPU_CHUNK", 1 << 20)
            patch.setattr(quant, "CPU_HEAD_ROWS", 1 << 20)
            jax.clear_caches()
            unchunked, *_ = compiled_decode_step.__wrapped__(scheme)
        jax.clear_caches()
        written = float_buffers(unchunked)
        assert [w for w in weights if whole(w) & written] == list(weights)
