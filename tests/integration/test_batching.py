"""Continuous batching (`inference/batching.py`): every request gets exactly the tokens `model.generate`
gives it alone, whatever shares the slots and whenever it was inserted; no recompilation once the shapes
have been seen; per-row sampling draws equal single-request draws.

Random-weight models rarely emit a stop token by chance, so early stops are arranged: a first
`generate` shows a request's tokens, and one of them (first seen at a chosen step) becomes the request's
extra stop token; the expected tokens then come from `generate` alone with that stop token.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counter import CompileCounter
from tiny_model import prompt_inputs, tiny_config, tiny_params

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.errors import Lfm2VlError
from lfm2vl_jax.inference.batch_io import BatchRequest
from lfm2vl_jax.inference.batching import RequestInbox
from lfm2vl_jax.inference.sampling import SamplingParams, next_token, next_token_rows

EOS = 7


@pytest.fixture(scope="module")
def model() -> Lfm2VlForConditionalGeneration:
    """Stacked (scanned) layers: the cache's slot axis is then behind the layers' axis. (The per-layer
    layout, the CPU default, runs in the CLI test.) Config and params as test_architecture.py's, whose
    initialisation programs a session then shares."""
    config = tiny_config(scan_layers=True)
    return Lfm2VlForConditionalGeneration(
        config, tiny_params(config), {"eos_token_id": EOS, "pad_token_id": 0}
    )


def engine(model, **options):
    """Three slots and short decode runs throughout: the same decode programs (one per busy-slot count)
    for every test."""
    return model.batch_engine(slots=3, chunk=4, **options)


def test_row_draws_equal_single_request_draws():
    """Each row of `next_token_rows` (own options, own key) is `next_token` on that row alone."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (5, 300)), jnp.float32)
    seen = jnp.asarray(rng.random((5, 300)) < 0.05)
    keys = jax.vmap(jax.random.key)(jnp.arange(5))
    rows = {
        "temperature": [0.5, 1.0, 0.7, 2.0, 1.0],
        "top_p": [0.9, 1.0, 0.5, 0.95, 1.0],
        "min_p": [0.0, 0.1, 0.0, 0.05, 0.0],
        "repetition_penalty": [1.0, 1.3, 1.05, 2.0, 1.5],
    }
    do_sample = [True, True, False, True, False]
    for top_k in (0, 50):
        params = SamplingParams(do_sample=True, top_k=top_k, **{k: jnp.asarray(v) for k, v in rows.items()})
        ours = next_token_rows(logits, seen, keys, params, jnp.asarray(do_sample))
        for b in range(5):
            alone = SamplingParams(
                do_sample=do_sample[b], top_k=top_k, **{k: float(v[b]) for k, v in rows.items()}
            )
            assert int(ours[b]) == int(next_token(logits[b : b + 1], seen[b : b + 1], keys[b], alone)[0])


def generate_alone(model, request: dict) -> list[int]:
    options = {k: v for k, v in request.items() if k not in ("id", "inputs", "max_new_tokens", "seed")}
    tokens = model.generate(
        **request["inputs"], max_new_tokens=request["max_new_tokens"], seed=request["seed"], **options
    )[0].tolist()
    stops = [EOS, *request.get("stop_token_ids", [])]
    stopped = [i for i, token in enumerate(tokens) if token in stops]
    return tokens[: stopped[0] + 1] if stopped else tokens


def with_stop_at(model, request: dict, step: int | None) -> dict:
    """The request with one extra stop token: the first token it emits at `step` or later that it has not
    emitted before (None: a token it never emits), found by a first `generate`."""
    tokens = generate_alone(model, {**request, "stop_token_ids": [511]})
    if step is not None:
        new = [k for k in range(step, len(tokens)) if tokens[k] not in tokens[:k]]
        if new:
            return {**request, "stop_token_ids": [tokens[new[0]]]}
    return {**request, "stop_token_ids": [next(t for t in range(8, 512) if t not in tokens)]}


# (prompt segments, max_new_tokens, options, stop step): text only and 1-2 images of different sizes,
# prompts of 5 to 20 tokens, limits of 1 to 16, greedy with and without repetition penalty, sampling.
# Prompts mostly fall in one length bucket to bound the number of programs compiled.
WORKLOAD = [
    ([5], 12, {}, None),
    ([3, (4, 6), 9], 16, {"repetition_penalty": 1.3}, 5),
    ([2, (8, 8), 1], 14, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}, None),
    ([4, (2, 2), 3, (4, 6), 4], 3, {}, None),
    ([18], 16, {"repetition_penalty": 1.2}, 4),
    ([17], 1, {}, None),
    ([9, (2, 8), 6], 10, {"do_sample": True, "temperature": 1.3, "min_p": 0.1, "repetition_penalty": 1.2}, 2),
    ([20], 16, {"repetition_penalty": 2.0}, 9),
    ([2, (6, 4), 12], 8, {}, 0),
    ([11, (4, 4), 3], 16, {"do_sample": True, "top_p": 0.7}, None),
]


