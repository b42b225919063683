"""Issue 25's silent failures and unnamed errors on the inference side: non-finite checkpoint tensors, seeds
that lost their high bits, tiny temperatures, sampling options without `do_sample`, generation_config.json
lengths, strings read as booleans, image paths that are not files, and malformed config files. Each case
gets one `Lfm2VlError` naming the tensor, option, key or file, or the documented behaviour."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoints import (
    copy_checkpoint,
    replace_tensor,
    tiny_config,
    write_cli_checkpoint,
)

import lfm2vl_jax.inference.options as options_module
from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.hf import CheckpointError, load_hf_checkpoint
from lfm2vl_jax.checkpoint.hub import CheckpointNotFoundError
from lfm2vl_jax.checkpoint.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors
from lfm2vl_jax.cli import main
from lfm2vl_jax.config import (
    BOOL,
    CONFIG_KEYS,
    TEXT_CONFIG_KEYS,
    ConfigError,
    RuntimeConfig,
    config_from_dict,
    config_to_dict,
)
from lfm2vl_jax.errors import Lfm2VlError
from lfm2vl_jax.inference.sampling import MIN_TEMPERATURE, SamplingParams
from lfm2vl_jax.inputs import OptionError
from lfm2vl_jax.processing.image_processor import ProcessorError
from lfm2vl_jax.processing.processor import Lfm2VlProcessor
from lfm2vl_jax.training.data import DataError
from lfm2vl_jax.training.data import _image_size as image_size

PROMPT = np.array([[1, 5, 9, 13, 17, 21]])
W1 = "model.language_model.layers.0.feed_forward.w1.weight"


# Non-finite checkpoint tensors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, dtype, message",
    [
        (np.nan, np.float32, "holds 1 NaN and 0 infinite values"),
        (-np.inf, np.float32, "holds 0 NaN and 1 infinite values"),
        (np.nan, ml_dtypes.bfloat16, "holds 1 NaN and 0 infinite values"),
    ],
)
def test_a_non_finite_tensor_is_named_with_its_file(tiny, tmp_path, bad, dtype, message):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    weights = np.ones((64, 32), dtype)
    weights[3, 7] = bad
    replace_tensor(directory / "model.safetensors", W1, weights)
    expected = f"tensor '{W1}' in {directory / 'model.safetensors'} {message}"
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    with pytest.raises(CheckpointError, match="check_finite=False"):
        load_hf_checkpoint(directory, progress=False)
    # the check can be skipped: the damaged value is loaded as it is
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False, check_finite=False)
    assert sum(int((~np.isfinite(np.asarray(leaf))).sum()) for leaf in jax.tree.leaves(model.params)) == 1


def test_values_beyond_the_params_dtype_are_named(tiny, tmp_path):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    replace_tensor(directory / "model.safetensors", W1, np.full((64, 32), 1e5, np.float32))
    with pytest.raises(CheckpointError, match=f"'{W1}' .* values up to 1e\\+05, beyond the range of float16"):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=jnp.float16, progress=False)
    Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=jnp.bfloat16, progress=False)


def test_check_finite_must_be_a_boolean(tiny):
    with pytest.raises(Lfm2VlError, match="check_finite must be True or False, got 'no'"):
        Lfm2VlForConditionalGeneration.from_pretrained(tiny, progress=False, check_finite="no")
    with pytest.raises(CheckpointError, match="check_finite must be True or False, got 1"):
        load_hf_checkpoint(tiny, progress=False, check_finite=1)


# Seeds: 64 bits --------------------------------------------------------------------------------------------


def test_seeds_differing_above_bit_32_sample_differently(model):
    def sample(seed: int) -> list[int]:
        options = {"do_sample": True, "temperature": 3.0, "eos_token_id": []}
        return model.generate(PROMPT, max_new_tokens=8, seed=seed, **options)[0].tolist()

    assert sample(0) != sample(2**32)
    assert sample(-1) == sample(2**64 - 1) != sample(2**32 - 1)  # negative: two's complement
    assert sample(5) == sample(5)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_beyond_64_bits_are_refused_by_name(model, seed):
    expected = rf"seed must be an integer in \[-{2**63}, {2**64 - 1}\], got {seed}"
    with pytest.raises(OptionError, match=expected):
        model.generate(PROMPT, max_new_tokens=4, seed=seed)


# Sampling options: temperature minimum, options without do_sample, generation_config.json lengths ---------


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 9e-6])
def test_temperatures_below_the_minimum_are_refused(model, temperature):
    with pytest.raises(
        OptionError, match=rf"temperature must be a finite number >= 1e-05 .*got {temperature}"
    ):
        model.generate(PROMPT, max_new_tokens=2, do_sample=True, temperature=temperature)
    with pytest.raises(Lfm2VlError, match="temperature"):
        SamplingParams(do_sample=True, temperature=temperature)


def test_the_smallest_temperature_samples_the_most_likely_tokens(model):
    greedy = model.generate(PROMPT, max_new_tokens=6, eos_token_id=[])
    for seed in (0, 1, 2**40):
        options = {"do_sample": True, "temperature": MIN_TEMPERATURE, "seed": seed, "eos_token_id": []}
        assert model.generate(PROMPT, max_new_tokens=6, **options).tolist() == greedy.tolist()


@pytest.fixture()
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(options_module, "WARNED_IGNORED", set())


def test_sampling_options_without_do_sample_warn_once(model, fresh_warnings):
    with pytest.warns(
        UserWarning, match=r"do_sample is not set to True, so temperature=0\.5 will be ignored"
    ):
        first = model.generate(PROMPT, max_new_tokens=3, temperature=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = model.generate(PROMPT, max_new_tokens=3, temperature=0.7)  # once per set of options
        model.generate(PROMPT, max_new_tokens=3, do_sample=False)  # nothing set: nothing to say
        model.generate(PROMPT, max_new_tokens=3, top_k=50)  # transformers' default: not "set"
    assert first.tolist() == second.tolist() == model.generate(PROMPT, max_new_tokens=3).tolist()
    with pytest.warns(UserWarning, match=r"top_k=5, top_p=0\.9, min_p=0\.1 will be ignored.* unset top_k"):
        model.generate(PROMPT, max_new_tokens=3, top_k=5, top_p=0.9, min_p=0.1, do_sample=False)


def test_generation_config_sampling_options_warn_unless_greedy_was_chosen(model, fresh_warnings):
    """transformers' rule: a value from generation_config.json warns when the caller did not choose
    do_sample either; a caller's explicit do_sample=False means the file's values are meant for others."""
    configured = Lfm2VlForConditionalGeneration(model.config, model.params, {"temperature": 0.3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configured.generate(PROMPT, max_new_tokens=2, do_sample=False)
    with pytest.warns(UserWarning, match="temperature=0.3 will be ignored"):
        configured.generate(PROMPT, max_new_tokens=2)


def test_generation_config_lengths_are_honoured_when_the_caller_gives_none(model):
    def new_tokens(generation_config: dict, **kwargs) -> int:
        configured = Lfm2VlForConditionalGeneration(
            model.config, model.params, {"eos_token_id": [], **generation_config}
        )
        return configured.generate(PROMPT, **kwargs).shape[1]

    assert new_tokens({"max_new_tokens": 5}) == 5
    assert new_tokens({"max_new_tokens": 5}, max_new_tokens=3) == 3
    assert new_tokens({"max_length": 10}) == 4  # prompt and new tokens, as transformers counts
    assert new_tokens({"max_length": 10, "max_new_tokens": 2}) == 2
    with pytest.raises(OptionError, match="max_new_tokens=128: the prompt's 6 tokens"):  # the default, 128
        new_tokens({})  # (over the tiny model's 64 positions)
    with pytest.raises(OptionError, match=r"generation_config\.json: max_length=6 .* the prompt's 6 tokens"):
        new_tokens({"max_length": 6})
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": "5"}, {"max_length": True}):
        with pytest.raises(
            OptionError, match=rf"generation_config\.json: {next(iter(bad))} must be an integer"
        ):
            new_tokens(bad)


# Options typed as booleans, and objects of the wrong type ---------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"scan_layers": "no"}, "runtime option scan_layers must be True or False, got 'no'"),
        ({"scan_layers": 1}, "runtime option scan_layers must be True or False, got 1"),
        ({"mesh": "data=2"}, "runtime option mesh must be a jax.sharding.Mesh .*got 'data=2'"),
        ({"runtime": "fast"}, "runtime must be a RuntimeConfig, got a str"),
        ({"progress": "no"}, "progress must be True or False, got 'no'"),
    ],
)
def test_from_pretrained_arguments_of_the_wrong_type_are_named(tiny, arguments, message):
    with pytest.raises(ConfigError, match=message):
        Lfm2VlForConditionalGeneration.from_pretrained(tiny, **{"progress": False, **arguments})


@pytest.mark.parametrize(
    "field, value",
    [("scan_layers", "no"), ("attention", 3), ("remat", ["full"]), ("dtypes", "bfloat16"), ("rules", {})],
)
def test_runtime_config_fields_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"runtime option {field} must be"):
        RuntimeConfig(**{field: value})
    assert RuntimeConfig(scan_layers=np.bool_(False)).scan_layers is False


def with_json_value(source: Path, directory: Path, file: str, key: str, value: object) -> Path:
    """A copy of checkpoint `source` whose JSON `file` has `key` set to `value`."""
    copy_checkpoint(source, directory)
    content = json.loads((directory / file).read_text(encoding="utf-8"))
    (directory / file).write_text(json.dumps({**content, key: value}), encoding="utf-8")
    return directory


@pytest.mark.parametrize(
    "file, key, value",
    [
        ("processor_config.json", "use_image_special_tokens", "no"),
        ("tokenizer_config.json", "clean_up_tokenization_spaces", "false"),
        ("processor_config.json", "do_pad", "no"),
        ("preprocessor_config.json", "do_convert_rgb", "yes"),
    ],
)
def test_processor_settings_typed_as_booleans_take_only_booleans(checkpoint_450m, tmp_path, file, key, value):
    directory = with_json_value(checkpoint_450m, tmp_path / "ckpt", file, key, value)
    with pytest.raises(ProcessorError, match=f"{key} must be true or false, (got|not) '{value}'") as caught:
        Lfm2VlProcessor.from_pretrained(directory)
    assert file in str(caught.value)
    with pytest.raises(ProcessorError, match="use_image_special_tokens must be true or false, got 'no'"):
        Lfm2VlProcessor.from_pretrained(checkpoint_450m, use_image_special_tokens="no")


# Image paths must be regular files ------------------------------------------------------------------------

FIFO = "a FIFO (named pipe)"


@pytest.fixture()
def not_files(tmp_path) -> list[tuple[str, Path]]:
    """(kind, path): a FIFO (opening it would wait for a writer forever), a link to it, a directory, a
    device."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(fifo)
    return [
        (FIFO, fifo),
        (FIFO, tmp_path / "link.png"),
        ("a directory", tmp_path / "folder.png"),
        ("a device", Path("/dev/zero")),
    ]


