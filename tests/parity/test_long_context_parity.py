"""A 4,096-token prompt through the memory-efficient attention: logits and greedy tokens equal transformers'.

The tiny test model keeps it fast; at 4 heads x 4096^2 the reference attention's scores would be 268 MB per
layer, so "auto" runs the blockwise kernel here (asserted), in prefill and in the plain forward pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from reference_models import (
    build_reference,
    prompt_with_images,
    reference_logits,
    save_reference,
    single,
    tiny_config,
)
from test_generate import reference_generate

from lfm2vl_jax import Lfm2VlForConditionalGeneration, kernels

LENGTH = 4096
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    config = tiny_config()
    reference = build_reference(config, seed=5)
    directory = save_reference(reference, tmp_path_factory.mktemp("long"))
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    inputs = single(prompt_with_images(config, [LENGTH], seed=6))
    return reference, model, inputs


def test_auto_attention_is_blockwise_at_this_length(long_pair):
    _, model, _ = long_pair
    text = model.config.text
    call = kernels.Call(
        kernels.backend(),
        jnp.dtype(jnp.float32),
        1,
        LENGTH,
        LENGTH,
        text.num_heads,
        text.num_kv_heads,
        text.head_dim,
        causal=True,
        cached=False,
        default_positions=True,
    )
    assert kernels.choose("auto", call) == "blockwise"


def test_long_prompt_logits_match_transformers(long_pair):
    reference, model, inputs = long_pair
    expected = reference_logits(reference, inputs)
    ours = np.asarray(model(**inputs).logits)
    assert np.max(np.abs(ours - expected)) / np.max(np.abs(expected)) <= 1e-5


def test_long_prompt_greedy_tokens_match_transformers(long_pair):
    reference, model, inputs = long_pair
    expected = reference_generate(reference, inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=2.0)
    ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=2.0)
    assert len(set(expected[0].tolist())) > 8, "reference output too repetitive to be a strong test"
    np.testing.assert_array_equal(ours, expected)