def workload(model, seed: int) -> list[dict]:
    requests = []
    for i, (segments, max_new, options, stop_step) in enumerate(WORKLOAD):
        request = {
            "id": f"r{seed}-{i}",
            "inputs": prompt_inputs(model.config, segments, seed=100 * seed + i),
            "max_new_tokens": max_new,
            "seed": seed + i,
            **options,
        }
        requests.append(with_stop_at(model, request, stop_step))
    return requests


def test_each_request_gets_the_tokens_generate_gives_it_alone(model):
    requests = workload(model, seed=0)
    batch = engine(model, max_length=64, prefill_batch=2)
    results = batch.generate(requests)
    for request, result in zip(requests, results, strict=True):
        expected = generate_alone(model, request)
        assert result.token_ids == expected, request["id"]
        stopped = expected[-1] in [EOS, *request["stop_token_ids"]]
        assert result.finish_reason == ("stop" if stopped else "length")
        assert result.prompt_tokens == request["inputs"]["input_ids"].shape[1]
    reasons = [r.finish_reason for r in results]
    assert reasons.count("stop") >= 4 and reasons.count("length") >= 3  # the workload is as designed
    assert batch.stats.prefill_groups >= 4 and batch.stats.errors == 0  # inserted at different times


def test_no_recompilation_once_the_shapes_have_been_seen(model):
    """A second workload of other prompts, seeds and limits in the same buckets compiles no prefill,
    insert or full decode program: those are per bucket. (One request per prefill and one worker, so
    that the groups, and hence the buckets, do not depend on thread timing.) The one shape that does
    depend on timing is how many slots are busy when a decode run starts (the engine decodes only
    those, in power-of-two buckets, or every slot): a count the first workload never met compiles its
    decode program, and nothing else may compile."""
    batch = engine(model, max_length=64, prefill_batch=1, workers=1)
    batch.generate(workload(model, seed=1))
    second = workload(model, seed=2)
    counter = CompileCounter()
    results = batch.generate(second)
    assert set(counter.names) <= {"jit(decode_steps_on)", "jit(decode_steps)"}, counter.names
    assert counter.count <= 3  # one per busy count of 3 slots: 1, 2 (busy slots only) and 3 (every slot)
    assert [r.token_ids for r in results] == [generate_alone(model, r) for r in second]


def test_bad_requests_become_error_results_and_the_run_goes_on(model):
    good = {"id": "ok", "inputs": prompt_inputs(model.config, [6]), "max_new_tokens": 3, "seed": 0}
    too_long = {"id": "long", "inputs": prompt_inputs(model.config, [70]), "max_new_tokens": 3}
    mismatched = {"id": "images", "inputs": prompt_inputs(model.config, [3, (4, 4)])}
    del mismatched["inputs"]["pixel_values"], mismatched["inputs"]["pixel_attention_mask"]
    del mismatched["inputs"]["spatial_shapes"]
    top_k = {"id": "top_k", "inputs": prompt_inputs(model.config, [4]), "do_sample": True, "top_k": 5}
    no_processor = BatchRequest(id="messages", messages=[{"role": "user", "content": "hi"}])
    batch = engine(model, max_length=64, max_new_tokens=2)
    results = {r.id: r for r in batch.run([good, too_long, mismatched, top_k, no_processor])}
    assert results["ok"].finish_reason == "length" and len(results["ok"].token_ids) == 3
    errors = {name: results[name].error for name in ("long", "images", "top_k", "messages")}
    assert all(results[name].finish_reason == "error" for name in errors)
    assert "max_length=64" in errors["long"]
    assert "image tokens" in errors["images"]
    assert "top_k=5" in errors["top_k"]
    assert "processor" in errors["messages"]
    assert batch.stats.errors == 4 and batch.stats.requests == 5


def test_max_length_cuts_the_limit_and_submit_queues(model):
    """prompt + new tokens stay within max_length ("length"); `submit` then `run()`."""
    batch = engine(model, max_length=24, max_new_tokens=16, eos_token_id=[])
    batch.submit({"id": 0, "inputs": prompt_inputs(model.config, [20]), "seed": 0})
    batch.submit({"id": 1, "inputs": prompt_inputs(model.config, [5]), "seed": 0})
    lengths = {r.id: len(r.token_ids) for r in batch.run()}
    assert lengths == {0: 4, 1: 16}


