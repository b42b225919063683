"""The inference engine: greedy parity with transformers' `generate`, cached decoding vs full recompute,
ragged batches, bounded recompilation, sampling semantics, streaming, loops.

Greedy decoding of random-weight models tends to fall into a one-token loop after a few steps, which
would make a 32-token comparison weak; most parity tests therefore use a strong repetition penalty
(applied in greedy decoding too, by both implementations): each step then picks the best token not yet
seen, which still depends on every step's logits being right, and the sequences stay varied.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compile_counter import CompileCounter
from PIL import Image
from reference_models import (
    TEST_DATA,
    build_reference,
    prompt_with_images,
    ragged_batch,
    random_images,
    save_reference,
    single,
    tiny_config,
)

from lfm2vl_jax import Lfm2VlForConditionalGeneration

NEW_TOKENS = 32
PENALTY = 2.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    config = tiny_config()
    reference = build_reference(config, seed=11)
    directory = save_reference(reference, tmp_path_factory.mktemp("gen"))
    return config, reference, Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


def reference_generate(reference, inputs: dict, max_new_tokens=NEW_TOKENS, **options) -> np.ndarray:
    torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    if "pixel_attention_mask" in torch_inputs:
        torch_inputs["pixel_attention_mask"] = torch_inputs["pixel_attention_mask"].bool()
    with torch.no_grad():
        out = reference.generate(
            **torch_inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **options
        )
    return out[:, torch_inputs["input_ids"].shape[1] :].numpy()


def tiled_photo(config) -> dict:
    from transformers import Lfm2VlImageProcessor

    processor = Lfm2VlImageProcessor(
        encoder_patch_size=4, tile_size=32, max_image_tokens=16, min_image_tokens=4, use_thumbnail=True
    )
    pixels = processor(images=[[Image.open(TEST_DATA / "images" / "grace_hopper.jpg")]], return_tensors="np")
    return {k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


def row_requests(config) -> list[dict]:
    """Three different rows: text only, one small image, a tiled photo."""
    photo = tiled_photo(config)
    shapes = [tuple(s) for s in photo["spatial_shapes"].tolist()]
    return [
        single(prompt_with_images(config, [9], seed=1)),
        single(
            prompt_with_images(config, [3, (4, 6), 5], seed=2), random_images(config, [(4, 6)], 64, seed=2)
        ),
        single(prompt_with_images(config, [4, *shapes, 2], seed=3), photo),
    ]


def assert_same_tokens(ours: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the shorter length (one side may stop at EOS); at least NEW_TOKENS unless EOS came."""
    n = min(ours.shape[1], expected.shape[1])
    np.testing.assert_array_equal(ours[:, :n], expected[:, :n])
    assert n == NEW_TOKENS or (expected[:, :n] == 7).any()


@pytest.mark.parametrize("row", [0, 1, 2], ids=["text-only", "small-image", "tiled-image-with-thumbnail"])
def test_greedy_matches_transformers(pair, row):
    config, reference, model = pair
    inputs = row_requests(config)[row]
    expected = reference_generate(reference, inputs, repetition_penalty=PENALTY)
    ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY)
    assert len(set(expected[0].tolist())) > 8, "reference output too repetitive to be a strong test"
    assert_same_tokens(ours, expected)


def test_plain_greedy_matches_transformers(pair):
    config, reference, model = pair
    inputs = row_requests(config)[1]
    assert_same_tokens(
        model.generate(**inputs, max_new_tokens=NEW_TOKENS), reference_generate(reference, inputs)
    )


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_ragged_batch_rows_equal_each_row_alone_and_transformers(pair, pad_side):
    config, reference, model = pair
    requests = row_requests(config)
    batch = model.generate(
        **ragged_batch(requests, pad_side), max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY
    )
    for i, request in enumerate(requests):
        alone = model.generate(**request, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY)
        np.testing.assert_array_equal(batch[i, : alone.shape[1]], alone[0])
        assert (batch[i, alone.shape[1] :] == 0).all()  # padded after EOS
        expected = reference_generate(reference, request, repetition_penalty=PENALTY)
        assert_same_tokens(batch[i : i + 1, : alone.shape[1]], expected)


def test_batch_engine_gives_each_request_transformers_tokens(pair):
    """The batch engine straight against transformers' `generate`, each request alone: text only, a small
    image and a tiled photo, greedy with and without a repetition penalty, sharing two slots (so requests
    join while others decode, and the penalty table comes and goes)."""
    config, reference, model = pair
    requests = row_requests(config)
    options = [{}, {"repetition_penalty": PENALTY}]
    items = [
        {"id": f"{i}-{j}", "inputs": inputs, "max_new_tokens": NEW_TOKENS, **extra}
        for i, inputs in enumerate(requests)
        for j, extra in enumerate(options)
    ]
    results = model.batch_engine(slots=2, max_length=512, prefill_batch=1).generate(items)
    for item, result in zip(items, results, strict=True):
        extra = {k: v for k, v in item.items() if k == "repetition_penalty"}
        expected = reference_generate(reference, item["inputs"], **extra)
        assert_same_tokens(np.asarray([result.token_ids]), expected)


