"""Every released checkpoint layout against transformers (tests/checkpoint_layouts.py): config.json parses
to the model transformers builds (parameter names, shapes and counts at the real shapes, via
`jax.eval_shape` and torch's meta device); the processor's outputs (ids, masks, pixels, assistant masks)
equal transformers' on the layout's files; logits at small widths (the layout's vocabulary, ids, layer
pattern and projector) within 1e-5 (relative).

Logit tolerance as in test_parity: max|ours - reference| / max|reference| <= 1e-5, float32 on both sides
(summation order and transcendental rounding only; a real bug moves logits by O(1))."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
import torch
from checkpoint_layouts import LAYOUTS, hf_config, make_small_checkpoint
from processor_fixtures import (
    WEATHER_TOOLS,
    assert_processor_outputs_match,
    make_checkpoint_dir,
    synthetic_image,
)
from training_fixtures import image_conversations

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor
from lfm2vl_jax.checkpoint.hf import tensor_map
from lfm2vl_jax.config import config_from_dict
from lfm2vl_jax.nn.params import init_params
from lfm2vl_jax.training.data import LOSS_FROM_TEMPLATE, read_conversations

LOGIT_RTOL = 1e-5


def transformers_processor(directory, processor_files: str):
    """transformers' processor for a layout's files: its own loader where it can read them (LFM2.5-VL),
    else built from the files' values (the LFM2-VL-450M files name a remote-code image processor)."""
    from processor_fixtures import make_reference_processor
    from transformers import AutoProcessor

    if processor_files.startswith("lfm2.5"):
        return AutoProcessor.from_pretrained(str(directory))
    return make_reference_processor(directory)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_config_parses_to_the_model_transformers_builds(name):
    """At the real shapes: every parameter name and shape of transformers' model is ours, none more."""
    from transformers import Lfm2VlForConditionalGeneration as HfModel

    raw = LAYOUTS[name][0]
    config = config_from_dict(raw, name)
    with torch.device("meta"):
        reference = HfModel(hf_config(raw))
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    if reference.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: the embedding, not a tensor of its own
    ours = {key: mapping.hf_shape for key, mapping in tensor_map(config).items()}
    assert ours == expected
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert count == sum(p.numel() for p in reference.parameters())
    assert config.image_token_id == reference.config.image_token_id
    assert config.projector_use_layernorm == reference.config.projector_use_layernorm
    assert list(config.text.layer_types) == list(reference.config.text_config.layer_types)
    assert config.text.vocab_size == reference.config.text_config.vocab_size


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def small(request, tmp_path_factory):
    directory, reference = make_small_checkpoint(tmp_path_factory.mktemp("layout"), request.param)
    return request.param, directory, reference


def test_small_widths_logits_and_processor_match_transformers(small):
    name, directory, reference = small
    processor = Lfm2VlProcessor.from_pretrained(directory)
    expected_processor = transformers_processor(directory, LAYOUTS[name][1])
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": synthetic_image(40, 70, seed=1)},  # split into tiles
                {"type": "text", "text": "Describe this image in detail."},
            ],
        },
        {"role": "assistant", "content": "A gift box wrapped in blue paper."},
        {"role": "user", "content": [{"type": "image", "image": synthetic_image(12, 10, seed=2)}]},
    ]
    options = dict(tokenize=True, return_dict=True, add_generation_prompt=True)
    inputs = processor.apply_chat_template(conversation, **options)
    expected = expected_processor.apply_chat_template(conversation, return_tensors="np", **options)
    assert_processor_outputs_match(inputs, expected, f"{name} small")
    assert (inputs["input_ids"] == processor.image_token_id).sum() > 8

    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    assert model.config.image_token_id == processor.image_token_id
    torch_inputs = {key: torch.from_numpy(np.asarray(value)) for key, value in expected.items()}
    torch_inputs["pixel_attention_mask"] = torch_inputs["pixel_attention_mask"].bool()
    with torch.no_grad():
        reference_logits = reference(**torch_inputs).logits.numpy()
    logits = np.asarray(model(**inputs).logits)
    assert logits.shape == reference_logits.shape
    error = np.abs(logits - reference_logits).max() / np.abs(reference_logits).max()
    print(f"{name}: relative logit error {error:.2e}")
    assert error <= LOGIT_RTOL