def test_seeds_use_all_64_bits_in_the_engine_as_in_generate(model):
    """0 and 2**32 (and -1 and 2**32 - 1) draw different tokens; -1 is 2**64 - 1 (two's complement); each
    request still gets what `generate` gives it alone; a seed beyond 64 bits is an error record."""
    seeds = [0, 2**32, 2**32 - 1, -1, 2**64 - 1, 2**63 + 5]
    requests = [
        {
            "id": seed,
            "inputs": prompt_inputs(model.config, [5], seed=3),
            "max_new_tokens": 8,
            "seed": seed,
            "do_sample": True,
            "temperature": 3.0,
            "top_k": 50,
            "eos_token_id": [],
        }
        for seed in seeds
    ]
    bad = {**requests[0], "id": "too big", "seed": 2**64}
    results = {r.id: r for r in engine(model, max_length=64).generate([*requests, bad])}
    for request in requests:
        assert results[request["id"]].token_ids == generate_alone(model, request), request["id"]
    tokens = {seed: results[seed].token_ids for seed in seeds}
    assert tokens[0] != tokens[2**32] and tokens[-1] != tokens[2**32 - 1] and tokens[-1] == tokens[2**64 - 1]
    assert len({tuple(t) for t in tokens.values()}) == len(seeds) - 1
    assert (
        results["too big"].finish_reason == "error"
        and "seed must be an integer in" in results["too big"].error
    )
    with pytest.raises(
        Lfm2VlError, match="seed must be an integer in .*18446744073709551615.*got -9223372036854775809"
    ):
        engine(model, seed=-(2**63) - 1)


def test_generation_config_lengths_are_the_engines_defaults(model):
    """generation_config.json's max_new_tokens (else max_length minus the prompt) for requests and engines
    that set none; a request's own limit wins."""
    for lengths, expected in (({"max_new_tokens": 5}, [5, 2]), ({"max_length": 12}, [7, 2])):
        generation_config = {"eos_token_id": [], "pad_token_id": 0, **lengths}
        configured = Lfm2VlForConditionalGeneration(model.config, model.params, generation_config)
        requests = [
            {"id": 0, "inputs": prompt_inputs(model.config, [5])},
            {"id": 1, "inputs": prompt_inputs(model.config, [5]), "max_new_tokens": 2},
        ]
        results = engine(configured, max_length=64).generate(requests)
        assert [len(r.token_ids) for r in results] == expected


@pytest.mark.parametrize(
    "option, value", [("workers", -1), ("workers", 0.5), ("prefill_batch", 0), ("prefill_batch", True)]
)
def test_engine_sizes_are_positive_integers_named(model, option, value):
    from lfm2vl_jax.errors import Lfm2VlError

    with pytest.raises(Lfm2VlError, match=f"{option} must be a positive integer, got {value!r}"):
        engine(model, **{option: value})


def test_serve_takes_requests_while_running_and_a_cancelled_one_leaves_its_slot(model):
    """`serve`: requests put from another thread while the engine runs get exactly their tokens alone; a
    request cancelled as its first tokens arrive yields nothing and frees its slot for the others;
    closing the inbox ends the run once the rest have finished."""
    batch = engine(model, max_length=64)
    requests = workload(model, seed=3)[:5]
    endless = {
        "id": "endless",
        "inputs": prompt_inputs(model.config, [6]),
        "max_new_tokens": 50,
        "eos_token_id": [],
    }
    inbox = RequestInbox()
    progress: dict = {}

    def on_tokens(tag, tokens):  # on the engine thread
        progress.setdefault(tag, []).append(len(tokens))
        if tag == "endless":
            inbox.cancel(tag)

    results = {}

    def run():
        for tag, result in batch.serve(inbox, on_tokens):
            results[tag] = result

    thread = threading.Thread(target=run)
    thread.start()
    inbox.put("endless", endless)
    for request in requests:
        inbox.put(request["id"], request)
    inbox.close()
    thread.join(120)
    assert not thread.is_alive()
    assert "endless" not in results and len(progress["endless"]) == 1  # cancelled at its first progress
    assert progress["endless"][0] < 50
    for request in requests:
        assert results[request["id"]].token_ids == generate_alone(model, request), request["id"]
        lengths = progress.get(request["id"], [])
        assert lengths == sorted(lengths) and all(n <= len(results[request["id"]].token_ids) for n in lengths)
    assert batch.busy_slots == 0