def test_both_layer_layouts_generate_the_same_tokens(pair, tmp_path):
    config, reference, model = pair
    save_reference(reference, tmp_path)
    other = Lfm2VlForConditionalGeneration.from_pretrained(
        tmp_path, scan_layers=not model.config.runtime.scan_layers, progress=False
    )
    batch = ragged_batch(row_requests(config))
    np.testing.assert_array_equal(
        other.generate(**batch, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY),
        model.generate(**batch, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY),
    )


def test_cached_decode_logits_equal_full_recompute(pair):
    """Prefill a ragged batch (a text row and an image row), decode 6 tokens through the cache, and
    compare every step's logits with a full forward pass over prompt + tokens so far (float32, 1e-5)."""
    import jax
    import jax.numpy as jnp

    from lfm2vl_jax.inference.cache import append, init_cache
    from lfm2vl_jax.nn.model import embed_inputs, forward
    from lfm2vl_jax.nn.text import embed_tokens, lm_logits, text_forward

    config, _, model = pair
    cfg, params = model.config, model.params
    image_keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
    requests = row_requests(config)[:2]
    batch = ragged_batch(requests)
    mask = jnp.asarray(batch["attention_mask"], bool)

    @jax.jit
    def prefill(params, ids, mask, images):
        hidden, entries = text_forward(
            params["text"], cfg.text, cfg.runtime, embed_inputs(params, cfg, ids, *images), mask
        )
        empty = init_cache(cfg, 2, 128)
        return append(empty, entries, mask.sum(1))

    @jax.jit
    def step(params, cache, tokens):
        embeds = embed_tokens(params["text"], tokens[:, None], cfg.runtime)
        hidden, entries = text_forward(
            params["text"], cfg.text, cfg.runtime, embeds, jnp.ones((2, 1), bool), cache=cache
        )
        return append(cache, entries, jnp.ones(2, jnp.int32)), lm_logits(params["text"], hidden[:, 0])

    cache = prefill(params, batch["input_ids"], mask, [batch[k] for k in image_keys])
    sequences = [list(r["input_ids"][0]) for r in requests]
    width = 96  # full recomputes right-padded to one length (exact at real positions): one program
    for new in np.random.default_rng(0).integers(10, 390, (6, 2)):
        cache, cached = step(params, cache, jnp.asarray(new))
        for i, token in enumerate(new):
            sequences[i].append(int(token))
            n = len(sequences[i])
            ids = np.zeros((1, width), np.int64)
            ids[0, :n] = sequences[i]
            images = {k: requests[i].get(k) for k in image_keys}
            full = np.asarray(
                jax.jit(forward, static_argnums=1)(params, cfg, ids, (np.arange(width) < n)[None], **images)
            )[0, n - 1]
            error = np.abs(np.asarray(cached[i]) - full).max() / np.abs(full).max()
            assert error <= 1e-5, f"row {i}: relative error {error:.1e}"


def test_recompilation_is_bounded_by_buckets(pair):
    """Ten requests, each of a different raw shape (batch rows, prompt length, image count and sizes,
    max_new_tokens), compile only the programs of the few buckets they fall into."""
    from lfm2vl_jax.inference.engine import bucket

    config, _, model = pair
    shapes = [(2, 2), (4, 6), (8, 8), (6, 4)]
    requests = []
    for i in range(10):
        rows = []
        for r in range(1 + i % 3):
            picked = shapes[: (i + r) % 3]
            segments = [5 + 3 * i + r] + [x for shape in picked for x in (shape, 2)]
            rows.append(
                single(prompt_with_images(config, segments, seed=i), random_images(config, picked, 64))
            )
        if not any(len(r["spatial_shapes"]) for r in rows):
            rows[0] = single(
                prompt_with_images(config, [5, (2, 2)], seed=i), random_images(config, [(2, 2)], 64)
            )
        requests.append((ragged_batch(rows), 4 + i))
    raw_shapes = {(b["input_ids"].shape, b["pixel_values"].shape, n) for b, n in requests}
    buckets = set()
    for b, _ in requests:
        rows, seq, images = (
            bucket(len(b["input_ids"])),
            bucket(int(b["attention_mask"].sum(1).max()), 16),
            bucket(len(b["pixel_values"])),
        )
        buckets |= {("prefill", rows, seq, images), ("decode", rows, seq)}
    assert len(raw_shapes) == 10 and len(buckets) < 2 * len(raw_shapes)

    counter = CompileCounter()
    for batch, max_new in requests:
        model.generate(**batch, max_new_tokens=max_new)
    # One program per bucket, plus at most a few one-off helpers (PRNG key, stop-id array).
    assert counter.count <= len(buckets) + 4, (counter.count, len(buckets))
    before = counter.count
    for batch, max_new in requests[:3]:  # the same shapes again: nothing new
        model.generate(**batch, max_new_tokens=max_new)
    assert counter.count == before