LFM25_LAYOUTS = ["LFM2.5-VL-450M", "LFM2.5-VL-3B-like"]


@pytest.fixture(scope="module", params=LFM25_LAYOUTS)
def lfm25(request, tmp_path_factory):
    """LFM2.5-VL processor files (the `{% generation %}` template) with the stand-in tokenizer; ours and
    transformers' own loader on them."""
    three_b_like = LAYOUTS[request.param][2]
    directory = make_checkpoint_dir(tmp_path_factory.mktemp("lfm25"), "lfm2.5-vl-450m", three_b_like)
    return Lfm2VlProcessor.from_pretrained(directory), transformers_processor(directory, "lfm2.5")


def _conversations() -> dict[str, list]:
    photo = synthetic_image(300, 500, seed=3)
    small = synthetic_image(60, 80, seed=4)
    return {
        "image prompt": [
            {
                "role": "user",
                "content": [{"type": "image", "image": photo}, {"type": "text", "text": "What?"}],
            }
        ],
        "system multi-turn": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "A pattern, Mathias."},
            {"role": "user", "content": "And in python?"},
            {"role": "assistant", "content": [{"type": "text", "text": "def main(): return 0"}]},
        ],
        "thinking": [
            {"role": "user", "content": "Count."},
            {"role": "assistant", "content": "Three.", "reasoning_content": "one two three"},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "<think>again</think>Three.", "thinking": "still three"},
        ],
        "tool calls": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
        "assistant image": [
            {"role": "user", "content": "Draw."},
            {
                "role": "assistant",
                "content": [{"type": "image", "image": small}, {"type": "text", "text": "x"}],
            },
        ],
    }


@pytest.mark.parametrize("case", list(_conversations()))
@pytest.mark.parametrize("keywords", [{}, {"tools": WEATHER_TOOLS}, {"keep_past_thinking": True}])
def test_chat_template_and_assistant_masks_match_transformers(lfm25, case, keywords):
    ours, reference = lfm25
    conversation = _conversations()[case]
    prompt = ours.apply_chat_template(conversation, **keywords)
    assert prompt == reference.apply_chat_template(conversation, **keywords)
    options = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **keywords)
    result = ours.apply_chat_template(conversation, **options)
    expected = reference.apply_chat_template(conversation, return_tensors="np", **options)
    np.testing.assert_array_equal(result["assistant_masks"], expected["assistant_masks"])
    assert result["assistant_masks"].dtype == np.int64
    assert_processor_outputs_match(result, expected, f"{case} {sorted(keywords)}")
    has_assistant = any(m["role"] == "assistant" for m in conversation)
    assert bool(result["assistant_masks"].any()) == has_assistant


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_assistant_masks_of_a_batch_match_transformers(lfm25, padding_side):
    ours, reference = lfm25
    batch = list(_conversations().values())
    options = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True, tools=WEATHER_TOOLS)
    result = ours.apply_chat_template(batch, padding_side=padding_side, **options)
    expected = reference.apply_chat_template(
        batch,
        return_tensors="np",
        processor_kwargs={"padding": True, "padding_side": padding_side},
        **options,
    )
    assert_processor_outputs_match(result, expected, f"batch {padding_side}")
    np.testing.assert_array_equal(result["assistant_masks"], expected["assistant_masks"])


