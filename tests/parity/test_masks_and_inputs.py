"""transformers' forward-pass behaviour that users rely on (issue 21): any attention mask (left padding,
zeros inside a row), `position_ids`, `inputs_embeds` and `labels`; and the cached paths (`generate`, the
batch engine) on left-padded and holed prompts against transformers' `generate`.

Tolerances: logits as tests/parity/test_parity.py (relative 1e-5 of the largest reference logit, compared
at the unmasked positions only: transformers' outputs at masked positions depend on its attention kernel);
the loss relative 1e-5 (a float32 mean of the same cross-entropies); generation token for token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_models import (
    build_reference,
    prompt_with_images,
    ragged_batch,
    random_images,
    save_reference,
    single,
    tiny_config,
)

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.errors import Lfm2VlError

RTOL = 1e-5
NEW_TOKENS = 16
PENALTY = 2.0  # keeps greedy sequences of a random model varied (see test_generate.py)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    config = tiny_config()
    reference = build_reference(config, seed=5)
    directory = save_reference(reference, tmp_path_factory.mktemp("masks"))
    return config, reference, Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


def torch_inputs(inputs: dict) -> dict:
    out = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if v is not None}
    if "pixel_attention_mask" in out:
        out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()
    return out


def reference_forward(reference, inputs: dict):
    with torch.no_grad():
        return reference(**torch_inputs(inputs))


def assert_close_where(ours, expected, where, rtol=RTOL):
    ours, expected = np.asarray(ours, np.float64)[where], np.asarray(expected, np.float64)[where]
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


def requests(config) -> list[dict]:
    return [
        single(prompt_with_images(config, [5, (8, 8), 7], seed=1), random_images(config, [(8, 8)], 64, 1)),
        single(prompt_with_images(config, [13], seed=2)),
        single(
            prompt_with_images(config, [3, (4, 8), 2, (8, 4), 4], seed=3),
            random_images(config, [(4, 8), (8, 4)], 64, 3),
        ),
    ]


def with_hole(batch: dict, row: int, position: int) -> dict:
    """A zero inside row `row`'s mask, at its `position`-th token."""
    mask = batch["attention_mask"].copy()
    mask[row, np.flatnonzero(mask[row])[position]] = 0
    return {**batch, "attention_mask": mask}


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padded_batch_logits_equal_transformers(pair, pad_side):
    config, reference, model = pair
    batch = ragged_batch(requests(config), pad_side=pad_side)
    valid = batch["attention_mask"].astype(bool)
    expected = reference_forward(reference, batch).logits.numpy()
    assert_close_where(model(**batch).logits, expected, valid)


def test_left_padded_rows_equal_each_row_alone(pair):
    """Left padding shifts a row's positions, which rotary attention does not see: each row's logits are
    its logits alone, as in transformers."""
    config, _, model = pair
    rows = requests(config)
    batch = ragged_batch(rows, pad_side="left")
    logits = np.asarray(model(**batch).logits)
    images = 0
    for i, row in enumerate(rows):
        alone = np.asarray(model(**row).logits)[0]
        mine = logits[i][batch["attention_mask"][i].astype(bool)]
        assert_close_where(mine, alone, slice(None))
        images += len(row.get("spatial_shapes", ()))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_zeros_inside_the_mask_equal_transformers(pair, batch_size):
    config, reference, model = pair
    batch = ragged_batch(requests(config)[:batch_size] if batch_size > 1 else requests(config)[1:2], "left")
    batch = with_hole(batch, 0, 4)
    if batch_size > 1:
        batch = with_hole(batch, batch_size - 1, 1)
    valid = batch["attention_mask"].astype(bool)
    expected = reference_forward(reference, batch).logits.numpy()
    ours = np.asarray(model(**batch).logits)
    assert np.isfinite(ours).all()
    assert_close_where(ours, expected, valid)
    # the hole changes what follows it (it is not a no-op), as in the reference
    plain = np.asarray(model(**{**batch, "attention_mask": np.ones_like(batch["attention_mask"])}).logits)
    assert np.abs(plain[0, -1] - ours[0, -1]).max() > 1e-3


