"""Fine-tuning never fails silently nor touches what is not its own (issue 25): non-finite options are
refused, a non-finite step stops the run keeping the last good checkpoint (or is skipped when asked),
LoRA ranks beyond a weight's width are refused before anything is allocated, --resume checks the model
and run.json and falls back from a damaged latest checkpoint, and --output never takes over a user's
directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_fixtures import make_tiny_checkpoint, tiny_config, write_jsonl

from lfm2vl_jax.cli import main
from lfm2vl_jax.training.config import SFTConfig, TrainingError
from lfm2vl_jax.training.trainer import SFTTrainer

ENV = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "JAX_PLATFORMS": "cpu"}


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


def run_config(model: Path, data: Path, output: Path, **options) -> SFTConfig:
    settings = {"steps": 4, "batch_size": 2, "save_every": 2, "keep": 5, "learning_rate": 3e-3}
    return SFTConfig(
        model=str(model), data=str(data), output=str(output), progress=False, **(settings | options)
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint, training_data) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("run") / "run"
    SFTTrainer(run_config(tiny_checkpoint, training_data, output)).train()
    return output


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("learning_rate", float("nan"), "--learning-rate must be a finite number, got nan"),
        ("learning_rate", float("inf"), "--learning-rate must be a finite number"),
        ("weight_decay", float("nan"), "--weight-decay must be a finite number"),
        ("max_grad_norm", float("-inf"), "--max-grad-norm must be a finite number"),
        ("lora_alpha", float("inf"), "--lora-alpha must be a finite number"),
        ("lr_multiplier", "vision=nan", "--lr-multiplier: vision='nan' must be a finite number >= 0"),
        ("lr_multiplier", {"language": -1.0}, "--lr-multiplier: language=-1.0 must be"),
        ("learning_rate", -1e-3, "--learning-rate must be >= 0"),
        ("resume", "no", "--resume must be true or false, got 'no'"),
        ("scan_layers", 0, "--scan-layers must be true or false"),
        ("coordinator_timeout", 0, "--coordinator-timeout must be a positive integer"),
    ],
)
def test_options_that_would_train_silently_wrong_are_refused(option, value, message):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace("+", r"\+")):
        SFTConfig(model="m", data="d", output="o", **{option: value})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--lr-multiplier", "vision=inf"], "--lr-multiplier: vision='inf' must be a finite number"),
        (["--lora-rank", "100000"], "LoRA rank 100000 is larger than the adapted weight"),
    ],
)
def test_cli_refuses_before_writing_anything(
    tiny_checkpoint, training_data, tmp_path, capsys, flags, message
):
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_checkpoint), "--data", str(training_data), "--output", str(out)]
    assert main([*argv, "--quiet", *flags]) == 2
    assert message in one_error(capsys)
    assert not out.exists()


def test_output_never_takes_over_a_users_directory(tiny_checkpoint, training_data, tmp_path):
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(TrainingError, match="is a file, not a directory"):
        SFTTrainer(run_config(tiny_checkpoint, training_data, file)).train()
    assert file.read_text() == "mine"
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"not a training run's \(notes.txt\).*--keep-other-files"):
        SFTTrainer(run_config(tiny_checkpoint, training_data, home)).train()
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


def test_a_non_finite_step_stops_the_run_keeping_the_last_good_checkpoint(
    tiny_checkpoint, training_data, tmp_path
):
    """A learning rate of 1e30 trains step 1 (its loss is computed before the update) to weights of
    ~1e30, whose step-2 loss overflows."""
    out = tmp_path / "run"
    config = run_config(tiny_checkpoint, training_data, out, learning_rate=1e30, save_every=1, steps=2)
    with pytest.raises(
        TrainingError, match=r"step 2: the loss is nan.*last good checkpoint \(step 1\) is kept"
    ):
        SFTTrainer(config).train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert not (out / "final").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]

    skipped = tmp_path / "skipped"
    config = run_config(
        tiny_checkpoint, training_data, skipped, learning_rate=1e30, skip_nonfinite=True, steps=2
    )
    SFTTrainer(config).train()
    lines = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert [line["skipped_updates"] for line in lines] == [0, 1]
    assert (skipped / "final" / "model.safetensors").exists()


def test_resume_refuses_another_model_and_a_corrupt_run_file(
    finished_run, tmp_path, tmp_path_factory, training_data
):
    other = make_tiny_checkpoint(tmp_path_factory.mktemp("other") / "model", tiny_config(), seed=1)
    run = shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    with pytest.raises(TrainingError, match="trains the model .* but --model .* is another one"):
        SFTTrainer(run_config(other, training_data, run, steps=6, resume=True)).train()
    (run / "run.json").write_text('{"batch_size": 2, ')
    with pytest.raises(TrainingError, match=r"run.json is unreadable or corrupt"):
        SFTTrainer(run_config(other, training_data, run, steps=6, resume=True)).train()


def test_resume_onto_checkpoints_of_other_shapes_is_one_error(
    finished_run, training_data, tmp_path, tmp_path_factory
):
    """A run recorded before the model fingerprint was: the restore itself finds the shapes differ."""
    wider = tiny_config().replace(projector_hidden_size=96)
    other = make_tiny_checkpoint(tmp_path_factory.mktemp("wider") / "model", wider)
    run = shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    settings = json.loads((run / "run.json").read_text())
    del settings["model_fingerprint"]
    (run / "run.json").write_text(json.dumps(settings))
    # In a process of its own: orbax's abandoned reads used to print hundreds of lines of tracebacks.
    argv = ["train", "--model", str(other), "--data", str(training_data), "--output", str(run)]
    argv += ["--steps", "6", "--batch-size", "2", "--save-every", "2", "--resume", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "lfm2vl_jax.cli", *argv], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert re.match(
        r"lfm2vl train: error: --resume: no checkpoint in .* restores into this run \(step 4: "
        r".* is stored with shape \([\d, ]+\), this run's is \([\d, ]+\)\)",
        done.stderr,
    )  # found from the metadata, before orbax reads anything (a failed read leaves reads in flight)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]  # nothing moved


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    finished_run, tiny_checkpoint, training_data, tmp_path, capsys
):
    run = shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    for path in (run / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.stat().st_size > 100 and path.name != "_CHECKPOINT_METADATA":
            os.truncate(path, 50)
    config = run_config(tiny_checkpoint, training_data, run, steps=5, resume=True)
    summary = SFTTrainer(config).train()
    err = capsys.readouterr().err
    assert "lfm2vl train: warning: the checkpoint of step 4 does not restore" in err
    assert "resuming from step 2" in err
    assert summary["resumed_from"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "5", "broken-4"]


def test_an_unreachable_coordinator_fails_naming_its_address(training_data, tmp_path):
    """XLA would abort the process at its own deadline (or wait for it): one error line instead."""
    out = tmp_path / "run"
    argv = ["train", "--model", "m", "--data", str(training_data), "--output", str(out)]
    argv += ["--coordinator-address", "127.0.0.1:9", "--num-processes", "2", "--process-id", "1"]
    argv += ["--coordinator-timeout", "3"]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lfm2vl_jax.cli", *argv], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert done.stderr.startswith("lfm2vl train: error: --coordinator-address 127.0.0.1:9: process 1 of 2")
    assert done.stderr.count("\n") == 1 and "--coordinator-timeout 3 s" in done.stderr
    assert not out.exists()


def test_over_long_training_lines_are_refused_before_tokenizing(tiny_checkpoint, tmp_path):
    from lfm2vl_jax.processing.processor import Lfm2VlProcessor
    from lfm2vl_jax.training.data import DataError, read_conversations

    processor = Lfm2VlProcessor.from_pretrained(tiny_checkpoint)
    long = {"messages": [{"role": "user", "content": "x " * 2_000_000}, {"role": "assistant", "content": ""}]}
    data = write_jsonl(tmp_path / "train.jsonl", [long])
    with pytest.raises(DataError, match="4000000 characters of text, more than --max-length 64"):
        read_conversations(data, processor, 64)
    data.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=f"{data}:1: not UTF-8 text"):
        read_conversations(data, processor, 64)
