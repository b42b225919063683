"""Sharded `lfm2vl batch` and `lfm2vl batch-merge` without a model: the split's hash, the merge's checks
(missing, duplicate and foreign ids, torn or foreign lines, outputs it must not replace), and the bad
flags of `--num-shards`, `--shard-index` and `--ray` (one error line, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from lfm2vl_jax import integrations
from lfm2vl_jax.cli import main
from lfm2vl_jax.inference.shards import request_shard


def test_shard_is_a_sha256_of_the_ids_json_text():
    for request_id, text in ((7, b"7"), ("7", b'"7"'), ("caf\u00e9", b'"caf\\u00e9"')):
        expected = int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % 5
        assert request_shard(request_id, 5) == expected
    shares = [request_shard(f"id-{i}", 3) for i in range(3000)]
    assert all(900 < shares.count(s) < 1100 for s in range(3))  # about even


def result(request_id, text="x") -> str:
    line = {"id": request_id, "text": text, "token_ids": [1], "finish_reason": "stop"}
    return json.dumps(line | {"prompt_tokens": 3, "completion_tokens": 1}) + "\n"


@pytest.fixture()
def files(tmp_path):
    """A requests file (a bad line and a repeated id among them) and two shard results files."""
    lines = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]}, "{bad", {"id": 2, "messages": [1]}]
    lines += [{"id": "a", "messages": [{"role": "user", "content": "again"}]}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    first, second = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"
    first.write_text(result("<line 4>") + result("a"))
    second.write_text(result(2) + result("<line 2>"))
    return requests, first, second


def merge(output, *inputs, requests, extra=()) -> list[str]:
    return ["batch-merge", str(output), *map(str, inputs), "--requests", str(requests), *extra]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


def test_merge_writes_every_id_once_in_request_order(files, tmp_path, capsys):
    requests, first, second = files
    before = first.read_bytes(), second.read_bytes()
    output = tmp_path / "merged.jsonl"
    assert main(merge(output, first, second, requests=requests)) == 0
    assert output.read_text() == result("a") + result("<line 2>") + result(2) + result("<line 4>")
    assert (first.read_bytes(), second.read_bytes()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left

    # An existing output: refused without --overwrite; with it, replaced only if it is a results file.
    output.write_text(result("old"))
    assert main(merge(output, first, second, requests=requests)) == 2
    assert "exists; pass --overwrite" in one_error(capsys) and output.read_text() == result("old")
    assert main(merge(output, first, second, requests=requests, extra=["--overwrite"])) == 0
    assert output.read_text().count("\n") == 4
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(merge(notes, first, second, requests=requests, extra=["--overwrite"])) == 2
    assert "not a result line" in one_error(capsys) and notes.read_text() == "my notes\n"


@pytest.mark.parametrize(
    "first_text, message",
    [
        (result("<line 4>"), '1 of the 4 ids of {requests} have no result: "a"'),
        (result("<line 4>") + result("a") + result("a"), 'ids appear more than once: "a"'),
        (result("<line 4>") + result("a") + result("z") + result(3), "2 ids are not in {requests}"),
        (result("<line 4>") + result("a")[:20], "ends in a torn line"),
        ('{"id": "a", "note": 1}\n', "line 1 is not a result line"),
    ],
    ids=["missing", "duplicate", "foreign", "torn", "not-results"],
)
def test_merge_refuses_and_writes_nothing(files, tmp_path, capsys, first_text, message):
    requests, first, second = files
    first.write_text(first_text)
    output = tmp_path / "merged.jsonl"
    assert main(merge(output, first, second, requests=requests)) == 2
    assert message.format(requests=requests) in one_error(capsys)
    assert not output.exists() and first.read_text() == first_text


def test_merge_refuses_to_write_over_its_inputs(files, capsys):
    requests, first, second = files
    before = first.read_bytes()
    for output, extra in ((first, ["--overwrite"]), (requests, ["--overwrite"]), (first, [])):
        assert main(merge(output, first, second, requests=requests, extra=extra)) == 2
        assert f"the output {output} is the" in one_error(capsys)
    assert main(merge(first.parent / "m.jsonl", first, first, requests=requests)) == 2
    assert "is given twice" in one_error(capsys)
    assert first.read_bytes() == before


def batch(files, tmp_path, *extra) -> list[str]:
    requests = files[0]
    output = tmp_path / "out.jsonl"
    return ["batch", "--model", "/nonexistent", "--input", str(requests), "--output", str(output), *extra]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--num-shards", "3", "--shard-index", "3"],
            "--shard-index must be in [0, 3) for --num-shards 3, got 3",
        ),
        (["--num-shards", "2", "--shard-index", "-1"], "--shard-index must be in [0, 2)"),
        (["--num-shards", "0", "--shard-index", "0"], "--num-shards must be a positive integer, got 0"),
        (["--num-shards", "2"], "--num-shards and --shard-index go together"),
        (["--replicas", "2"], "--replicas is an option of --ray runs; add --ray"),
        (["--ray", "--replicas", "0"], "--replicas must be a positive integer"),
        (
            ["--ray", "--ray-address", "127.0.0.1:{port}", "--ray-timeout", "1"],
            "--ray-address 127.0.0.1:{port}: no",
        ),
        (["--ray", "--ray-address", "nowhere"], "--ray-address nowhere: expected HOST:PORT"),
    ],
)
def test_bad_shard_and_ray_flags_are_one_line_before_anything_is_written(
    files, tmp_path, capsys, extra, message
):
    port = closed_port()
    extra = [x.format(port=port) for x in extra]
    assert main(batch(files, tmp_path, *extra)) == 2
    assert message.format(port=port) in one_error(capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_ray_without_the_extra_says_how_to_install_it(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "lfm2vl_jax.integrations.ray", raising=False)
    monkeypatch.delattr(integrations, "ray", raising=False)  # an earlier test's import
    assert main(batch(files, tmp_path, "--ray")) == 2
    assert "--ray needs the 'ray' extra: pip install 'lfm2vl-jax[ray]'" in one_error(capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_another_process_shards_alike_and_imports_no_ray():
    """In a process with another hash seed: the same shard (not Python's hash()); and neither the package
    nor the command line imports ray (the extra is optional)."""
    code = (
        "import sys, lfm2vl_jax, lfm2vl_jax.cli, lfm2vl_jax.inference.shards\n"
        "lfm2vl_jax.cli.build_parser()\n"
        "names = [m for m in sys.modules if m.split('.')[0] == 'ray' or 'integrations' in m]\n"
        "print(lfm2vl_jax.inference.shards.request_shard('q1', 7), sorted(names))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == [str(request_shard("q1", 7)), "[]"], done.stderr
