"""`lfm2vl COMMAND --help` tells the truth: every option's rendered help states the default the parser (or,
for `train`, `SFTConfig`) holds, or says in words what applies; every subcommand takes --debug; option
values checked before any model is read, the error naming the flag."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from lfm2vl_jax.cli import build_parser, main
from lfm2vl_jax.training.config import SFTConfig


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub, f"{prefix}{name} ")
                found.update(nested or {f"{prefix}{name}": sub})
    return found


COMMANDS = subcommands(build_parser())


def rendered_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The rendered help of each option, by its first flag, whitespace collapsed."""
    text = parser.format_help().split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + text)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}


def shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_every_subcommand_is_covered():
    assert set(COMMANDS) == {
        "generate",
        "batch",
        "batch-merge",
        "convert hf-to-orbax",
        "convert orbax-to-hf",
        "train",
        "serve",
        "example",
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_states_each_default_as_the_parser_holds_it(command: str):
    parser = COMMANDS[command]
    rendered = rendered_options(parser)
    config_defaults = {
        f.name: f.default for f in dataclasses.fields(SFTConfig) if f.default is not dataclasses.MISSING
    }
    assert "--debug" in rendered, command
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "debug"):
            continue
        text = rendered[action.option_strings[0]]
        default = config_defaults.get(action.dest) if command == "train" else action.default
        stated = re.findall(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)", text)
        is_flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if default is None or default is False or default == []:
            if not is_flag:
                assert "default" in text or "(required)" in text or action.required, (command, text)
        else:
            assert f"(default: {shown(default)})" in text, (command, text, default)
        if default is not None and default is not False and default != []:
            assert all(value == shown(default) for value in stated), (command, text)


def test_scan_layers_help_says_what_the_code_does():
    for command in ("generate", "batch"):
        text = rendered_options(COMMANDS[command])["--scan-layers"]
        assert "default: off" in text and "accelerators" not in text, text
    assert "(default: True)" in rendered_options(COMMANDS["train"])["--scan-layers"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
            "--max-new-tokens must be a positive integer",
        ),
        (["generate", "--prompt", "hi", "--temperature", "0"], "--temperature must be"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p must be a number in (0, 1]"),
        (["generate", "--prompt", "hi", "--min-p", "nan"], "--min-p must be"),
        (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k must be an integer >= 0"),
        (
            ["batch", "--input", "in.jsonl", "--output", "out.jsonl", "--repetition-penalty", "0"],
            "--repetition-penalty",
        ),
        (
            ["batch", "--input", "in.jsonl", "--output", "out.jsonl", "--max-new-tokens", "-3"],
            "--max-new-tokens",
        ),
    ],
)
def test_option_values_are_refused_by_flag_before_the_model_loads(arguments, message, tmp_path, capsys):
    # the model does not exist: an error about it would mean the options were checked after loading
    status = main([arguments[0], "--model", str(tmp_path / "no-such-model"), *arguments[1:]])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "no-such-model" not in err, err