@pytest.fixture()
def no_hang():
    """Fails the test instead of hanging it, should a FIFO be opened."""

    def hung(*args):
        raise TimeoutError("hung: an image path was opened")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_image_paths_that_are_not_regular_files_are_refused_by_name(processor, not_files, no_hang):
    for kind, path in not_files:
        expected = rf"image 0 \('{re.escape(str(path))}'\) is {re.escape(kind)}, not an image file"
        with pytest.raises(ProcessorError, match=expected):
            processor(images=[str(path)], text="<image>")
        conversation = [{"role": "user", "content": [{"type": "image", "path": str(path)}]}]
        with pytest.raises(ProcessorError, match=f"is {re.escape(kind)}, not an image file"):
            processor.apply_chat_template(conversation, tokenize=True)


def test_generate_cli_refuses_a_fifo_image_in_one_line(checkpoint_450m, not_files, no_hang, capsys):
    """The processor loads the images before the model: the checkpoint's processor files suffice."""
    fifo = str(not_files[0][1])
    argv = ["generate", "--model", str(checkpoint_450m), "--prompt", "hi", "--image", fifo]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is {FIFO}, not an image file" in err, err


def test_training_data_refuses_a_fifo_image(not_files, no_hang):
    for kind, path in not_files:
        with pytest.raises(DataError, match=f"is {re.escape(kind)}, not an image file"):
            image_size(str(path))


