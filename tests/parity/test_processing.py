"""Chat processor against transformers' live `Lfm2VlProcessor` on the same files: chat template
rendering, placeholder expansion and tokenisation (identical ids and masks), padding, truncation,
decoding, loading and saving, and bad conversations.

Pixel tolerance as in test_image_processing (one uint8 step, >= 99.9% exactly equal)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processor_fixtures import (
    assert_processor_outputs_match,
    image_path,
    make_reference_processor,
    synthetic_image,
)

from lfm2vl_jax.checkpoint.hub import CheckpointNotFoundError
from lfm2vl_jax.processing.image_processor import ProcessorError
from lfm2vl_jax.processing.processor import Lfm2VlProcessor

TINY = np.zeros((4, 4, 3), np.uint8)


def _photo() -> Image.Image:
    with Image.open(image_path("grace_hopper.jpg")) as image:
        return image.convert("RGB")


def _conversations() -> dict[str, list]:
    photo = _photo()
    wide = Image.fromarray(synthetic_image(400, 1500, seed=3))  # split into a 1x3 grid
    small = synthetic_image(60, 80, seed=4)
    return {
        "single image": [
            {
                "role": "user",
                "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Describe."}],
            }
        ],
        "system prompt": [
            {"role": "system", "content": "You are a careful assistant."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is this?"}, {"type": "image", "image": wide}],
            },
        ],
        "multi-image multi-turn": [
            {
                "role": "user",
                "content": [{"type": "image", "image": small}, {"type": "text", "text": "And this python?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A pattern, Mathias."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare:"},
                    {"type": "image", "image": wide},
                    {"type": "image", "image": photo},
                ],
            },
        ],
        "text only": [{"role": "user", "content": "Hello! Ünïcödé, 東京 🙂"}],
        "image by path and url": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(image_path("grace_hopper.jpg"))},
                    {"type": "image_url", "image_url": {"url": str(image_path("grace_hopper.jpg"))}},
                    {"type": "text", "text": "Same picture twice?"},
                ],
            }
        ],
    }


CONVERSATION_CASES = [
    "single image",
    "system prompt",
    "multi-image multi-turn",
    "text only",
    "image by path and url",
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", CONVERSATION_CASES)
def test_single_conversation_matches_reference(
    case: str, add_generation_prompt: bool, processor, reference_processor
) -> None:
    conversation = _conversations()[case]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert prompt == reference_processor.apply_chat_template(
        copy.deepcopy(conversation), add_generation_prompt=add_generation_prompt
    )
    ours = processor.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    expected = reference_processor.apply_chat_template(
        copy.deepcopy(conversation),
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )
    assert_processor_outputs_match(ours, expected, f"chat {case}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_of_conversations_matches_reference(padding_side: str, processor, reference_processor) -> None:
    batch = list(_conversations().values())  # 0, 1, 3, 1 and 2 images; ids padded to the longest
    ours = processor.apply_chat_template(
        batch, add_generation_prompt=True, tokenize=True, return_dict=True, padding_side=padding_side
    )
    expected = reference_processor.apply_chat_template(
        copy.deepcopy(batch),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs={"padding": True, "padding_side": padding_side},
    )
    assert_processor_outputs_match(ours, expected, f"chat batch padding_side={padding_side}")
    mask = ours["attention_mask"]
    assert (mask == 0).any() and (ours["input_ids"][mask == 0] == processor.pad_token_id).all()
    assert mask[:, -1 if padding_side == "left" else 0].all()  # padding only on the requested side


def test_batch_with_thumbnail_matches_reference(processor_thumbnail, reference_processor_thumbnail) -> None:
    batch = [_conversations()["multi-image multi-turn"], _conversations()["system prompt"]]
    ours = processor_thumbnail.apply_chat_template(batch, tokenize=True, return_dict=True)
    expected = reference_processor_thumbnail.apply_chat_template(
        copy.deepcopy(batch),
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs={"padding": True},
    )
    assert_processor_outputs_match(ours, expected, "chat batch thumbnail")


def test_without_image_special_tokens_matches_reference(checkpoint_1_6b) -> None:
    ours = Lfm2VlProcessor.from_pretrained(checkpoint_1_6b, use_image_special_tokens=False)
    reference = make_reference_processor(checkpoint_1_6b)
    reference.use_image_special_tokens = False
    conversation = _conversations()["system prompt"]
    result = ours.apply_chat_template(conversation, tokenize=True, return_dict=True)
    expected = reference.apply_chat_template(
        copy.deepcopy(conversation), tokenize=True, return_dict=True, return_tensors="np"
    )
    assert_processor_outputs_match(result, expected, "no image special tokens")
    assert ours.image_token_id in result["input_ids"]
    assert ours.tokenizer.token_to_id(ours.image_start_token) not in result["input_ids"]


def test_call_with_text_and_nested_images_matches_reference(processor, reference_processor) -> None:
    images = [[synthetic_image(64, 64, seed=1), _photo()], [], [synthetic_image(900, 900, seed=2)]]
    texts = ["<image>first<image>second", "no image here", "third: <image>"]
    expected = reference_processor(images=images, text=texts, return_tensors="np", padding=True)
    assert_processor_outputs_match(processor(images=images, text=texts), expected, "call nested images")


def test_truncation_matches_reference(processor, reference_processor) -> None:
    texts = ["a long prompt about a python and Mathias " * 4, "short"]
    expected = reference_processor(
        text=texts, return_tensors="np", padding=True, truncation=True, max_length=12
    )
    ours = processor(text=texts, max_length=12, truncation=True)
    assert_processor_outputs_match(ours, expected, "truncation")
    assert ours["input_ids"].shape == (2, 12)


def test_decode_matches_reference(processor, reference_processor) -> None:
    import jax.numpy as jnp

    conversation = _conversations()["text only"] + [
        {"role": "assistant", "content": "Hi, Mathias, it's python."}
    ]
    ids = processor.apply_chat_template([conversation, conversation[:1]], tokenize=True)  # padded batch
    for skip in (True, False):
        expected = reference_processor.batch_decode(ids, skip_special_tokens=skip)
        assert processor.batch_decode(ids, skip_special_tokens=skip) == expected
        assert processor.batch_decode(jnp.asarray(ids), skip_special_tokens=skip) == expected
        assert processor.batch_decode(ids.tolist(), skip_special_tokens=skip) == expected
        assert processor.decode(ids[1], skip_special_tokens=skip) == reference_processor.decode(
            ids[1], skip_special_tokens=skip
        )


def test_attributes_come_from_the_checkpoint_files(processor, checkpoint_450m: Path) -> None:
    config = json.loads((checkpoint_450m / "tokenizer_config.json").read_text())
    ids = {spec["content"]: int(i) for i, spec in config["added_tokens_decoder"].items()}
    assert processor.pad_token_id == ids[config["pad_token"]]
    assert processor.eos_token_id == ids[config["eos_token"]]
    assert processor.bos_token_id == ids[config["bos_token"]]
    assert processor.image_token_id == ids[config["image_token"]]
    assert processor.padding_side == "right"  # not in the files: transformers' default
    assert processor.image_processor.use_thumbnail is False
    result = processor(images=[synthetic_image(1024, 1024)], text="<image>")  # a 2x2 grid
    tokens = [processor.tokenizer.id_to_token(i) for i in result["input_ids"][0]]
    assert tokens[0] == config["image_start_token"] and tokens[-1] == config["image_end_token"]
    assert [t for t in tokens if t.startswith("<|img_row")] == [
        f"<|img_row_{r}_col_{c}|>" for r in (1, 2) for c in (1, 2)
    ]
    assert ids["<|img_row_2_col_2|>"] in result["input_ids"][0]


def test_save_and_reload_round_trip(processor_thumbnail, tmp_path: Path) -> None:
    processor_thumbnail.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (tmp_path / name).is_file(), name
    reloaded = Lfm2VlProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.to_dict() == processor_thumbnail.image_processor.to_dict()
    conversation = _conversations()["system prompt"]
    before = processor_thumbnail.apply_chat_template(conversation, tokenize=True, return_dict=True)
    after = reloaded.apply_chat_template(conversation, tokenize=True, return_dict=True)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_save_keeps_overrides(checkpoint_450m: Path, tmp_path: Path) -> None:
    Lfm2VlProcessor.from_pretrained(checkpoint_450m, use_thumbnail=True, resample=3).save_pretrained(tmp_path)
    reloaded = Lfm2VlProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.use_thumbnail and reloaded.image_processor.resample == 3
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["resample"] == 3


def test_hub_id_offline_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match=r"Hugging Face Hub.*local directory"):
        Lfm2VlProcessor.from_pretrained("LiquidAI/LFM2-VL-450M")


# -- bad input -------------------------------------------------------------------------------------------


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "processor_config.json").write_text("{}")
    with pytest.raises(ProcessorError, match="has no tokenizer.json"):
        Lfm2VlProcessor.from_pretrained(tmp_path)


def test_unknown_setting(checkpoint_450m: Path) -> None:
    with pytest.raises(ProcessorError, match="unknown processor settings: tile_sise"):
        Lfm2VlProcessor.from_pretrained(checkpoint_450m, tile_sise=256)


@pytest.mark.parametrize(
    ("images", "texts", "message"),
    [
        ([[TINY]], ["two <image> <image>"], r"text 0 has 2 <image> placeholder\(s\) but 1 image\(s\)"),
        ([TINY, TINY], "one <image>", r"text 0 has 1 <image> placeholder\(s\) but 2 image\(s\)"),
        ([[TINY], []], ["<image>", "<image>"], r"text 1 has 1 <image> placeholder\(s\) but 0 image\(s\)"),
        (None, "<image>", r"text 0 has 1 <image> placeholder\(s\) but 0 image\(s\)"),
        ([TINY], ["<image>", "x"], r"flat list of 1 images for 2 texts"),
    ],
)
def test_images_and_placeholders_disagree(processor, images, texts, message: str) -> None:
    with pytest.raises(ProcessorError, match=message):
        processor(images=images, text=texts)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"type": "video", "video": "clip.mp4"}, r"message 1, content block 1: unknown content type 'video'"),
        ({"text": "no type"}, r"message 1, content block 1 must be a dict with a 'type'"),
        (
            {"type": "image"},
            r"message 1, content block 1: an image block needs exactly one of image, url, path",
        ),
        ({"type": "text", "text": 3}, r"message 1, content block 1: a text block needs a 'text' string"),
        ({"type": "image", "url": "https://x.org/cat.png"}, r"message 1, content block 1: remote image URLs"),
        (
            {"type": "image", "path": "/nonexistent/cat.png"},
            r"message 1, content block 1 \('/nonexistent/cat",
        ),
    ],
)
def test_bad_content_blocks(processor, block: dict, message: str) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, block]},
    ]
    snapshot = copy.deepcopy(conversation)
    with pytest.raises(ProcessorError, match=r"conversation 0, " + message):
        processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert conversation == snapshot  # the caller's messages are left untouched


def test_message_without_role(processor) -> None:
    with pytest.raises(ProcessorError, match=r"conversation 1, message 0 has no 'role'"):
        processor.apply_chat_template([[{"role": "user", "content": "hi"}], [{"content": "hi"}]])


def test_prompt_over_max_length(processor) -> None:
    conversation = _conversations()["single image"]
    with pytest.raises(
        ProcessorError, match=r"text 0 is \d+ tokens long, over max_length=100.*truncation=True"
    ):
        processor.apply_chat_template(conversation, tokenize=True, max_length=100)
    with pytest.raises(ProcessorError, match=r"truncating to max_length=100 would cut image tokens"):
        processor.apply_chat_template(conversation, tokenize=True, max_length=100, truncation=True)


def test_max_length_from_the_files(checkpoint_450m: Path, tmp_path: Path) -> None:
    processor = Lfm2VlProcessor.from_pretrained(checkpoint_450m)
    assert processor.max_length is None  # model_max_length 1e30 in the files means unlimited
    processor.tokenizer_config["model_max_length"] = 8
    processor.save_pretrained(tmp_path)
    with pytest.raises(ProcessorError, match="over max_length=8"):
        Lfm2VlProcessor.from_pretrained(tmp_path)(text="a sentence that is longer than eight tokens for sure")
