"""Rows never interact: one row whose activations are NaN (a poisoned embedding, below any input check)
leaves every other row's tokens and cache bit-identical, in `generate` and in the batch engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_config, tiny_params

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.inference import engine

POISON = 400  # the token whose embedding is NaN


def poisoned_model(scan_layers: bool = False) -> Lfm2VlForConditionalGeneration:
    config = tiny_config(scan_layers=scan_layers)
    params = tiny_params(config)
    embed = params["text"]["embed"].at[POISON].set(jnp.nan)
    return Lfm2VlForConditionalGeneration(config, {**params, "text": {**params["text"], "embed": embed}})


def prompts(first: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 390, (3, 12))
    ids[0, 5] = first
    return ids


OPTIONS = dict(max_new_tokens=8, repetition_penalty=1.5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_nan_row_leaves_the_other_rows_and_their_cache_bit_identical(scan_layers):
    model = poisoned_model(scan_layers)
    rows = (slice(None), slice(1, 3)) if scan_layers else (slice(1, 3),)  # stacked: (layers, rows, ...)
    runs = {}
    for name, first in (("clean", 17), ("poisoned", POISON)):
        options = {"repetition_penalty": OPTIONS["repetition_penalty"]}
        request = model.request({"input_ids": prompts(first)}, OPTIONS["max_new_tokens"], 0, options)
        steps = list(engine.run(model.params, model.config, request, "host"))
        runs[name] = (np.concatenate([tokens for _, tokens in steps], axis=1), steps[-1][0])
    (clean, clean_state), (poisoned, poisoned_state) = runs["clean"], runs["poisoned"]
    np.testing.assert_array_equal(poisoned[1:3], clean[1:3])
    blocks = (jax.tree.leaves(poisoned_state.cache.blocks), jax.tree.leaves(clean_state.cache.blocks))
    for a, b in zip(*blocks, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[rows], np.asarray(b)[rows])
    # the poison took effect: row 0 decodes garbage (its NaN logits), unlike the clean run
    assert poisoned[0].tolist() != clean[0].tolist()


def test_a_nan_request_leaves_the_batch_engines_other_requests_identical():
    model = poisoned_model()
    outputs = {}
    for name, first in (("clean", 17), ("poisoned", POISON)):
        requests = [{"id": i, "inputs": {"input_ids": row}} for i, row in enumerate(prompts(first))]
        results = model.batch_engine(slots=4, max_length=64, **OPTIONS).generate(requests)
        outputs[name] = [r.token_ids for r in results]
    assert outputs["poisoned"][1:] == outputs["clean"][1:]
