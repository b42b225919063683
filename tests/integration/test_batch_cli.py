"""`lfm2vl batch` end to end on a tiny random checkpoint with the stand-in tokenizer: result lines, error
lines for bad requests, totals, exit status, --resume after a run killed in the middle of a line."""

from __future__ import annotations

import json
import os

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
    assert main(argv) == 3  # some requests failed
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
    assert main([*argv, "--resume"]) == 3
    assert "2 skipped" in capsys.readouterr().err
    resumed = read_lines(output)
    assert sorted(json.dumps(r, sort_keys=True) for r in resumed) == sorted(
        json.dumps(r, sort_keys=True) for r in results
    )
    assert main([*argv, "--resume"]) == 0  # nothing left to do, nothing failed this time
    assert "0 done" in capsys.readouterr().err and len(read_lines(output)) == len(results)


# Nothing of the user's is touched before every check has passed (issue 25) --------------------------------


def batch_argv(checkpoint, requests, output, *extra) -> list[str]:
    argv = ["batch", "--model", str(checkpoint), "--input", str(requests), "--output", str(output)]
    return [*argv, "--slots", "2", "--max-new-tokens", "3", "--max-length", "128", "--quiet", *extra]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


def test_output_that_is_the_input_is_refused_untouched(checkpoint, requests_file, tmp_path, capsys):
    before = requests_file.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(requests_file)
    os.link(requests_file, tmp_path / "hard.jsonl")
    for output in (requests_file, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        for mode in ("--overwrite", "--resume"):
            assert main(batch_argv(checkpoint, requests_file, output, mode)) == 2
            assert f"--output {output} is the --input file" in one_error(capsys)
    assert requests_file.read_bytes() == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/nonexistent/model"}, "/nonexistent/model"),
        ({"--slots": "0"}, "--slots must be a positive integer, got 0"),
        ({"--workers": "-1"}, "--workers must be a positive integer, got -1"),
        ({"--prefill-batch": "0"}, "--prefill-batch must be"),
        ({"--max-line-bytes": "0"}, "--max-line-bytes must be"),
        ({"--resume": None}, "--resume continues --output and --overwrite replaces it"),
        ({"--input": "/nonexistent.jsonl"}, "--input /nonexistent.jsonl: no such file"),
        ({"--input": "/"}, "--input /: not a regular file"),
        ({"--mesh": "data=x"}, "data=x"),
    ],
)
def test_overwrite_empties_nothing_before_every_check_passed(
    checkpoint, requests_file, tmp_path, capsys, change, message
):
    output = tmp_path / "results.jsonl"
    output.write_text('{"id": "earlier", "finish_reason": "stop"}\n')
    argv = batch_argv(checkpoint, requests_file, output, "--overwrite")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    assert main(argv) == 2
    assert message in one_error(capsys)
    assert output.read_text() == '{"id": "earlier", "finish_reason": "stop"}\n'


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": "q1", "messages": []}\n{"not": "a result"}\n',  # lines of another JSONL file
        b'{"id": 1, "finish_reason": "stop"}\nplain text, no newline at the end',  # a foreign last line
        b"\x00\x01binary",
    ],
    ids=["other-jsonl", "foreign-tail", "binary"],
)
def test_resume_refuses_a_file_that_is_not_a_results_file_unchanged(
    checkpoint, requests_file, tmp_path, capsys, content
):
    output = tmp_path / "notes.jsonl"
    output.write_bytes(content)
    assert main(batch_argv(checkpoint, requests_file, output, "--resume")) == 2
    assert "is not a result line of lfm2vl batch" in one_error(capsys)
    assert output.read_bytes() == content


