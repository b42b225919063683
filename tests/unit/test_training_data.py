"""Fine-tuning data: the loss mask, bad lines, the batch plan and the loader (torch-free, no compiling)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from training_fixtures import conversation, write_images, write_jsonl

from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.data import (
    EMPTY_ROW,
    LOSS_FROM_TEMPLATE,
    LOSS_FROM_TURNS,
    BatchLoader,
    BatchPlan,
    DataError,
    RowSlice,
    read_conversations,
)

SYSTEM = "You are a helpful assistant."
QUESTION = "Describe this image in detail."
FIRST, SECOND = "A gift box wrapped in blue paper.", "There are three objects."


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Lfm2VlProcessor.from_pretrained(tiny_checkpoint)


def _multi_turn(images: list[str]) -> dict:
    record = conversation(images, QUESTION, FIRST, SYSTEM)
    record["messages"] += [
        {"role": "user", "content": "How many objects are there?"},
        {"role": "assistant", "content": SECOND},  # string content
    ]
    return record


def test_loss_mask_is_assistant_content_and_its_end_token(tmp_path, processor):
    """Built independently, piece by piece: only the assistant contents and their <|im_end|> are loss
    tokens; not the headers, the newline after <|im_end|>, the system or user turns."""
    path = write_jsonl(tmp_path / "train.jsonl", [_multi_turn([])])
    (example,) = read_conversations(path, processor, max_length=512).examples
    assert processor.eos_token == "<|im_end|>"

    def ids(text: str) -> list[int]:
        return processor.tokenizer.encode(text, add_special_tokens=False).ids

    pieces = [
        (processor.bos_token, False),
        (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", False),
        (f"<|im_start|>user\n{QUESTION}<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        (f"{FIRST}<|im_end|>", True),
        ("\n<|im_start|>user\nHow many objects are there?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        (f"{SECOND}<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids = [i for text, _ in pieces for i in ids(text)]
    expected_mask = [loss for text, loss in pieces for _ in ids(text)]
    np.testing.assert_array_equal(example.input_ids, expected_ids)
    np.testing.assert_array_equal(example.loss_mask, expected_mask)
    reference = processor.apply_chat_template(json.loads(path.read_text())["messages"], tokenize=True)
    np.testing.assert_array_equal(example.input_ids, reference[0])


def test_loss_mask_with_images(tmp_path, processor):
    names = write_images(tmp_path / "imgs")
    path = write_jsonl(tmp_path / "train.jsonl", [_multi_turn(names[:2])])
    (example,) = read_conversations(path, processor, max_length=4096).examples
    messages = _multi_turn([])["messages"]
    messages[1]["content"] = [
        *({"type": "image", "path": str(tmp_path / "imgs" / n)} for n in names[:2]),
        {"type": "text", "text": QUESTION},
    ]
    reference = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    np.testing.assert_array_equal(example.input_ids, reference["input_ids"][0])
    assert example.num_tiles == len(reference["spatial_shapes"])
    patches = reference["pixel_attention_mask"].sum(axis=1)
    assert example.max_patches == patches.max()
    assert not example.loss_mask[example.input_ids == processor.image_token_id].any()
    loss_text = processor.tokenizer.decode(
        example.input_ids[example.loss_mask].tolist(), skip_special_tokens=False
    )
    assert loss_text == f"{FIRST}<|im_end|>{SECOND}<|im_end|>"


# The LFM2-VL template with `{% generation %}` around each assistant message's content and its <|im_end|>.
MARKED_LFM2_VL_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% set content %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endset %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ content + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_markers_give_the_same_mask_as_the_turn_rule(tmp_path, processor, tiny_checkpoint):
    """Where both rules apply (the LFM2-VL template, and the same template with generation markers), the
    masks are equal token for token; the dataset says which rule it used."""
    names = write_images(tmp_path / "imgs")
    path = write_jsonl(tmp_path / "train.jsonl", [_multi_turn(names[:2]), _multi_turn([])])
    by_turns = read_conversations(path, processor, max_length=4096)
    processor.save_pretrained(tmp_path / "marked")
    (tmp_path / "marked" / "chat_template.jinja").write_text(MARKED_LFM2_VL_TEMPLATE)
    marked = Lfm2VlProcessor.from_pretrained(tmp_path / "marked")
    assert marked.has_generation_markers and not processor.has_generation_markers
    by_template = read_conversations(path, marked, max_length=4096)
    assert (by_turns.loss_rule, by_template.loss_rule) == (LOSS_FROM_TURNS, LOSS_FROM_TEMPLATE)
    for ours, reference in zip(by_template.examples, by_turns.examples, strict=True):
        assert ours.text == reference.text  # the same template, plus markers
        np.testing.assert_array_equal(ours.input_ids, reference.input_ids)
        np.testing.assert_array_equal(ours.loss_mask, reference.loss_mask)
        assert ours.loss_mask.sum() > 10


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"messages": [', "not valid JSON"),
        (json.dumps(conversation(["missing.png"], QUESTION, FIRST)), "not found"),
        (json.dumps({"messages": [{"role": "user", "content": QUESTION}]}), "no assistant turn"),
        (json.dumps(conversation([], QUESTION, "word " * 200)), "over --max-length 64"),
        (json.dumps({"conversation": []}), "'messages'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, processor, line, problem):
    good = json.dumps(conversation([], QUESTION, FIRST))
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", good, line])
    with pytest.raises(DataError) as error:
        read_conversations(path, processor, max_length=64)
    assert f"{path}:4: " in str(error.value) and problem in str(error.value)
    dataset = read_conversations(path, processor, max_length=64, skip_bad=True)
    assert len(dataset.examples) == 2 and len(dataset.skipped) == 1
    assert dataset.skipped[0].startswith(f"{path}:4: ")


def _plan_examples(tmp_path, processor, lengths: list[int]):
    records = [conversation([], QUESTION, "word " * n) for n in lengths]
    return read_conversations(write_jsonl(tmp_path / "t.jsonl", records), processor, 4096).examples


def test_batch_plan_is_seeded_deterministic_and_covers_each_epoch(tmp_path, processor):
    examples = _plan_examples(tmp_path, processor, [1, 3, 5, 40, 42, 44, 46, 200, 210, 2])
    plan = BatchPlan(examples, 4, seed=3, micro_batches=2, max_length=4096)
    again = BatchPlan(examples, 4, seed=3, micro_batches=2, max_length=4096)
    other = BatchPlan(examples, 4, seed=4, micro_batches=2, max_length=4096)
    steps = range(3 * plan.batches_per_epoch)
    assert all(np.array_equal(plan.step(s).rows, again.step(s).rows) for s in steps)
    assert any(not np.array_equal(plan.step(s).rows, other.step(s).rows) for s in steps)
    for epoch in range(3):
        batches = [plan.step(epoch * plan.batches_per_epoch + i) for i in range(plan.batches_per_epoch)]
        rows = np.concatenate([b.rows.reshape(-1) for b in batches])
        assert sorted(rows[rows != EMPTY_ROW]) == list(range(len(examples)))
        for b in batches:
            real = b.rows[b.rows != EMPTY_ROW]
            assert b.rows.shape == (2, 2)
            assert b.seq_len >= max(examples[i].length for i in real)
            assert b.seq_len in plan.seq_sizes
    summary = plan.summary(steps)
    assert 0 <= summary["token_padding"] < 1 and len(summary["shapes"]) <= len(plan.seq_sizes)


def test_loader_batches_hold_the_processor_outputs(tmp_path, processor, tiny_conversations):
    dataset = read_conversations(tiny_conversations, processor, 4096)
    plan = BatchPlan(
        dataset.examples, 4, seed=0, max_length=4096, max_patches=processor.image_processor.max_num_patches
    )
    loader = BatchLoader(dataset, plan, processor, RowSlice(0, 4), 4096, num_threads=2)
    iterator = loader.iterator(2)
    batch = next(iterator)
    state = iterator.get_state()
    step = plan.step(0)
    assert batch["input_ids"].shape == (1, 4, step.seq_len)
    assert batch["pixel_values"].shape == (1, step.tiles, step.patches, 48)
    tiles = 0
    for row, index in enumerate(step.rows[0]):
        example = dataset.examples[index]
        n = example.length
        np.testing.assert_array_equal(batch["input_ids"][0, row, :n], example.input_ids)
        np.testing.assert_array_equal(batch["loss_mask"][0, row, :n], example.loss_mask)
        assert batch["attention_mask"][0, row].sum() == n
        out = processor(images=[list(example.images)], text=[example.text])
        span = slice(tiles, tiles + example.num_tiles)
        np.testing.assert_array_equal(batch["spatial_shapes"][0, span], out["spatial_shapes"])
        np.testing.assert_array_equal(batch["pixel_values"][0, span], out["pixel_values"][:, : step.patches])
        tiles += example.num_tiles
    # Padding tiles: a 1x1 patch grid, which yields no image token.
    assert (batch["spatial_shapes"][0, tiles:] == 1).all()
    # The iterator state resumes at the next batch.
    second = next(iterator)
    resumed = loader.iterator(2, state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], second["input_ids"])