# Malformed files and arguments: one named error each, no traceback ------------------------------------------


def write_header(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.mark.parametrize(
    "header, message",
    [
        (b"[1, 2]", r"corrupt header \(a JSON list, not an object\)"),
        (b'"x"', r"corrupt header \(a JSON str, not an object\)"),
        (b"null", r"corrupt header \(a JSON NoneType, not an object\)"),
        (b"[" * 100_000 + b"]" * 100_000, "corrupt header"),
        (b'{"__metadata__": [1]}', "__metadata__ must map names to strings"),
        (b'{"t": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}', "'t' has a malformed header"),
        (b'{"t": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}', "'t' has a malformed header"),
        (b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, true]}}', "'t' has a malformed header"),
    ],
)
def test_safetensors_headers_that_are_not_objects_are_named(tmp_path, header, message):
    path = write_header(tmp_path / "model.safetensors", header)
    with pytest.raises(SafetensorsError, match=f"^{re.escape(str(path))}: .*{message}"):
        SafetensorsFile(path)


def test_a_checkpoint_whose_header_is_a_list_is_named_by_from_pretrained(tiny, tmp_path):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    write_header(directory / "model.safetensors", b"[]")
    with pytest.raises(SafetensorsError, match="model.safetensors: corrupt header"):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


@pytest.mark.parametrize(
    "name, error", [("config.json", ConfigError), ("generation_config.json", ConfigError)]
)
def test_deeply_nested_json_files_are_named(tiny, tmp_path, name, error):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    (directory / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(error, match=f"{re.escape(str(directory / name))} is not valid JSON"):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


@pytest.mark.parametrize("path", [123, None, "", b"/x"])
def test_a_checkpoint_path_of_the_wrong_type_is_named(path):
    with pytest.raises(CheckpointNotFoundError, match="must be a directory path or a hub id"):
        Lfm2VlForConditionalGeneration.from_pretrained(path, progress=False)
    with pytest.raises(CheckpointNotFoundError, match="must be a directory path or a hub id"):
        Lfm2VlProcessor.from_pretrained(path)


@pytest.mark.parametrize(
    "file, content, message",
    [
        (
            "preprocessor_config.json",
            b"[1, 2]",
            "preprocessor_config.json must hold a JSON object, not a list",
        ),
        ("processor_config.json", b'{"image_processor": [1]}', "image_processor must be an object"),
        ("processor_config.json", b"\xff\xfe{}", r"processor_config.json is not valid JSON \(UTF-8\)"),
        ("tokenizer_config.json", b"\xff", r"tokenizer_config.json is not valid JSON \(UTF-8\)"),
        ("chat_template.jinja", "{{ x }}\n".encode("utf-16"), "chat_template.jinja is not UTF-8 text"),
        ("chat_template.json", b'{"chat_template": [1]}', "chat_template must be a string or a list of"),
        ("chat_template.json", b'{"chat_template": 5}', "the chat template must be a string, got 5"),
    ],
)
def test_malformed_processor_files_are_named(checkpoint_450m, tmp_path, file, content, message):
    directory = copy_checkpoint(checkpoint_450m, tmp_path / "ckpt")
    if file == "chat_template.json":
        (directory / "chat_template.jinja").unlink(missing_ok=True)
    (directory / file).write_bytes(content)
    with pytest.raises(ProcessorError, match=message):
        Lfm2VlProcessor.from_pretrained(directory)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("pad_token", 5, "tokenizer_config.json: pad_token must be a token string, got 5"),
        ("eos_token", {"content": 5}, "tokenizer_config.json: eos_token must be a token string, got 5"),
        ("model_max_length", "512", "tokenizer_config.json: model_max_length must be a number, got '512'"),
    ],
)
def test_tokenizer_config_values_of_the_wrong_type_are_named(checkpoint_450m, tmp_path, key, value, message):
    directory = with_json_value(checkpoint_450m, tmp_path / "ckpt", "tokenizer_config.json", key, value)
    with pytest.raises(ProcessorError, match=re.escape(message)):
        Lfm2VlProcessor.from_pretrained(directory)


