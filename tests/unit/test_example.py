"""`lfm2vl example DIR`: a loadable checkpoint of the released shapes with the released processor files,
special tokens at the ids the checkpoint states, and a directory it refuses unless it wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from processor_fixtures import reference_dir
from tiny_checkpoints import snapshot

from lfm2vl_jax.checkpoint.example import (
    FAMILIES,
    MARKER,
    PROCESSOR_FILES,
    example_config,
    released_files,
)
from lfm2vl_jax.cli import main
from lfm2vl_jax.config import load_config, read_config_json
from lfm2vl_jax.processing.processor import Lfm2VlProcessor


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("example") / "ex"
    assert main(["example", str(directory), "--quiet"]) == 0
    return directory


def test_tiny_example_is_a_checkpoint_the_processor_and_model_load(example: Path, capsys):
    from lfm2vl_jax import Lfm2VlForConditionalGeneration

    model = Lfm2VlForConditionalGeneration.from_pretrained(example / "model", progress=False)
    processor = Lfm2VlProcessor.from_pretrained(example / "model")
    processor.check_model(model.config.image_token_id)
    released = load_config(reference_dir("lfm2-vl-450m"))
    assert model.config.text.vocab_size == released.text.vocab_size
    assert model.config.image_token_id == released.image_token_id
    assert model.config.vision.patch_size == released.vision.patch_size
    # every added token of the released tokenizer_config.json at its id
    listed = json.loads((reference_dir("lfm2-vl-450m") / "tokenizer_config.json").read_text())
    for token_id, spec in listed["added_tokens_decoder"].items():
        assert processor.tokenizer.token_to_id(spec["content"]) == int(token_id), spec["content"]
    records = [json.loads(line) for line in (example / "data" / "train.jsonl").read_text().splitlines()]
    images = {
        block["image"] for r in records for m in r["messages"] for block in m["content"] if "image" in block
    }
    assert images and all((example / "data" / image).is_file() for image in images)
    for name in PROCESSOR_FILES:
        assert (example / "model" / name).read_bytes() == (reference_dir() / name).read_bytes(), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["450m", "1.6b"])
def test_released_sizes_have_the_reference_shapes(family: str, size: str):
    reference = reference_dir(f"{family}-{size}")
    config = example_config(family, size)
    assert config == load_config(reference)
    assert read_config_json(released_files(family, size)["config.json"]) == read_config_json(reference)


def test_refuses_a_directory_it_did_not_write(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["example", str(tmp_path), "--quiet"]) == 2
    assert "not written by `lfm2vl example`" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert main(["example", str(tmp_path / "notes.txt"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_rebuilds_its_own_directory_only_with_overwrite_keeping_other_files(example: Path, capsys):
    before = snapshot(example)
    assert main(["example", str(example), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(example) == before
    (example / "run").mkdir()
    (example / "run" / "metrics.jsonl").write_text("{}\n")
    assert main(["example", str(example), "--quiet", "--overwrite"]) == 0
    after = snapshot(example)
    assert after.pop("run") == "dir" and after.pop("run/metrics.jsonl")
    assert after == before  # same seed, same bytes
    assert json.loads((example / MARKER).read_text())["size"] == "tiny"
