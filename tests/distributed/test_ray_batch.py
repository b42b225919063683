"""Batch inference beyond one process gives every request the tokens of the single-process `lfm2vl batch`:
2 Ray Data replicas on a local Ray cluster (one of them dying after its first batch: Ray runs that batch
again on a restarted actor), and 3 hash shards merged by `lfm2vl batch-merge`.

One requests file for all: images of three sizes, text only, greedy and seeded sampling, an unreadable
image, a bad line. All runs
share one persistent compilation cache (the replicas' processes read what the single run compiled).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
import ray
from PIL import Image
from tiny_checkpoints import write_chat_checkpoint

from lfm2vl_jax.cli import main
from lfm2vl_jax.integrations import ray as ray_integration

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this module


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs; JAX's settings restored afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    yield tmp_path_factory.mktemp("compile-cache")
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("requests")
    rng = np.random.default_rng(0)
    for name, (height, width) in {
        "small.png": (40, 56),
        "wide.png": (64, 256),
        "big.png": (300, 420),
    }.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(directory / name)
    lines = []
    for i in range(30):
        content = [{"type": "text", "text": f"Question number {i}?" + " more" * (i % 5)}]
        if i % 3:
            content.insert(
                0, {"type": "image", "path": ("small.png", "wide.png", "big.png")[i % 3 - 1 + i % 2]}
            )
        request = {"id": f"q{i}" if i % 4 else i, "messages": [{"role": "user", "content": content}]}
        request["max_new_tokens"] = 2 + i % 4
        if i % 2:
            request |= {"do_sample": True, "temperature": 0.9, "seed": i}
        lines.append(json.dumps(request))
    (directory / "broken.png").write_bytes(b"not a png")
    broken = {
        "id": "unreadable",
        "messages": [{"role": "user", "content": [{"type": "image", "path": "broken.png"}]}],
    }
    lines.insert(9, json.dumps(broken))  # the engine's error record (in a replica: the same)
    lines.insert(17, '{"id": "broken", "messages": ')  # a bad line: the reader's error record
    path = directory / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("ray-batch"))


def batch_argv(checkpoint, requests_file, output, compile_cache, *extra) -> list[str]:
    argv = ["batch", "--model", str(checkpoint), "--input", str(requests_file), "--output", str(output)]
    argv += ["--slots", "4", "--max-length", "512", "--quiet", "--compile-cache", str(compile_cache)]
    return [*argv, *extra]


def records(path) -> dict:
    """The result lines of a file by id, each id once."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {json.dumps(line["id"]): line for line in lines}
    assert len(by_id) == len(lines), "an id appears twice"
    return by_id


@pytest.fixture(scope="module")
def single(checkpoint, requests_file, compile_cache, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("single") / "results.jsonl"
    assert main(batch_argv(checkpoint, requests_file, output, compile_cache)) == 3
    results = records(output)
    assert len(results) == 32 and sum(r["finish_reason"] == "error" for r in results.values()) == 2
    return results


class DyingReplica(ray_integration.BatchReplica):
    """Runs its batch, then its process dies before returning it, the first time any replica gets here."""

    marker = ""  # a file: which replica died (set by the test; pickled with the class)

    def __call__(self, batch):
        results = super().__call__(batch)
        try:
            with open(self.marker, "x") as file:
                file.write(self.replica)
        except FileExistsError:
            return results
        os._exit(1)


def test_two_replicas_equal_the_single_process_run_when_one_dies(
    cluster, checkpoint, requests_file, compile_cache, single, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(DyingReplica, "marker", str(tmp_path / "died"))
    monkeypatch.setattr(ray_integration, "BatchReplica", DyingReplica)
    output = tmp_path / "ray.jsonl"
    argv = batch_argv(checkpoint, requests_file, output, compile_cache, "--ray", "--replicas", "2")
    assert main(argv) == 3  # the bad line's error record, as the single run
    assert "30 done" in capsys.readouterr().err
    assert (tmp_path / "died").exists()  # a replica did die with a batch in hand
    assert records(output) == single  # every id once, every token the same

    # Resumable: ids already written are skipped; nothing is run or written again.
    before = output.read_bytes()
    assert main([*argv, "--resume"]) == 0
    assert "0 done" in capsys.readouterr().err and output.read_bytes() == before


def test_three_shards_merged_equal_the_single_process_run(
    checkpoint, requests_file, compile_cache, single, tmp_path, capsys
):
    shards = [tmp_path / f"shard-{i}.jsonl" for i in range(3)]
    for i, shard in enumerate(shards):
        argv = batch_argv(checkpoint, requests_file, shard, compile_cache, "--num-shards", "3")
        assert main([*argv, "--shard-index", str(i)]) in (0, 3)
    sizes = [len(records(shard)) for shard in shards]
    assert sum(sizes) == 32 and all(sizes), sizes  # each shard ran some, and together all, once
    merged = tmp_path / "merged.jsonl"
    assert main(["batch-merge", str(merged), *map(str, shards), "--requests", str(requests_file)]) == 0
    assert records(merged) == single
    ids = [json.loads(line)["id"] for line in merged.read_text().splitlines()]
    assert ids[:3] == [0, "q1", "q2"] and ids[9] == "unreadable" and ids[17] == "<line 18>"  # lines. order


def test_more_replicas_than_the_cluster_holds_are_refused_before_the_output_is_touched(
    cluster, checkpoint, requests_file, compile_cache, tmp_path, capsys
):
    output = tmp_path / "ray.jsonl"
    argv = batch_argv(checkpoint, requests_file, output, compile_cache, "--ray", "--replicas", "3")
    assert main(argv) == 2  # would wait forever for a third CPU
    err = capsys.readouterr().err
    assert "the replicas (3) need 3 CPU (the cluster has 2)" in err and err.count("\n") == 1, err
    assert main([*argv[:-1], "1", "--ray-preprocess", "stage", "--replica-gpus", "1"]) == 2
    err = capsys.readouterr().err  # the CPUs fit (1 + 1), the GPU does not
    assert "the replicas (1) and the preprocessing stage need 1 GPU (the cluster has 0);" in err, err
    assert not output.exists()
