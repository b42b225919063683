"""The `lfm2vl generate` command on a random-weight checkpoint directory with the stand-in tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processor_fixtures import image_path, make_checkpoint_dir
from reference_models import build_reference, tiny_config

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor
from lfm2vl_jax.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Processor files of the released 450M, a tiny model with the real vocabulary and patch size."""
    directory = make_checkpoint_dir(tmp_path_factory.mktemp("cli"), "lfm2-vl-450m")
    config = tiny_config(text={"vocab_size": 65536}, vision={"patch_size": 16, "num_patches": 256})
    build_reference(config, seed=3).save_pretrained(directory)
    return directory


def test_generate_streams_the_models_answer(checkpoint, capsys):
    image = image_path("Minduka_Present_Blue_Pack.png")
    argv = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", "What is this?"]
    assert main([*argv, "--max-new-tokens", "12", "--dtype", "float32", "--repetition-penalty", "2"]) == 0
    printed = capsys.readouterr().out

    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": "What is this?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    model = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False)
    tokens = model.generate(**inputs, max_new_tokens=12, repetition_penalty=2.0)
    expected = processor.decode(tokens[0], skip_special_tokens=True)
    assert printed == expected + "\n"
    assert len(np.unique(tokens)) > 3


def test_clear_errors_for_missing_model_and_unreadable_image(checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["generate", "--model", str(checkpoint), "--image", str(broken), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and err.count("\n") == 1

    assert (
        main(["generate", "--model", str(checkpoint), "--prompt", "hi", "--do-sample", "--top-p", "2"]) == 2
    )
    assert "--top-p must be a number in (0, 1]" in capsys.readouterr().err  # the flag, before the model loads


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("lfm2vl")  # pip installs entry points beside the interpreter
    out = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--image" in out.stdout


def test_convert_subcommands_round_trip(checkpoint, tmp_path):
    from safetensors.numpy import load_file

    assert main(["convert", "hf-to-orbax", str(checkpoint), str(tmp_path / "orbax"), "--quiet"]) == 0
    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--quiet"]) == 0
    original, exported = (
        load_file(checkpoint / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert sorted(original) == sorted(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
