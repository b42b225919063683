"""`lfm2vl batch` end to end on a tiny random checkpoint with the stand-in tokenizer: result lines, error
lines for bad requests, totals, exit status, --resume after a run killed in the middle of a line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import write_chat_checkpoint

from lfm2vl_jax import Lfm2VlForConditionalGeneration, Lfm2VlProcessor
from lfm2vl_jax.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The released 450M processor files and a tiny model with the real vocabulary and patch size."""
    return write_chat_checkpoint(tmp_path_factory.mktemp("batch-cli"))


def user(*content) -> list:
    blocks = [
        {"type": "image", "path": c} if c.endswith(".png") else {"type": "text", "text": c} for c in content
    ]
    return [{"role": "user", "content": blocks}]


@pytest.fixture()
def requests_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"id": "text", "messages": user("Describe a cat."), "max_new_tokens": 5},
        {"id": "image", "messages": user("a.png", "What is this?"), "max_new_tokens": 6},
        {"id": "broken", "messages": user("broken.png", "And this?")},
        "{not json",
        {"id": 7, "messages": user("Tell me more."), "do_sample": True, "temperature": 0.7, "seed": 3},
        {"id": "text", "messages": user("The same id again.")},
        {"id": "long", "messages": user("word " * 200)},
        {"id": "typo", "messages": user("hi"), "max_tokens": 3},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_lines(path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_batch_writes_a_line_per_request_and_resumes_after_a_kill(
    checkpoint, requests_file, tmp_path, capsys
):
    output = tmp_path / "results.jsonl"
    argv = ["batch", "--model", str(checkpoint), "--input", str(requests_file), "--output", str(output)]
    argv += ["--slots", "2", "--max-new-tokens", "4", "--max-length", "128", "--quiet"]
    assert main(argv) == 1  # some requests failed
    totals = capsys.readouterr().err
    assert "3 done" in totals and "5 failed" in totals, totals  # text, image, 7

    results = read_lines(output)
    by_id = {}
    for result in results:
        by_id.setdefault(result["id"], []).append(result)
    ids = ["text", "image", "broken", "<line 4>", 7, "<line 6>", "long", "typo"]
    assert sorted(map(str, by_id)) == sorted(map(str, ids)) and len(results) == len(ids)
    errors = {r["id"]: r["error"] for r in results if r["finish_reason"] == "error"}
    assert "broken.png" in errors["broken"] and "invalid JSON" in errors["<line 4>"]
    assert "duplicate id 'text'" in errors["<line 6>"] and by_id["text"][0]["completion_tokens"] == 5
    assert "max_length=128" in errors["long"] and "max_tokens" in errors["typo"]
    assert [r["completion_tokens"] for r in by_id["image"]] == [6]

    # The image request's tokens are what `generate` gives it alone; the text is their decoding.
    processor = Lfm2VlProcessor.from_pretrained(checkpoint)
    model = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint, progress=False)
    image_request = json.loads(requests_file.read_text().splitlines()[1])
    messages = [
        {
            **m,
            "content": [{**b, "path": str(tmp_path / b["path"])} if "path" in b else b for b in m["content"]],
        }
        for m in image_request["messages"]
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = model.generate(**inputs, max_new_tokens=6)[0].tolist()
    (image,) = by_id["image"]
    assert image["token_ids"] == expected and image["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert image["text"] == processor.decode(expected, skip_special_tokens=True)

    # A killed run: two whole lines, then a torn one. --resume cuts it off and runs the rest, once each.
    lines = output.read_bytes().splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:2]) + lines[2][:15])
    assert main(argv) == 2  # an existing output is not overwritten without --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 1
    assert "2 skipped" in capsys.readouterr().err
    resumed = read_lines(output)
    assert sorted(json.dumps(r, sort_keys=True) for r in resumed) == sorted(
        json.dumps(r, sort_keys=True) for r in results
    )
    assert main([*argv, "--resume"]) == 0  # nothing left to do, nothing failed this time
    assert "0 done" in capsys.readouterr().err and len(read_lines(output)) == len(results)