def test_template_keywords_reach_the_template_as_in_transformers(lfm25):
    ours, reference = lfm25
    conversation = _conversations()["system multi-turn"]
    continued = [*conversation[:-1], {"role": "assistant", "content": "def main("}]
    options = dict(continue_final_message=True)
    assert ours.apply_chat_template(continued, **options) == reference.apply_chat_template(
        continued, **options
    )
    assert ours.apply_chat_template(continued, **options).endswith("def main(")
    custom = (
        "{{ bos_token }}{{ greeting }}{% for m in messages %}{{ m.role }}{% endfor %}{{ documents | tojson }}"
    )
    documents = [{"title": "a", "text": "b"}]
    for options in ({"greeting": "hello"}, {"greeting": "hi", "documents": documents}):
        assert ours.apply_chat_template(
            conversation, chat_template=custom, **options
        ) == reference.apply_chat_template(conversation, chat_template=custom, **options)


def test_template_without_generation_markers_gives_a_zero_mask_as_transformers(lfm25):
    ours, reference = lfm25
    conversation = _conversations()["system multi-turn"]
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    options = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template)
    conversation = [{"role": m["role"], "content": "text"} for m in conversation]
    with pytest.warns(UserWarning, match=r"no \{% generation %\} blocks"):
        result = ours.apply_chat_template(conversation, **options)
    expected = reference.apply_chat_template(conversation, return_tensors="np", **options)
    np.testing.assert_array_equal(result["assistant_masks"], expected["assistant_masks"])
    assert not result["assistant_masks"].any()


def test_template_errors_name_what_is_wrong(lfm25, tmp_path):
    ours, _ = lfm25
    conversation = _conversations()["system multi-turn"]
    with pytest.raises(Exception, match="continue_final_message"):
        ours.apply_chat_template(conversation, return_assistant_tokens_mask=True, continue_final_message=True)
    with pytest.raises(Exception, match="continue_final_message and add_generation_prompt"):
        ours.apply_chat_template(conversation, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(Exception, match=r"conversation 0: chat template error: .*underscore-prefixed"):
        ours.apply_chat_template(
            conversation, chat_template="{% set ns = namespace(_x=1) %}"
        )  # as transformers
    with pytest.raises(Exception, match=r"conversation 0: chat template error: no tools allowed"):
        ours.apply_chat_template(conversation, chat_template="{{ raise_exception('no tools allowed') }}")
    with pytest.raises(
        Exception, match=r"chat template the chat_template argument, line 3: does not compile"
    ):
        ours.apply_chat_template(conversation, chat_template="a\nb\n{% if x %}")
    ours.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}\n{% generation %}\n{% endfor %}\n")
    with pytest.raises(Exception, match=rf"chat template {tmp_path}/chat_template.jinja, line 3: does not"):
        Lfm2VlProcessor.from_pretrained(tmp_path)


def test_tokenizer_config_without_added_tokens_decoder_takes_ids_from_tokenizer_json(lfm25):
    ours, reference = lfm25
    assert "added_tokens_decoder" not in ours.tokenizer_config  # transformers 5's file lists no ids
    for name in ("image_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
        expected = getattr(reference, name, None)
        if expected is None:
            expected = getattr(reference.tokenizer, name)
        assert getattr(ours, name) == expected, name


def test_training_loss_mask_is_transformers_assistant_mask(lfm25, tmp_path):
    """`lfm2vl train` on an LFM2.5-VL template takes the loss tokens from its generation blocks: the ids and
    the loss mask of every conversation equal transformers' input_ids and assistant_masks."""
    ours, reference = lfm25
    path = image_conversations(tmp_path, 4)  # system turns, second turns, one or two images
    dataset = read_conversations(path, ours, 4096)
    assert dataset.loss_rule == LOSS_FROM_TEMPLATE
    for example, line in zip(dataset.examples, path.read_text().splitlines(), strict=True):
        messages = json.loads(line)["messages"]
        for message in messages:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block["type"] == "image":
                    block["image"] = str(tmp_path / block["image"])
        expected = reference.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="np"
        )
        np.testing.assert_array_equal(example.input_ids, expected["input_ids"][0])
        np.testing.assert_array_equal(example.loss_mask, expected["assistant_masks"][0] == 1)
        assert example.loss_mask.any()
