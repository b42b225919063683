"""Rows never interact: one row whose activations are NaN (a poisoned embedding, below any input check)
leaves every other row's tokens and cache bit-identical, in `generate` and in the batch engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tiny_model import tiny_config, tiny_params

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.inference import engine

POISON = 400  # the token whose embedding is NaN


def poisoned_model() -> Lfm2VlForConditionalGeneration:
    config = tiny_config()
    params = tiny_params(config)
    embed = params["text"]["embed"].at[POISON].set(jnp.nan)
    return Lfm2VlForConditionalGeneration(config, {**params, "text": {**params["text"], "embed": embed}})


def prompts(first: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 390, (3, 12))
    ids[0, 5] = first
    return ids


OPTIONS = dict(max_new_tokens=8, repetition_penalty=1.5)


def test_a_nan_row_leaves_the_other_rows_and_their_cache_bit_identical():
    model = poisoned_model()
    runs = {}
    for name, first in (("clean", 17), ("poisoned", POISON)):
        request = model.request({"input_ids": prompts(first)}, OPTIONS["max_new_tokens"], 0, OPTIONS)
        *_, last = engine.run(model.params, model.config, request, "host")
        runs[name] = last
    clean, poisoned = runs["clean"], runs["poisoned"]
    np.testing.assert_array_equal(np.asarray(poisoned.tokens)[1:3], np.asarray(clean.tokens)[1:3])
    for a, b in zip(jax.tree.leaves(poisoned.cache.blocks), jax.tree.leaves(clean.cache.blocks), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[1:3], np.asarray(b)[1:3])  # per-layer layout: rows first
    assert not np.isfinite(np.asarray(jax.tree.leaves(poisoned.cache.blocks)[0])[0]).all()


def test_a_nan_request_leaves_the_batch_engines_other_requests_identical():
    model = poisoned_model()
    outputs = {}
    for name, first in (("clean", 17), ("poisoned", POISON)):
        requests = [{"id": i, "inputs": {"input_ids": row}} for i, row in enumerate(prompts(first))]
        results = model.batch_engine(slots=4, max_length=64, **OPTIONS).generate(requests)
        outputs[name] = [r.token_ids for r in results]
    assert outputs["poisoned"][1:] == outputs["clean"][1:]
