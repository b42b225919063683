"""`lfm2vl generate --system --tools` on an LFM2.5-VL checkpoint (random tiny weights, the released
processor files, stand-in tokenizer), and `parse_tool_calls` on what the chat template renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from processor_fixtures import WEATHER_TOOLS, image_path, make_checkpoint_dir
from reference_models import build_reference, tiny_config

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor, ToolCallError, parse_tool_calls
from lfm2vl_jax.cli import main

CALLS = [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
    {
        "type": "function",
        "function": {
            "name": "search",
            "arguments": {
                "query": "café 東京",
                "filters": {"open": True, "rating": None},
                "tags": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping", "arguments": {"loud": False, "x": -1.5}}},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = make_checkpoint_dir(tmp_path_factory.mktemp("cli-tools"), "lfm2.5-vl-450m")
    config = tiny_config(text={"vocab_size": 65536}, vision={"patch_size": 16, "num_patches": 256})
    build_reference(config, seed=5).save_pretrained(directory)
    return directory


def test_tool_calls_rendered_by_the_template_parse_back(checkpoint):
    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    conversation = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": CALLS[:2]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "tool_calls": CALLS[2:], "content": "Done."},
    ]
    rendered = processor.apply_chat_template(conversation, tools=WEATHER_TOOLS)
    assert rendered.count("<|tool_call_start|>") == 2
    assert parse_tool_calls(rendered) == CALLS
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('<|tool_call_start|>[f("x")]<|tool_call_end|>', r"tool call '\[f\(\"x\"\)\]': f has positional"),
        ("<|tool_call_start|>[f(a=open(1))]<|tool_call_end|>", r"argument 'open\(1\)' is not a literal"),
        ("<|tool_call_start|>[f(a=1)", r"<\|tool_call_start\|> without <\|tool_call_end\|>"),
        ("<|tool_call_start|>[1 +]<|tool_call_end|>", r"tool call '\[1 \+\]' is not a list of calls"),
        ("<|tool_call_start|>[3]<|tool_call_end|>", r"'3' is not a call of a named function"),
    ],
)
def test_malformed_tool_calls_name_the_text(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_tool_calls(text)


def test_generate_with_system_and_tools_renders_them(checkpoint, tmp_path, capsys):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(WEATHER_TOOLS))
    image = image_path("Minduka_Present_Blue_Pack.png")
    argv = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", "Weather?"]
    argv += [
        "--system",
        "Be brief.",
        "--tools",
        str(tools_file),
        "--max-new-tokens",
        "8",
        "--dtype",
        "float32",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "Weather?"}],
        },
    ]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, tools=WEATHER_TOOLS
    )
    prompt = processor.decode(inputs["input_ids"][0])
    assert "List of tools: " in prompt and "get_weather" in prompt and "Be brief." in prompt
    model = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False)
    tokens = np.asarray(model.generate(**inputs, max_new_tokens=8))
    assert printed == processor.decode(tokens[0], skip_special_tokens=True) + "\n"


def test_generate_prints_the_answers_tool_calls(checkpoint, tmp_path, capsys, monkeypatch):
    """The answer (here a scripted one) holds two tool calls: printed as text, then one JSON line each."""
    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    answer = '<|tool_call_start|>[get_weather(city="Paris", days=3)]<|tool_call_end|><|im_end|>'
    scripted = processor.tokenizer.encode(answer, add_special_tokens=False).ids
    monkeypatch.setattr(
        Lfm2VlForConditionalGeneration, "stream", lambda *args, **kwargs: (np.array([i]) for i in scripted)
    )
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(WEATHER_TOOLS))
    assert (
        main(["generate", "--model", str(checkpoint), "--prompt", "Weather?", "--tools", str(tools_file)])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines == ['[get_weather(city="Paris", days=3)]', "tool call: " + json.dumps(CALLS[0]["function"])]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("[{", "not valid JSON (line 1"),
        ('{"name": "f"}', "must hold a JSON list of tool objects"),
    ],
)
def test_bad_tools_file_is_one_error_line(checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    assert main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--tools", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--tools {path}: {message}" in err and err.count("\n") == 1