def test_processed_logits_match_transformers_warpers():
    import jax.numpy as jnp
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from lfm2vl_jax.inference.sampling import SamplingParams, process_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 300)).astype(np.float32)
    history = rng.integers(0, 300, (4, 20))
    seen = np.zeros((4, 300), bool)
    np.put_along_axis(seen, history, True, axis=1)
    for temperature, top_k, top_p, min_p, penalty in [
        (0.7, 50, 0.9, 0.0, 1.0),
        (1.0, 0, 0.8, 0.0, 1.3),
        (0.1, 50, 1.0, 0.15, 1.05),  # the model card's recommendation
        (1.5, 10, 0.5, 0.05, 0.8),
    ]:
        processors = LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + [TopPLogitsWarper(top_p)]
            + ([MinPLogitsWarper(min_p)] if min_p else [])
        )
        expected = processors(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
        params = SamplingParams(
            do_sample=True,
            top_k=top_k,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=penalty,
        )
        ours = np.asarray(process_logits(jnp.asarray(logits), jnp.asarray(seen), params))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
        kept = ~np.isinf(expected)
        np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_sampling_draws_from_the_processed_distribution():
    """next_token with top-k (candidate path) samples exactly the support and frequencies of
    process_logits (full-vocabulary path)."""
    import jax
    import jax.numpy as jnp

    from lfm2vl_jax.inference.sampling import SamplingParams, next_token, process_logits

    logits = jnp.asarray(np.random.default_rng(1).normal(0, 2, (1, 200)), jnp.float32)
    seen = jnp.zeros((1, 200), bool)
    params = SamplingParams(do_sample=True, top_k=20, temperature=0.8, top_p=0.9, min_p=0.05)
    draws = jax.vmap(lambda k: next_token(logits, seen, k, params)[0])(
        jax.random.split(jax.random.key(0), 20000)
    )
    probs = np.asarray(jax.nn.softmax(process_logits(logits, seen, params)))[0]
    counts = np.bincount(np.asarray(draws), minlength=200) / 20000
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs))
    np.testing.assert_allclose(counts, probs, atol=0.015)  # 20k draws: binomial std <= 0.0036


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    config, _, model = pair
    inputs = row_requests(config)[1]
    hot = dict(max_new_tokens=12, do_sample=True, temperature=4.0, top_k=0)  # random weights: peaked logits
    a = model.generate(**inputs, **hot, seed=3)
    b = model.generate(**inputs, **hot, seed=3)
    c = model.generate(**inputs, **hot, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = model.generate(**inputs, max_new_tokens=12)
    np.testing.assert_array_equal(
        model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=1, seed=9), greedy
    )


def test_stop_tokens_max_new_tokens_streaming_and_loops(pair):
    config, _, model = pair
    inputs = row_requests(config)[0]
    full = model.generate(**inputs, max_new_tokens=20, repetition_penalty=PENALTY)
    assert full.shape == (1, 20)
    stop = int(full[0, 5])
    first = int(np.flatnonzero(full[0] == stop)[0])
    stopped = model.generate(**inputs, max_new_tokens=20, repetition_penalty=PENALTY, stop_token_ids=[stop])
    np.testing.assert_array_equal(stopped[0], full[0, : first + 1])  # ends with the stop token

    streamed: list[np.ndarray] = []
    model.generate(**inputs, max_new_tokens=20, repetition_penalty=PENALTY, streamer=streamed.append)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), full)
    np.testing.assert_array_equal(
        np.stack(list(model.stream(**inputs, max_new_tokens=20, repetition_penalty=PENALTY)), axis=1), full
    )
    on_device = model.generate(**inputs, max_new_tokens=20, repetition_penalty=PENALTY, loop="device")
    np.testing.assert_array_equal(on_device, full)


def test_generate_refuses_bad_requests(pair):
    config, _, model = pair
    inputs = row_requests(config)[1]
    with pytest.raises(ValueError, match="image tokens"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=4)
    with pytest.raises(TypeError, match="unexpected arguments.*temprature"):
        model.generate(**inputs, temprature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(**inputs, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(**inputs, max_new_tokens=0)
