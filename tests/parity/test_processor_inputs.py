"""Inputs transformers' LFM2-VL processor takes, against the live reference on the same files: prompts
rendered with source-less image entries, channels-first arrays, torch tensors and jax arrays as images,
and per-call image options (keywords, `images_kwargs`, `apply_chat_template(processor_kwargs=...)`).

Pixel tolerance as in test_image_processing (one uint8 step, >= 99.9% exactly equal)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from processor_fixtures import assert_processor_outputs_match, synthetic_image

from lfm2vl_jax.processing.image_processor import ProcessorError

PROMPT = "<image>What is this?"
LARGE = synthetic_image(900, 900, seed=11)  # split into a 2x2 grid by default
WIDE = synthetic_image(120, 200, seed=12)


def _image_conversation(image=None) -> list[dict]:
    block = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [block, {"type": "text", "text": "Describe."}]},
    ]


def test_sourceless_image_entries_render_as_placeholders(processor, reference_processor) -> None:
    conversation = _image_conversation()
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == reference_processor.apply_chat_template(
        copy.deepcopy(conversation), add_generation_prompt=True
    )
    assert prompt.count(processor.image_token) == 1
    # the common two-step use: render, then process the text with the images
    expected = reference_processor(images=[WIDE], text=prompt, return_tensors="np")
    assert_processor_outputs_match(processor(images=[WIDE], text=prompt), expected, "render then process")


def test_sourceless_image_entry_is_an_error_when_tokenizing(processor) -> None:
    with pytest.raises(
        ProcessorError, match=r"conversation 0, message 1, content block 0: an image block needs exactly one"
    ):
        processor.apply_chat_template(_image_conversation(), tokenize=True)
    # images given with the processor's options take the entries' place, as in transformers
    ours = processor.apply_chat_template(
        _image_conversation(), tokenize=True, return_dict=True, processor_kwargs={"images": [WIDE]}
    )
    with_source = processor.apply_chat_template(_image_conversation(WIDE), tokenize=True, return_dict=True)
    for key, value in with_source.items():
        np.testing.assert_array_equal(ours[key], value)


@pytest.mark.parametrize("channels", [3, 1, 4])
def test_channels_first_arrays_match_reference(channels: int, processor, reference_processor) -> None:
    rgb = synthetic_image(90, 150, seed=13)
    alpha = np.linspace(0, 255, 150, dtype=np.uint8)[None, :].repeat(90, axis=0)
    array = {3: rgb, 1: rgb[:, :, :1], 4: np.dstack([rgb, alpha])}[channels].transpose(2, 0, 1)
    expected = reference_processor(images=[array], text=PROMPT, return_tensors="np")
    ours = processor(images=[array], text=PROMPT)
    assert_processor_outputs_match(ours, expected, f"channels-first ({channels}, H, W)")
    channels_last = processor(images=[np.ascontiguousarray(array.transpose(1, 2, 0))], text=PROMPT)
    np.testing.assert_array_equal(ours["pixel_values"], channels_last["pixel_values"])


def test_ambiguous_channel_axis_is_read_as_transformers_reads_it(processor, reference_processor) -> None:
    array = synthetic_image(3, 60, seed=14)[:, :3]  # (3, 3, 3): channels-first for transformers
    expected = reference_processor(images=[array], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(processor(images=[array], text=PROMPT), expected, "ambiguous (3, 3, 3)")
    forced = processor(images=[array], text=PROMPT, input_data_format="channels_last")
    np.testing.assert_array_equal(
        forced["pixel_values"], processor(images=[array.transpose(2, 0, 1)], text=PROMPT)["pixel_values"]
    )


def test_torch_tensor_matches_reference(processor, reference_processor) -> None:
    import torch

    tensor = torch.from_numpy(LARGE).permute(2, 0, 1).contiguous()  # (3, H, W) uint8, as torchvision reads
    expected = reference_processor(images=[tensor], text=PROMPT, return_tensors="np")
    assert_processor_outputs_match(processor(images=[tensor], text=PROMPT), expected, "torch (3, H, W)")
    conversation = _image_conversation(tensor)
    expected = reference_processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="np"
    )
    ours = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert_processor_outputs_match(ours, expected, "torch tensor in a conversation")


def test_jax_array_is_an_image(processor) -> None:
    import jax.numpy as jnp

    expected = processor(images=[WIDE], text=PROMPT)
    for image in (jnp.asarray(WIDE), jnp.asarray(WIDE.transpose(2, 0, 1))):
        result = processor(images=[image], text=PROMPT)
        for key, value in expected.items():
            np.testing.assert_array_equal(result[key], value)


OPTION_CASES = {
    "no splitting, fewer tokens": {"do_image_splitting": False, "max_image_tokens": 128},
    "token budget": {"min_image_tokens": 32, "max_image_tokens": 64},
    "thumbnail on": {"use_thumbnail": True},
    "few tiles": {"min_tiles": 2, "max_tiles": 3},
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_per_call_image_options_match_reference(case: str, processor, reference_processor) -> None:
    options = OPTION_CASES[case]
    images = [[LARGE], [WIDE]]
    texts = [PROMPT, "Small: " + PROMPT]
    settings = processor.image_processor.to_dict()
    expected = reference_processor(images=images, text=texts, return_tensors="np", padding=True, **options)
    ours = processor(images=images, text=texts, **options)
    assert_processor_outputs_match(ours, expected, f"options {case}")
    default = processor(images=images, text=texts)
    assert not np.array_equal(ours["attention_mask"], default["attention_mask"])  # the options changed it
    nested = processor(images=images, text=texts, images_kwargs=options)
    np.testing.assert_array_equal(nested["input_ids"], ours["input_ids"])
    np.testing.assert_array_equal(nested["pixel_values"], ours["pixel_values"])
    assert processor.image_processor.to_dict() == settings  # for this call only


@pytest.mark.parametrize("style", ["flat", "images_kwargs", "keywords"])
def test_chat_template_image_options_match_reference(style: str, processor, reference_processor) -> None:
    options = OPTION_CASES["no splitting, fewer tokens"]
    conversation = _image_conversation(LARGE)
    passed = {
        "flat": {"processor_kwargs": options},
        "images_kwargs": {"processor_kwargs": {"images_kwargs": options}},
        "keywords": options,  # transformers' older way: keywords the template does not read
    }[style]
    expected = reference_processor.apply_chat_template(
        copy.deepcopy(conversation),
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        **copy.deepcopy(passed),  # transformers adds keys to the dicts it is given
    )
    ours = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, **passed)
    assert_processor_outputs_match(ours, expected, f"chat options {style}")
    assert ours["pixel_values"].shape[0] == 1  # one whole image instead of 4 tiles
    # a keyword that is neither read by the template nor a processor option is left alone
    unused = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, enable_thinking=False
    )
    np.testing.assert_array_equal(
        unused["input_ids"], processor.apply_chat_template(conversation, tokenize=True)
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_image_tokens": 0}, r"image option\(s\) \{'max_image_tokens': 0\}: max_image_tokens must be"),
        ({"min_image_tokens": 300}, r"min_image_tokens \(300\) > max_image_tokens \(256\)"),
        ({"min_tiles": 5, "max_tiles": 2}, r"min_tiles \(5\) > max_tiles \(2\)"),
        ({"use_thumbnail": "yes"}, r"use_thumbnail must be true or false"),
        ({"max_image_token": 128}, r"unknown image option\(s\): max_image_token"),
        ({"images_kwargs": {"tile_size": 500}}, r"tile_size \(500\) is not a multiple of encoder_patch_size"),
        ({"input_data_format": "NCHW"}, r"input_data_format must be one of channels_first, channels_last"),
    ],
)
def test_bad_per_call_options(options: dict, message: str, processor) -> None:
    with pytest.raises(ProcessorError, match=message):
        processor(images=[WIDE], text=PROMPT, **options)
    with pytest.raises(ProcessorError, match=message):
        processor.apply_chat_template(_image_conversation(WIDE), tokenize=True, processor_kwargs=options)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 8, 8), np.uint8), r"shape \(2, 8, 8\); expected \(H, W\), channels-last"),
        (np.zeros((3, 8, 8, 1), np.uint8), r"shape \(3, 8, 8, 1\)"),
    ],
)
def test_unusable_arrays(image, message: str, processor) -> None:
    with pytest.raises(ProcessorError, match=message):
        processor(images=[image], text=PROMPT)


def test_tensor_that_numpy_cannot_read(processor) -> None:
    import torch

    tensor = torch.zeros((3, 8, 8), requires_grad=True)
    with pytest.raises(ProcessorError, match=r"image 0 \(Tensor\) cannot be read as a numpy array"):
        processor(images=[tensor], text=PROMPT)
