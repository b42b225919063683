"""float32 means float32: every matrix product of a float32 model is lowered with HIGHEST precision (GPUs
would otherwise multiply in TF32 and TPUs in bfloat16 passes, which no CPU run can show), in the plain
forward pass, prefill, the decode step and the training gradient, through every attention
implementation; bfloat16 models keep the backend's default."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from lfm2vl_jax.config import ATTENTION as A
from lfm2vl_jax.config import CONV as C
from lfm2vl_jax.config import DTypePolicy, Lfm2VlConfig, TextConfig, VisionConfig
from lfm2vl_jax.inference.sampling import SamplingParams
from lfm2vl_jax.inference.step import decode_step, empty_rows, prefill
from lfm2vl_jax.nn.model import forward, hidden_states
from lfm2vl_jax.nn.params import abstract_params

PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")


def tiny(dtype, attention: str) -> Lfm2VlConfig:
    config = Lfm2VlConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4, num_patches=16
        ),
        text=TextConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            layer_types=(C, A, C, A),
        ),
        projector_hidden_size=48,
    )
    return config.with_runtime(dtypes=DTypePolicy.uniform(dtype), scan_layers=False, attention=attention)


def programs(config: Lfm2VlConfig) -> dict[str, str]:
    """StableHLO of the forward pass (with an image), prefill, one decode step and a training gradient."""
    params = abstract_params(config)
    batch, seq, patches = 2, 16, 16
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, patches, 3 * 4 * 4), jnp.float32)
    patch_mask = jax.ShapeDtypeStruct((1, patches), jnp.int32)
    shapes = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    image = (pixels, patch_mask, shapes)
    sampling = SamplingParams()
    done = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    state = jax.eval_shape(lambda: empty_rows(config, batch, 64, sampling, (2,), per_row=False))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    stops = jax.ShapeDtypeStruct((batch, 8), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def loss(params, ids, mask, *image):
        return hidden_states(params, config, ids, mask, *image).astype(jnp.float32).sum()

    return {
        "forward": jax.jit(forward, static_argnames="config").lower(params, config, ids, ids, *image),
        "prefill": prefill.lower(
            params, config, ids, ids, *image, None, key, sampling, rows, stops, done, capacity=32
        ),
        "decode step": decode_step.lower(params, config, state),
        "gradient": jax.jit(jax.grad(loss)).lower(params, ids, ids, *image),
    }


def products(lowered) -> list[tuple[str, str]]:
    """(element type of the operands, the instruction) for every matrix product of a program."""
    found = []
    for match in PRODUCT.finditer(lowered.as_text()):
        operands = match.group(0).rsplit(" : ", 1)[1].split("->")[0]
        types = set(re.findall(r"tensor<(?:[\d?]+x)*(\w+)>", operands))
        found.append((types.pop() if len(types) == 1 else "mixed", match.group(0)))
    return found


@pytest.mark.parametrize("attention", ["reference", "blockwise"])
def test_float32_products_are_highest_precision(attention):
    for name, lowered in programs(tiny(jnp.float32, attention)).items():
        f32 = [line for dtype, line in products(lowered) if dtype == "f32"]
        assert len(f32) > 10, name
        loose = [line for line in f32 if "precision = [HIGHEST, HIGHEST]" not in line]
        assert not loose, (
            f"{name} ({attention}): {len(loose)} of {len(f32)} float32 products not HIGHEST: {loose[0]}"
        )


def test_bfloat16_products_keep_the_default_precision():
    for name, lowered in programs(tiny(jnp.bfloat16, "reference")).items():
        bf16 = [line for dtype, line in products(lowered) if dtype == "bf16"]
        assert len(bf16) > 10, name
        assert not [line for line in bf16 if "HIGHEST" in line], name