def test_position_ids_equal_transformers(pair):
    config, reference, model = pair
    batch = ragged_batch(requests(config)[:2], "right")
    seq = batch["input_ids"].shape[1]
    positions = np.stack([np.arange(seq) + 7, np.arange(seq) * 2]).astype(np.int64)
    inputs = {**batch, "position_ids": positions}
    valid = batch["attention_mask"].astype(bool)
    expected = reference_forward(reference, inputs).logits.numpy()
    assert_close_where(model(**inputs).logits, expected, valid)
    # (1, seq) broadcasts over the batch, as in transformers
    inputs = {**batch, "position_ids": positions[:1]}
    expected = reference_forward(reference, inputs).logits.numpy()
    assert_close_where(model(**inputs).logits, expected, valid)


def test_inputs_embeds_equal_transformers(pair):
    config, reference, model = pair
    for pad_side in ("right", "left"):
        batch = ragged_batch(requests(config), pad_side)
        with torch.no_grad():
            embeds = reference.get_input_embeddings()(torch.from_numpy(batch["input_ids"])).numpy()
        inputs = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
        valid = batch["attention_mask"].astype(bool)
        expected = reference_forward(reference, inputs).logits.numpy()
        ours = model(**inputs).logits
        assert_close_where(ours, expected, valid)
        assert_close_where(ours, model(**batch).logits, valid)


def test_labels_loss_equals_transformers(pair):
    config, reference, model = pair
    batch = ragged_batch(requests(config), "right")
    labels = np.where(batch["attention_mask"].astype(bool), batch["input_ids"], -100)
    labels[:, :6] = -100  # a prompt without loss
    inputs = {**batch, "labels": labels}
    expected = float(reference_forward(reference, inputs).loss)
    ours = float(model(**inputs).loss)
    assert abs(ours - expected) <= RTOL * abs(expected), (ours, expected)
    assert model(**batch).loss is None


def test_bad_forward_inputs_are_refused(pair):
    config, _, model = pair
    batch = ragged_batch(requests(config)[1:2], "right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = np.zeros((*ids.shape, config.text_config.hidden_size), np.float32)
    cases = [
        ({"input_ids": ids, "inputs_embeds": embeds}, "not both"),
        ({"inputs_embeds": embeds[..., :5]}, r"inputs_embeds must be \(batch, seq, 64\)"),
        ({"inputs_embeds": np.full_like(embeds, np.nan)}, "inputs_embeds hold NaN"),
        ({"input_ids": ids, "labels": ids[:, :3]}, "labels must have the inputs' shape"),
        ({"input_ids": ids, "labels": np.full_like(ids, 512)}, r"labels\[0, 0\] is 512"),
        ({"input_ids": ids, "labels": np.full_like(ids, -100)}, "no token to predict"),
        ({"input_ids": ids, "attention_mask": np.zeros_like(mask)}, r"masks every token of row\(s\) \[0\]"),
        ({"input_ids": ids, "position_ids": np.arange(3)[None]}, "position_ids must be"),
        ({"input_ids": ids, "position_ids": np.full_like(ids, -1)}, "position_ids must lie in"),
        (
            {
                "input_ids": ids,
                "position_ids": np.array([[0, 1, 2, 0, 1] + list(range(2, ids.shape[1] - 3))]),
            },
            "packed sequences",
        ),
        (
            {"input_ids": np.zeros((1, config.text_config.max_position_embeddings + 1), np.int64)},
            "max_position_embeddings",
        ),
    ]
    for inputs, message in cases:
        with pytest.raises(Lfm2VlError, match=message):
            model(**inputs)


def reference_generate(reference, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = reference.generate(
            **torch_inputs(inputs),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            repetition_penalty=PENALTY,
        )
    return out[:, inputs["input_ids"].shape[1] :].numpy()


def trim(tokens: np.ndarray, stop: int = 7) -> list[list[int]]:
    rows = []
    for row in np.asarray(tokens).tolist():
        rows.append(row[: row.index(stop) + 1] if stop in row else row)
    return rows


@pytest.mark.parametrize("hole", [False, True])
def test_generate_and_batch_engine_on_left_padding_and_holes_equal_transformers(pair, hole):
    """transformers' `generate` on a left-padded batch (positions count the tokens before, a hole takes
    none and feeds the convolutions a zero); ours gives each row the same tokens, in `generate` and in the
    batch engine (each request's `inputs` one row of that batch)."""
    config, reference, model = pair
    batch = ragged_batch(requests(config), "left")
    if hole:
        batch = with_hole(with_hole(batch, 0, 3), 2, 6)
    expected = trim(reference_generate(reference, batch))
    options = dict(max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY)
    assert trim(model.generate(**batch, **options)) == expected

    image_rows = np.cumsum([0] + [len(r.get("spatial_shapes", ())) for r in requests(config)])
    rows = []
    for i in range(len(expected)):
        inputs = {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i]}
        if image_rows[i + 1] > image_rows[i]:
            span = slice(image_rows[i], image_rows[i + 1])
            for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
                inputs[key] = batch[key][span]
        rows.append({"id": i, "inputs": inputs})
    engine = model.batch_engine(slots=2, max_length=256, **options)
    results = engine.generate(rows)
    assert [r.error for r in results] == [None] * len(rows)
    assert [trim([r.token_ids])[0] for r in results] == expected


def test_generate_with_inputs_embeds_equals_transformers(pair):
    """A left-padded batch without a penalty, and one unpadded row with one: with `inputs_embeds` transformers
    penalises only generated tokens, but skips as many of them as the row has left padding (it reuses the
    prompt's padding lengths), which we do not copy."""
    config, reference, model = pair
    for batch, penalty in ((ragged_batch(requests(config)[:2], "left"), 1.0), (requests(config)[0], PENALTY)):
        with torch.no_grad():
            embeds = reference.get_input_embeddings()(torch.from_numpy(batch["input_ids"])).numpy()
        inputs = {k: v for k, v in batch.items() if k != "input_ids"} | {"inputs_embeds": embeds}
        with torch.no_grad():
            expected = reference.generate(
                **torch_inputs(inputs),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                repetition_penalty=penalty,
            ).numpy()
        ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, repetition_penalty=penalty)
        assert trim(ours) == trim(expected)