@pytest.mark.parametrize("role", [5, ["user"], {"name": "user"}])
def test_a_message_role_that_is_not_a_string_is_named(processor, role):
    with pytest.raises(ProcessorError, match="conversation 0, message 1: 'role' must be a string"):
        processor.apply_chat_template([{"role": "system", "content": "x"}, {"role": role, "content": "hi"}])


def test_text_holding_a_lone_surrogate_is_named(processor):
    with pytest.raises(ProcessorError, match=r"text 1 holds a lone surrogate '\\ud800' at character 3"):
        processor(text=["fine", "hi \ud800 there"])
    with pytest.raises(ProcessorError, match="lone surrogate"):
        conversation = [{"role": "user", "content": [{"type": "text", "text": "a\udc80"}]}]
        processor.apply_chat_template(conversation, tokenize=True)


@pytest.mark.parametrize(
    "argument, value", [("chunk", 0), ("workers", -1), ("prefill_batch", 0), ("slots", True), ("chunk", 2.0)]
)
def test_batch_engine_sizes_are_positive_integers(model, argument, value):
    """chunk=0 used to hang the engine (no decode step ever ran); workers=-1 was a ThreadPoolExecutor
    traceback."""
    with pytest.raises(Lfm2VlError, match=rf"^{argument} must be a positive integer, got {value!r}$"):
        model.batch_engine(**{argument: value})


def test_generation_config_must_be_a_dict(model):
    with pytest.raises(ConfigError, match="generation_config must be a dict, got a list"):
        Lfm2VlForConditionalGeneration(model.config, model.params, [("max_new_tokens", 5)])


