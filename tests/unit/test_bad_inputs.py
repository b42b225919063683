"""Bad input of every kind gets one clear error (an `Lfm2VlError` naming the key, file, option or limit),
never a traceback, silent garbage or lost work; one case per kind (issue 12's table and the classes it
stands for). Every write that is refused leaves the file system as it was."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoints import (
    copy_checkpoint,
    replace_tensor,
    snapshot,
    tiny_config,
    write_cli_checkpoint,
)

import lfm2vl_jax.checkpoint.export as export
import lfm2vl_jax.inference.options as options_module
import lfm2vl_jax.inputs as inputs_module
from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.export import ExportError
from lfm2vl_jax.checkpoint.files import WriteError, remove_abandoned
from lfm2vl_jax.checkpoint.hf import CheckpointError, load_hf_checkpoint
from lfm2vl_jax.checkpoint.orbax import hf_to_orbax, orbax_to_hf, save_orbax_checkpoint
from lfm2vl_jax.checkpoint.safetensors_io import SafetensorsFile
from lfm2vl_jax.cli import main
from lfm2vl_jax.config import ConfigError, config_from_dict, config_to_dict
from lfm2vl_jax.errors import Lfm2VlError
from lfm2vl_jax.inference import engine
from lfm2vl_jax.inputs import InputError, OptionError, UnknownOptionError
from lfm2vl_jax.processing.image_processor import Lfm2VlImageProcessor, ProcessorError, target_ratios

REPO = Path(__file__).resolve().parents[2]
PROMPT = np.array([[1, 5, 9, 13, 17, 21]])
W1 = "model.language_model.layers.0.feed_forward.w1.weight"


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, checkpoint_450m) -> Path:
    """The tiny model with the released vocabulary (65,536) and 128,000 positions, beside the stand-in
    tokenizer and processor files, for `lfm2vl generate`."""
    return write_cli_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", checkpoint_450m)


def one_error_line(capsys, prog: str = "lfm2vl") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}") and ": error: " in err, err
    assert "Traceback" not in err
    return err


# max_new_tokens: type, positions, memory ------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, 2.0, "8", 0, -1, 2**31])  # None: unset (generation_config.json)
def test_max_new_tokens_must_be_a_positive_int(model, value):
    with pytest.raises(OptionError, match=f"max_new_tokens must be an integer in \\[1, .*got {value!r}"):
        model.generate(PROMPT, max_new_tokens=value)


def test_prompt_plus_new_tokens_may_not_exceed_the_models_positions(model):
    limit = model.config.text.max_position_embeddings  # 64; the prompt holds 6 tokens
    model.request({"input_ids": PROMPT}, limit - 6, 0, {})  # fits exactly
    for value in (limit - 5, 200_000, 100_000_000):
        with pytest.raises(
            OptionError, match=f"max_new_tokens={value}: .*6 tokens.*exceed.*{limit} positions"
        ):
            model.generate(PROMPT, max_new_tokens=value)


def test_cache_beyond_the_memory_available_is_refused_before_allocation(model, monkeypatch):
    monkeypatch.setattr(options_module, "available_memory", lambda config: (10_000, "test memory"))

    def no_prefill(*args, **kwargs):
        raise AssertionError("prefill ran")

    monkeypatch.setattr(engine, "prefill", no_prefill)
    with pytest.raises(OptionError, match=r"max_new_tokens=50: .* needs .* GB .* 1e-05 GB of test memory"):
        model.generate(np.repeat(PROMPT, 8, axis=0), max_new_tokens=50)
    monkeypatch.undo()
    free = inputs_module.available_memory(model.config)  # the real figure: positive, below 1 PB
    assert free is not None and 0 < free[0] < 10**15


def test_forward_logits_beyond_the_memory_available_are_refused(model, monkeypatch):
    monkeypatch.setattr(inputs_module, "available_memory", lambda config: (10_000, "test memory"))
    with pytest.raises(
        InputError, match=r"logits of 1 x 6 tokens over a 512-token vocabulary need 1\.23e-05 GB"
    ):
        model(PROMPT)


def test_cli_refuses_max_new_tokens_beyond_the_positions_in_one_line(cli_checkpoint, capsys):
    for value in ("100000000", "200000", "1000000000000"):
        argv = ["generate", "--model", str(cli_checkpoint), "--prompt", "hi", "--max-new-tokens", value]
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert "max_new_tokens" in err and ("128000 positions" in err or "2147483647" in err), err


# Generation options and inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("pad_token_id", 70000),
        ("pad_token_id", -1),
        ("pad_token_id", True),
        ("pad_token_id", [0]),
        ("eos_token_id", 512),
        ("eos_token_id", [1, -1]),
        ("eos_token_id", 3.0),
        ("stop_token_ids", "7"),
        ("stop_token_ids", [600]),
        ("stop_token_ids", [None]),
    ],
)
def test_token_ids_must_lie_in_the_vocabulary(model, option, value):
    with pytest.raises(OptionError, match=rf"generate\(\): {option} must be a token id.*\[0, 512\)"):
        model.generate(PROMPT, max_new_tokens=4, **{option: value})


def test_token_ids_from_generation_config_json_are_checked_too(tiny, tmp_path):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    (directory / "generation_config.json").write_text(json.dumps({"pad_token_id": 99999}))
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    with pytest.raises(OptionError, match=r"generation_config\.json: pad_token_id .*99999"):
        model.generate(PROMPT, max_new_tokens=4)
    for content in ("{not json", "[1, 2]"):
        (directory / "generation_config.json").write_text(content)
        with pytest.raises(ConfigError, match=r"generation_config\.json"):
            Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


@pytest.mark.parametrize(
    "option, value",
    [
        ("temperature", 0),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", "5"),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", [1.0]),
        ("do_sample", "yes"),
        ("do_sample", 1),
    ],
)
def test_sampling_options_are_checked_for_type_and_range(model, option, value):
    options = {"do_sample": True, option: value}  # sampling: every option is used
    with pytest.raises(OptionError, match=rf"generate\(\): {option} must be"):
        model.generate(PROMPT, max_new_tokens=4, **options)


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("seed", 2**64, "seed must be an integer"),
        ("seed", 1.5, "seed must be an integer"),
        ("seed", "0", "seed must be an integer"),
        ("loop", "gpu", "loop must be 'host', 'device' or None"),
        ("loop", np.array([1, 2]), "loop must be"),
        ("streamer", 3, "streamer must be callable"),
    ],
)
def test_other_generate_arguments_are_checked(model, keyword, value, message):
    with pytest.raises(OptionError, match=message):
        model.generate(PROMPT, max_new_tokens=4, **{keyword: value})


def test_unknown_option_is_a_type_error_and_ours(model):
    with pytest.raises(UnknownOptionError, match=r"unexpected arguments \['temprature'\]") as caught:
        model.generate(PROMPT, temprature=0.5)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, Lfm2VlError)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"input_ids": np.array([[1.5, 2.0]])}, "input_ids must hold integers, got dtype float64"),
        ({"input_ids": np.array([["a", "b"]])}, "input_ids must hold integers"),
        ({"input_ids": [[1, 2], [3]]}, "input_ids cannot be read as an array"),
        ({"input_ids": np.zeros((1, 0), np.int64)}, r"input_ids must be \(batch, seq\) and not empty"),
        ({"input_ids": np.zeros((0, 4), np.int64)}, r"input_ids must be \(batch, seq\) and not empty"),
        ({"input_ids": np.array([[1, 512]])}, r"input_ids must lie in \[0, 512\)"),
        ({"input_ids": PROMPT, "attention_mask": np.full(PROMPT.shape, 0.5)}, "attention_mask must hold"),
        ({"input_ids": PROMPT, "attention_mask": np.zeros_like(PROMPT)}, r"masks every token of row.s. .0."),
        (
            {
                "input_ids": np.array([[396] * 4]),
                "pixel_values": np.full((1, 16, 48), np.nan, np.float32),
                "pixel_attention_mask": np.ones((1, 16), np.int32),
                "spatial_shapes": np.array([[4, 4]]),
            },
            "pixel_values hold NaN",
        ),
        (
            {
                "input_ids": np.array([[396] * 4]),
                "pixel_values": np.zeros((48,), np.float32),
                "pixel_attention_mask": np.ones((1, 16), np.int32),
                "spatial_shapes": np.array([[4, 4]]),
            },
            r"pixel_values must be \(images, patches, 48\)",
        ),
    ],
)
def test_bad_model_inputs_are_named(model, inputs, message):
    with pytest.raises(Lfm2VlError, match=message):
        model.generate(**inputs, max_new_tokens=4)


# save_pretrained and conversions: dtypes and arguments ----------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int8, "int32", bool, np.complex64, "nonsense"])
def test_only_floating_dtypes_are_written(model, tmp_path, dtype):
    with pytest.raises(
        ExportError, match="dtype of the written weights: .* (is not a floating-point type|dtype)"
    ):
        model.save_pretrained(tmp_path / "out", dtype=dtype, progress=False)
    assert snapshot(tmp_path) == {}


def test_conversions_refuse_non_float_dtypes_before_reading(tiny, tmp_path):
    with pytest.raises(ExportError, match="int8 is not a floating-point type"):
        hf_to_orbax(tiny, tmp_path / "orbax", dtype="int8", progress=False)
    with pytest.raises(ExportError, match="int8 is not a floating-point type"):
        orbax_to_hf(tmp_path / "missing", tmp_path / "hf", dtype="int8", progress=False)
    with pytest.raises(ConfigError, match="params dtype: int8 is not a floating-point type"):
        Lfm2VlForConditionalGeneration.from_pretrained(tiny, dtype=jnp.int8, progress=False)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"max_shard_size": True}, "a size must be a number of bytes"),
        ({"max_shard_size": -5}, "size must be positive"),
        ({"max_shard_size": "5 parsecs"}, "cannot read '5 parsecs' as a size"),
        ({"overwrite": "no"}, "overwrite must be True or False"),
        ({"processor": object()}, "processor object has no save_pretrained"),
        ({"source_dir": "/does/not/exist"}, "source directory /does/not/exist does not exist"),
    ],
)
def test_bad_save_arguments_are_refused_before_writing(model, tmp_path, arguments, message):
    with pytest.raises(ExportError, match=message):
        model.save_pretrained(tmp_path / "out", progress=False, **arguments)
    assert snapshot(tmp_path) == {}


# Checkpoint tensors and index ------------------------------------------------------------------------------


def test_one_wrongly_shaped_tensor_is_named_alone(tiny, tmp_path):
    """The MLP width is taken from the tensors only where most agree: one bad `w1` does not set it (and
    get 8 good tensors blamed), it is named."""
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    replace_tensor(directory / "model.safetensors", W1, np.zeros((63, 32), np.float32))
    with pytest.raises(CheckpointError) as caught:
        load_hf_checkpoint(directory, progress=False)
    message = str(caught.value)
    assert f"tensor '{W1}' has shape (63, 32), expected (64, 32)" in message
    assert message.count("has shape") == 1


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("model.multi_modal_projector.linear_1.bias", np.zeros(47, np.float32), "(47,), expected (48,)"),
        ("model.language_model.embed_tokens.weight", np.zeros((513, 32), np.float32), "expected (512, 32)"),
        ("model.language_model.layers.1.self_attn.q_layernorm.weight", np.ones(16, np.int8), "int8"),
    ],
)
def test_tensor_disagreeing_with_the_config_is_named(tiny, tmp_path, key, value, expected):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    replace_tensor(directory / "model.safetensors", key, value)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}'") + ".*" + re.escape(expected)):
        load_hf_checkpoint(directory, progress=False)


def shard_checkpoint(source: Path, directory: Path, shard_name: str) -> None:
    """`directory`: config.json and an index mapping every tensor to `shard_name`."""
    directory.mkdir(parents=True)
    shutil.copyfile(source / "config.json", directory / "config.json")
    weight_map = {key: shard_name for key in SafetensorsFile(source / "model.safetensors").keys()}  # noqa: SIM118
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "shard_name, message",
    [
        ("../outside.safetensors", "not a file inside"),
        ("{outside}", "not a file inside"),
        ("link.safetensors", "a link to .*outside"),
    ],
    ids=["dot-dot", "absolute", "symlink"],
)
def test_index_shards_must_stay_inside_the_checkpoint(tiny, tmp_path, shard_name, message):
    """A valid checkpoint sits right beside (or behind a link from) the directory: still refused."""
    outside = shutil.copyfile(tiny / "model.safetensors", tmp_path / "outside.safetensors")
    directory = tmp_path / "ckpt"
    shard_checkpoint(tiny, directory, shard_name.format(outside=outside))
    (directory / "link.safetensors").symlink_to(outside)
    with pytest.raises(
        CheckpointError, match=rf"model\.safetensors\.index\.json: weight_map\[.*\] names .*{message}"
    ):
        load_hf_checkpoint(directory, progress=False)


def test_malformed_index_is_refused(tiny, tmp_path):
    directory = tmp_path / "ckpt"
    shard_checkpoint(tiny, directory, "model.safetensors")
    index = directory / "model.safetensors.index.json"
    for content, message in [
        ({"weight_map": ["a"]}, "weight_map must map tensor names to shard files"),
        ({"weight_map": {"a": 3}}, r"weight_map\['a'\] must be a shard file name"),
        ([1], "not a valid safetensors index"),
    ]:
        index.write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=message):
            load_hf_checkpoint(directory, progress=False)


def test_hub_cache_snapshot_links_into_its_blob_store_load(tiny, tmp_path):
    """The Hugging Face cache's snapshot files are links to `../../blobs/<hash>`: allowed."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    shutil.copyfile(tiny / "model.safetensors", repo / "blobs" / "abc123")
    snapshot_dir = repo / "snapshots" / "rev"
    shard_checkpoint(tiny, snapshot_dir, "model-00001-of-00001.safetensors")
    (snapshot_dir / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc123")
    config, _ = load_hf_checkpoint(snapshot_dir, progress=False)
    assert config.text.vocab_size == 512


# config.json ----------------------------------------------------------------------------------------------


def edited(config: dict, path: str, value) -> dict:
    raw = json.loads(json.dumps(config))
    *parents, key = path.split(".")
    target = raw
    for parent in parents:
        target = target[parent]
    target[key] = value
    return raw


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("text_config.hidden_size", "64", 'text_config.hidden_size must be a positive integer, got "64"'),
        (
            "text_config.num_hidden_layers",
            True,
            "text_config.num_hidden_layers must be a positive integer, got true",
        ),
        ("text_config.vocab_size", -512, "text_config.vocab_size must be a positive integer, got -512"),
        (
            "text_config.intermediate_size",
            64.0,
            "text_config.intermediate_size must be a positive integer, got 64.0",
        ),
        ("text_config.norm_eps", math.nan, "text_config.norm_eps must be a positive finite number, got NaN"),
        ("text_config.conv_bias", "false", 'text_config.conv_bias must be true or false, got "false"'),
        (
            "text_config.layer_types",
            "conv",
            'text_config.layer_types must be a list of strings or null, got "conv"',
        ),
        ("text_config.rope_parameters", [1], "text_config.rope_parameters must be an object or null"),
        ("text_config.rope_parameters.rope_theta", "1e6", "rope_parameters.rope_theta must be a positive"),
        (
            "text_config.max_position_embeddings",
            None,
            "max_position_embeddings must be a positive integer, got null",
        ),
        ("vision_config", [], "vision_config must be an object, got \\[\\]"),
        ("vision_config.num_patches", 15, r"num_patches \(15\) must be a square"),
        (
            "vision_config.num_attention_heads",
            5,
            r"hidden_size \(32\) must be a multiple of num_attention_heads \(5\)",
        ),
        ("projector_hidden_size", {"a": 1}, "projector_hidden_size must be a positive integer"),
        (
            "image_token_id",
            512,
            r"image_token_id 512 is outside the vocabulary \(text_config.vocab_size 512\)",
        ),
        ("eos_token_id", [7, "8"], "eos_token_id must be a token id or a non-empty list of token ids"),
        ("vision_feature_layer", 5, "vision_feature_layer 5 is not a layer of the 2-layer vision tower"),
        ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_name_the_key(key, value, message):
    raw = edited(config_to_dict(tiny_config()), key, value)
    with pytest.raises(ConfigError, match=f"^config.json: .*{message}"):
        config_from_dict(raw)


def test_config_json_that_is_not_an_object_names_the_file(tiny, tmp_path, capsys):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    for content, message in [("[1, 2]", "must hold a JSON object, not a list"), ('"x"', "not a str"),
                             ("\xff\xfe", "is not valid JSON")]:  # fmt: skip
        (directory / "config.json").write_bytes(content.encode("latin-1"))
        with pytest.raises(ConfigError, match=f"{directory / 'config.json'}.*{message}"):
            load_hf_checkpoint(directory, progress=False)
    before = snapshot(tmp_path)
    assert main(["convert", "hf-to-orbax", str(directory), str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{directory / 'config.json'} is not valid JSON" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_full_attention_indices_outside_the_model_are_refused():
    raw = config_to_dict(tiny_config())
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attn_idxs"] = [1, 3]
    with pytest.raises(ConfigError, match=r"full_attn_idxs names layers \[3\] of a 3-layer model"):
        config_from_dict(raw)


# Conversions never touch their own input ------------------------------------------------------------------


def test_conversion_onto_its_own_source_is_refused_even_with_overwrite(tiny, tmp_path, capsys):
    source = copy_checkpoint(tiny, tmp_path / "source")
    (tmp_path / "link").symlink_to(source)
    before = snapshot(tmp_path)
    for destination, relation in [
        (source, "is"),
        (tmp_path / "link", "is"),
        (source / "inner", "is inside"),
        (tmp_path, "contains"),
    ]:
        argv = ["convert", "hf-to-orbax", str(source), str(destination), "--overwrite", "--quiet"]
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert f"refusing to write {destination}: it {relation} the source checkpoint" in err
    assert snapshot(tmp_path) == before


def test_orbax_to_hf_and_saves_refuse_their_own_source(tiny, model, tmp_path):
    orbax_dir = hf_to_orbax(tiny, tmp_path / "orbax", progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="it is the source checkpoint"):
        orbax_to_hf(orbax_dir, orbax_dir, overwrite=True, progress=False)
    with pytest.raises(ExportError, match="it is inside the source checkpoint"):
        save_orbax_checkpoint(orbax_dir / "x", model.config, model.params, source_dir=orbax_dir)
    assert snapshot(tmp_path) == before

    source_before = snapshot(tiny)
    with pytest.raises(ExportError, match=f"refusing to write {tiny}: it is the source checkpoint"):
        model.save_pretrained(tiny, overwrite=True, progress=False)  # the directory it was loaded from
    assert snapshot(tiny) == source_before


# Truncated or corrupt orbax checkpoints -------------------------------------------------------------------


def cut_data_files(orbax_dir: Path) -> None:
    for path in (orbax_dir / "params").rglob("d/*"):
        os.truncate(path, 50)


def cut_manifest(orbax_dir: Path) -> None:
    os.truncate(orbax_dir / "params" / "manifest.ocdbt", 10)


def drop_metadata(orbax_dir: Path) -> None:
    (orbax_dir / "params" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [cut_data_files, cut_manifest, drop_metadata])
def test_damaged_orbax_checkpoint_gives_one_line_naming_it(tiny, tmp_path, damage, capsys):
    orbax_dir = hf_to_orbax(tiny, tmp_path / "orbax", progress=False)
    damage(orbax_dir)
    before = snapshot(tmp_path)
    argv = ["convert", "orbax-to-hf", str(orbax_dir), str(tmp_path / "hf")]
    if damage is cut_data_files:  # orbax's abandoned reads may print tracebacks late: watch the whole process
        command = [sys.executable, "-m", "lfm2vl_jax.cli", *argv]
        env = os.environ | {"PYTHONPATH": str(REPO)}
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        returncode, err = out.returncode, out.stderr
    else:
        returncode, err = main(argv), capsys.readouterr().err
    assert returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"lfm2vl convert: error: {orbax_dir}")
    assert "truncated or corrupt" in err or "metadata is missing" in err
    assert snapshot(tmp_path) == before


# Write errors name the user's path; staging left by killed saves is cleaned up ----------------------------


def test_write_refused_by_the_file_system_names_the_target(model, tmp_path, monkeypatch):
    target = tmp_path / "out"
    mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if ".partial-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    with pytest.raises(WriteError, match=f"^cannot write {target}: Permission denied$") as caught:
        model.save_pretrained(target, progress=False)
    assert isinstance(caught.value, OSError) and caught.value.errno == 13
    monkeypatch.undo()

    def full_disk(path, layout, arrays, metadata=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(export, "write_safetensors", full_disk)
    with pytest.raises(
        WriteError,
        match=f"^cannot write {target}: No space left on device \\({target / 'model.safetensors'}\\)$",
    ):
        model.save_pretrained(target, progress=False)
    assert snapshot(tmp_path) == {}


def test_next_write_removes_only_our_abandoned_staging(model, tmp_path):
    target = tmp_path / "out"
    abandoned = [tmp_path / ".out.partial-0123abcd", tmp_path / ".out.old-89abcdef"]
    for path in abandoned:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "weights").write_bytes(b"x" * 1000)
    kept = [
        tmp_path / ".out.partial-0123abcz",  # not 8 hex digits
        tmp_path / ".out.partial-0123abcd0",
        tmp_path / "out.partial-0123abcd",  # not hidden
        tmp_path / ".other.partial-0123abcd",  # another target's
        tmp_path / ".out.tmp-0123abcd",
    ]
    for path in kept:
        path.mkdir()
    (tmp_path / ".out.partial-feedbeef").write_text("a file, not a staging directory")
    live = tmp_path / ".out.partial-00000000"  # a writer still running holds its lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        model.save_pretrained(target, progress=False)
    finally:
        os.close(fd)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", ".out.partial-feedbeef", live.name, *(p.name for p in kept)])
    assert remove_abandoned(target, "partial") == [live]  # unlocked now


def test_save_killed_midway_is_cleaned_up_by_the_next(model, tiny, tmp_path):
    """SIGKILL a save in a subprocess while it writes the weights: the target is untouched, its staging
    directory stays behind, and the next save to the same target removes it."""
    target = tmp_path / "out"
    marker = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import lfm2vl_jax.checkpoint.export as export
        from lfm2vl_jax import Lfm2VlForConditionalGeneration

        def stalled_write(path, layout, arrays, metadata=None):
            Path(path).write_bytes(b"half a file")
            Path({str(marker)!r}).touch()
            time.sleep(60)

        export.write_safetensors = stalled_write
        model = Lfm2VlForConditionalGeneration.from_pretrained({str(tiny)!r}, progress=False)
        model.save_pretrained({str(target)!r}, progress=False)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    staging = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(staging) == 1 and not target.exists()
    model.save_pretrained(target, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writing"]


# Processor settings that would not fit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tile_size": 2**20}, r"one image at these settings .* would need 11 x 4294967296 patches .* GB"),
        ({"max_tiles": 10**9}, r"max_tiles \(1000000000\) is above the 10000 supported"),
        ({"min_image_tokens": 10**12}, r"min_image_tokens \(1000000000000\) > max_image_tokens \(256\)"),
    ],
)
def test_processor_settings_beyond_memory_are_refused(settings, message):
    with pytest.raises(ProcessorError, match=message):
        Lfm2VlImageProcessor(**settings)


def test_many_images_beyond_memory_are_refused_before_resizing(monkeypatch):
    import lfm2vl_jax.processing.image_processor as image_processor

    processor = Lfm2VlImageProcessor()
    monkeypatch.setattr(image_processor, "available_host_memory", lambda: 10**8)
    monkeypatch.setattr(image_processor, "resize_streamed", lambda *args: pytest.fail("resized"))
    with pytest.raises(
        ProcessorError, match=r"40 image\(s\) would need 40 x 1024 patches .* 0\.1 GB of memory"
    ):
        processor([np.zeros((64, 64, 3), np.uint8)] * 40)


def test_tile_grids_are_the_references_in_its_order():
    """The enumeration of tile grids gives the reference's list, whose order among equal tile counts
    decides ties, for every (min_tiles, max_tiles) up to 30."""
    for max_tiles in range(1, 31):
        for min_tiles in range(1, max_tiles + 1):
            reference = [
                (w, h)
                for n in range(min_tiles, max_tiles + 1)
                for w in range(1, n + 1)
                for h in range(1, n + 1)
                if min_tiles <= w * h <= max_tiles
            ]
            assert target_ratios(min_tiles, max_tiles) == sorted(set(reference), key=lambda r: r[0] * r[1])


# The CLI: user errors in one line, bugs in one line with --debug for the traceback ------------------------


def test_unexpected_errors_are_reported_as_bugs_with_debug_for_the_traceback(
    tiny, tmp_path, monkeypatch, capsys
):
    import lfm2vl_jax.checkpoint.orbax as orbax

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(orbax, "hf_to_orbax", broken)
    argv = ["convert", "hf-to-orbax", str(tiny), str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bug" in err and "RuntimeError: boom" in err and "--debug" in err
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(RuntimeError, match="boom"):
            main(debug_argv)
    script = REPO / "convert" / "hf_to_orbax.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tiny), str(tiny), "--debug"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert (
        out.returncode == 1 and "Traceback" in out.stderr and "ExportError: refusing to write" in out.stderr
    )


def test_argparse_usage_errors_are_unchanged(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--max-new-tokens", "many"])
    assert caught.value.code == 2 and "usage: lfm2vl generate" in capsys.readouterr().err