def test_bad_lines_are_error_records_and_the_rest_runs(checkpoint, tmp_path, capsys):
    good = {"id": "good", "messages": user("Hello.")}
    nested = '{"id": "deep", "messages": ' + "[" * 1500 + "]" * 1500 + "}"  # beyond json's recursion
    deep = "text"
    for _ in range(150):  # parses, but deeper than any request
        deep = [deep]
    lines = [
        json.dumps({"id": "latin1", "messages": user("caf")}).encode()[:-4] + b'\xe9"}]}]}',
        nested.encode(),
        json.dumps({"id": "huge", "messages": user("x" * 300_000)}).encode(),  # over --max-line-bytes
        json.dumps({"id": "long", "messages": user("word " * 100_000)}).encode()[:400],  # cut: bad JSON
        json.dumps({"id": ["list"], "messages": "text"}).encode(),
        json.dumps({"id": "types", "messages": [{"role": 5, "content": 7}]}).encode(),
        json.dumps({"id": "verbose", "messages": user("word " * 30_000)}).encode(),  # over max_length's text
        json.dumps({"id": "nested", "messages": [{"role": "user", "content": deep}]}).encode(),
        json.dumps(good).encode(),
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    output = tmp_path / "out.jsonl"
    assert main(batch_argv(checkpoint, requests, output, "--max-line-bytes", "200000")) == 3
    results = {r["id"]: r for r in read_lines(output)}
    assert results.pop("good")["finish_reason"] in ("stop", "length")
    errors = {key: r["error"] for key, r in results.items()}
    assert all(r["finish_reason"] == "error" for r in results.values())
    assert "line 1: not UTF-8: byte 0xe9" in errors["<line 1>"]
    assert "line 2: JSON nested more than 100 levels deep" in errors["<line 2>"]
    assert "line 3: longer than 200000 bytes (--max-line-bytes)" in errors["<line 3>"]
    assert "line 4: invalid JSON" in errors["<line 4>"]
    assert "line 5: 'id' must be a string or an integer" in errors["<line 5>"]
    assert "characters of text, more than max_length=128" in errors["verbose"]
    assert "JSON nested more than 100 levels deep" in errors["<line 8>"]
    assert "types" in errors and len(errors) == 8

    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(good) + "\n", encoding="utf-16")
    assert main(batch_argv(checkpoint, utf16, tmp_path / "out16.jsonl")) == 3
    first, *rest = read_lines(tmp_path / "out16.jsonl")  # "\n" is two bytes in UTF-16: a NUL line after
    assert "line 1: not UTF-8" in first["error"]
    assert "UTF-16 byte-order mark: save it as UTF-8" in first["error"]
    assert all(r["finish_reason"] == "error" for r in rest)


def test_a_bug_in_request_preparation_stops_the_run_and_keeps_what_was_written(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """An exception of ours (not a request's fault) is not an error record: `run` raises it and `lfm2vl
    batch` exits 1 naming it, with every line already written whole; a --resume then finishes the rest."""
    from lfm2vl_jax.inference.batching import BatchEngine

    requests = tmp_path / "requests.jsonl"
    ids = [f"r{i}" for i in range(6)]
    requests.write_text("".join(json.dumps({"id": i, "messages": user(f"Say {i}.")}) + "\n" for i in ids))
    output = tmp_path / "out.jsonl"
    prepare = BatchEngine._prepare

    def broken(self, request):
        if request.id == "r4":
            raise RuntimeError("injected bug in _prepare")
        return prepare(self, request)

    monkeypatch.setattr(BatchEngine, "_prepare", broken)
    assert main(batch_argv(checkpoint, requests, output)) == 1
    err = capsys.readouterr().err
    assert "bug" in err and "injected bug in _prepare" in err, err
    written = read_lines(output) if output.read_text() else []
    assert all(r["finish_reason"] != "error" for r in written)  # the bug became no one's error record
    monkeypatch.setattr(BatchEngine, "_prepare", prepare)
    assert main([*batch_argv(checkpoint, requests, output), "--resume"]) == 0
    assert sorted(r["id"] for r in read_lines(output)) == ids