def test_conv_bias_left_padding_equals_transformers(tmp_path):
    """With biased projections a padding position's zeroed input still leaves the bias: transformers feeds
    that into the convolution, and so do we (a left-padded row is then not the row alone)."""
    config = tiny_config(text={"conv_bias": True})
    reference = build_reference(config, seed=2)
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        save_reference(reference, tmp_path), progress=False
    )
    batch = with_hole(ragged_batch(requests(config)[:2], "left"), 1, 2)
    valid = batch["attention_mask"].astype(bool)
    assert_close_where(model(**batch).logits, reference_forward(reference, batch).logits.numpy(), valid)


def test_output_hidden_states_equal_transformers(pair):
    """Same count (layers + 1), order (embeddings first, the last one final-normed) and values."""
    config, reference, model = pair
    batch = ragged_batch(requests(config), "left")
    valid = batch["attention_mask"].astype(bool)
    with torch.no_grad():
        expected = reference(**torch_inputs(batch), output_hidden_states=True).hidden_states
    ours = model(**batch, output_hidden_states=True).hidden_states
    assert len(ours) == len(expected) == config.text_config.num_hidden_layers + 1
    for mine, theirs in zip(ours, expected, strict=True):
        assert_close_where(mine, theirs.numpy(), valid)


def test_get_image_features_equal_transformers(pair):
    config, reference, model = pair
    images = random_images(config, [(8, 8), (4, 8), (8, 4)], 64, seed=4)
    with torch.no_grad():
        expected = reference.get_image_features(
            pixel_values=torch.from_numpy(images["pixel_values"]),
            spatial_shapes=torch.from_numpy(images["spatial_shapes"]),
            pixel_attention_mask=torch.from_numpy(images["pixel_attention_mask"]).bool(),
        )
    ours = model.get_image_features(
        images["pixel_values"], images["spatial_shapes"], images["pixel_attention_mask"]
    )
    patches = images["pixel_attention_mask"].astype(bool)
    assert_close_where(ours.last_hidden_state, expected.last_hidden_state.numpy(), patches)
    assert [x.shape for x in ours.pooler_output] == [tuple(x.shape) for x in expected.pooler_output]
    for mine, theirs in zip(ours.pooler_output, expected.pooler_output, strict=True):
        assert_close_where(mine, theirs.numpy(), slice(None))
    with pytest.raises(Lfm2VlError, match="spatial_shapes must be"):
        model.get_image_features(
            images["pixel_values"], images["spatial_shapes"][:1], images["pixel_attention_mask"]
        )