# Property tests: any header, any config value -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
header_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "I8", "F8", 5, None]),
        "shape": st.lists(st.integers(-2, 4) | json_values, max_size=3),
        "data_offsets": st.lists(st.integers(-2, 64) | json_values, max_size=3),
    },
)


@settings(deadline=None, derandomize=True, max_examples=300, suppress_health_check=list(HealthCheck))
@given(
    header=json_values
    | st.dictionaries(st.sampled_from(["t", "u", "__metadata__"]), header_entries | json_values),
    data=st.binary(max_size=64),
)
def test_any_safetensors_header_is_read_or_named(tmp_path, header, data):
    path = tmp_path / "model.safetensors"
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    try:
        file = SafetensorsFile(path)
        for name in file.keys():  # noqa: SIM118 (not a dict)
            assert file.read(name).shape == file.shape(name)
    except SafetensorsError as error:
        assert str(error).startswith(f"{path}: ")


BOOLEAN_KEYS = [key for key, rule in CONFIG_KEYS.items() if rule is BOOL] + [
    f"text_config.{key}" for key, rule in TEXT_CONFIG_KEYS.items() if rule is BOOL
]


@settings(deadline=None, derandomize=True, max_examples=200)
@given(key=st.sampled_from(BOOLEAN_KEYS), value=json_values)
def test_config_keys_typed_as_booleans_take_only_booleans(key, value):
    raw = config_to_dict(tiny_config())
    *parents, name = key.split(".")
    target = raw[parents[0]] if parents else raw
    target[name] = value
    if isinstance(value, bool):
        config_from_dict(raw)
    else:
        with pytest.raises(ConfigError, match=f"^config.json: {re.escape(key)} must be true or false"):
            config_from_dict(raw)


# The CLI: seeds and generation_config.json lengths ----------------------------------------------------------


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, checkpoint_450m) -> Path:
    """The tiny model with the released vocabulary beside the stand-in tokenizer and processor files."""
    return write_cli_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", checkpoint_450m)


def test_generate_cli_names_a_seed_beyond_64_bits(cli_checkpoint, capsys):
    argv = ["generate", "--model", str(cli_checkpoint), "--prompt", "hi", "--seed", str(2**64)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"seed must be an integer in [-{2**63}, {2**64 - 1}], got {2**64}" in err


def test_generate_cli_takes_its_length_from_generation_config_json(cli_checkpoint, tmp_path, capsys):
    """No --max-new-tokens: the file's max_length counts the prompt too, and here leaves no room."""
    directory = copy_checkpoint(cli_checkpoint, tmp_path / "ckpt")
    (directory / "generation_config.json").write_text(json.dumps({"max_length": 3}), encoding="utf-8")
    assert main(["generate", "--model", str(directory), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json: max_length=3 (prompt and new tokens) leaves no room" in err, err


def test_a_config_stating_more_layers_than_the_checkpoint_holds_is_refused_at_once(tiny, tmp_path):
    """Before the tensor table and layer plan (which grow with the stated depth) are built."""
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    del raw["text_config"]["layer_types"]
    for layers, error, message in [
        (
            100_000,
            CheckpointError,
            "text_config states 100000 layers, but the checkpoint holds tensors for 3",
        ),
        (10**9, ConfigError, "num_hidden_layers 1000000000 is above the 1000000 layers supported"),
    ]:
        raw["text_config"]["num_hidden_layers"] = layers
        (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
        begin = time.perf_counter()
        with pytest.raises(error, match=message):
            Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
        assert time.perf_counter() - begin < 10


def test_a_vision_tower_without_tensors_is_refused_before_its_stated_depth_is_walked(tiny, tmp_path):
    directory = copy_checkpoint(tiny, tmp_path / "ckpt")
    weights = SafetensorsFile(directory / "model.safetensors")
    kept = [name for name in weights.keys() if ".encoder.layers." not in name]  # noqa: SIM118
    layout = [(name, weights.dtype(name), weights.shape(name)) for name in kept]
    arrays = [weights.read(name) for name in kept]
    write_safetensors(directory / "model.safetensors", layout, arrays)
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    raw["vision_config"]["num_hidden_layers"] = 10**8
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    begin = time.perf_counter()
    with pytest.raises(
        CheckpointError, match="vision_config states 100000000 layers, but the checkpoint holds"
    ):
        Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    assert time.perf_counter() - begin < 10


@pytest.mark.parametrize("option", ["use_image_special_tokens", "truncation"])
def test_processor_call_options_typed_as_booleans_take_only_booleans(processor, option):
    with pytest.raises(ProcessorError, match=f"^{option} must be true or false, got 'no'$"):
        processor(text="hello", **{option: "no"})
