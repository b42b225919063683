"""Property-based tests: whatever a user passes to the processor or to `generate` (images of any size,
mode, dtype and layout; options of any type and value), the outcome is a valid result or an
`Lfm2VlError`; any other exception is a bug.

Examples are bounded so that the file runs in about half a minute; the values that pick compiled programs
(top_k, pad id, number of stop ids, loop) are drawn from small sets, everything else from wide ranges."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_checkpoints import write_tiny_checkpoint

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.errors import Lfm2VlError
from lfm2vl_jax.processing.image_processor import Lfm2VlImageProcessor

SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
PIL_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "La", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB",
             "RGBX", "RGBa")  # fmt: skip
DTYPES = ("uint8", "int8", "uint16", "int32", "int64", "float16", "float32", "float64", "bool", "complex64",
          "object")  # fmt: skip
VOCAB = 512

# Any value a user might pass by mistake.
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(-3, 600), max_size=3),
    st.sampled_from([np.int64(3), np.float32(0.5), np.array([1, 2]), object()]),
)


@st.composite
def mostly(draw, valid: st.SearchStrategy) -> object:
    """A valid value seven times in eight, anything otherwise."""
    return draw(anything if draw(st.integers(0, 7)) == 7 else valid)


# The processor --------------------------------------------------------------------------------------------


@st.composite
def images(draw) -> object:
    height, width = draw(st.integers(0, 80)), draw(st.integers(0, 80))
    if draw(st.booleans()):  # extreme aspect ratios
        height, width = draw(st.integers(1, 4)), draw(st.integers(100, 3000))
        if draw(st.booleans()):
            height, width = width, height
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        mode = draw(st.sampled_from(PIL_MODES))
        size = (max(width, 1), max(height, 1))
        rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        try:
            return rgb.convert(mode)
        except ValueError:  # modes Pillow cannot convert into: a blank image of that mode
            return Image.new(mode, size)
    channels = draw(st.sampled_from([1, 2, 3, 4, 5]))
    layout = draw(st.sampled_from(["HW", "HWC", "CHW", "N", "BHWC"]))
    shape = {"HW": (height, width), "HWC": (height, width, channels), "CHW": (channels, height, width),
             "N": (height,), "BHWC": (1, height, width, channels)}[layout]  # fmt: skip
    scale = draw(st.sampled_from([1.0, 255.0, -1.0, math.nan, math.inf]))
    with np.errstate(all="ignore"):
        return (rng.random(shape) * scale).astype(draw(st.sampled_from(DTYPES)))


@settings(SETTINGS, max_examples=300)
@given(image=images())
def test_processor_takes_any_image_or_names_the_problem(processor, image):
    try:
        out = processor(images=[image], text="Describe <image> please")
    except Lfm2VlError:
        return
    tiles = len(out["pixel_values"])
    assert out["pixel_values"].dtype == np.float32 and np.isfinite(out["pixel_values"]).all()
    assert out["pixel_attention_mask"].shape == out["pixel_values"].shape[:2] and out[
        "spatial_shapes"
    ].shape == (
        tiles,
        2,
    )
    assert (out["input_ids"] == processor.image_token_id).sum() == sum(
        (rows // 2) * (cols // 2) for rows, cols in out["spatial_shapes"]
    )


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.text(max_size=6),
        st.sampled_from(["user", "text", "image", "image_url", "<image>"]),
        st.just(np.zeros((8, 8, 3), np.uint8)),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["role", "content", "type", "text", "image", "url", "path", "base64", "image_url"]
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(SETTINGS, max_examples=200)
@given(conversation=json_values, tokenize=st.booleans())
def test_chat_template_takes_any_structure_or_names_the_problem(processor, conversation, tokenize):
    with contextlib.suppress(Lfm2VlError):
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=tokenize)


small_image = st.just(np.zeros((8, 8, 3), np.uint8))


@settings(SETTINGS, max_examples=200)
@given(
    text=st.one_of(
        st.text(max_size=20), st.lists(st.sampled_from(["<image>", "a", ""]), max_size=3), anything
    ),
    images=st.one_of(
        st.none(), small_image, st.lists(small_image, max_size=2), st.lists(st.lists(small_image))
    ),
    padding=st.sampled_from([True, "longest", "max_length", False, "x"]),
    max_length=st.one_of(st.none(), st.integers(-2, 30), anything),
    ids=st.one_of(anything, st.lists(st.lists(st.integers(-1, 70000), max_size=3), max_size=3)),
)
def test_processor_call_and_decode_take_anything_or_name_the_problem(
    processor, text, images, padding, max_length, ids
):
    with contextlib.suppress(Lfm2VlError):
        processor(images=images, text=text, padding=padding, max_length=max_length)
    with contextlib.suppress(Lfm2VlError):
        processor.batch_decode(ids, skip_special_tokens=True)


@settings(SETTINGS, max_examples=300)
@given(settings_=st.dictionaries(st.sampled_from(Lfm2VlImageProcessor.config_keys), anything, max_size=4))
def test_image_processor_settings_of_any_type_are_refused_or_work(settings_):
    try:
        image_processor = Lfm2VlImageProcessor.from_dict(settings_)
        out = image_processor([np.zeros((20, 30, 3), np.uint8)])
    except Lfm2VlError:
        return
    assert np.isfinite(out["pixel_values"]).all()


# generate -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Lfm2VlForConditionalGeneration:
    """Vocabulary 512, 64 positions, eos 7, pad 0."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
    return Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)


options = st.fixed_dictionaries(
    {"max_new_tokens": mostly(st.integers(1, 12))},
    optional={
        "do_sample": mostly(st.booleans()),
        "temperature": mostly(st.floats(1e-3, 1e3) | st.floats(0, 1e-3)),  # below 1e-5: refused
        "top_k": mostly(st.sampled_from([0, 5])),
        "top_p": mostly(st.floats(1e-3, 1.0)),
        "min_p": mostly(st.floats(0.0, 1.0)),
        "repetition_penalty": mostly(st.floats(1e-2, 1e2)),
        "eos_token_id": mostly(st.integers(0, VOCAB - 1)),
        "pad_token_id": mostly(st.just(0)),
        "stop_token_ids": mostly(st.just([])),
        "seed": mostly(st.integers(-(2**63), 2**64 - 1)),
        "loop": mostly(st.sampled_from([None, "host", "device"])),
    },
)


@settings(SETTINGS, max_examples=40)
@given(options=options)
def test_generate_takes_any_options_or_names_the_problem(model, options):
    try:
        tokens = model.generate(np.array([[1, 5, 9, 13, 17, 21]]), **options)
    except Lfm2VlError:
        return
    assert tokens.ndim == 2 and tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= options["max_new_tokens"]
    assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < VOCAB


@st.composite
def token_inputs(draw) -> dict:
    rows, length = draw(st.integers(1, 2)), draw(st.integers(1, 10))
    ids = draw(st.lists(st.integers(-2, VOCAB + 2), min_size=rows * length, max_size=rows * length))
    inputs = {
        "input_ids": np.array(ids).reshape(rows, length).astype(draw(st.sampled_from(["int32", "int64"])))
    }
    if draw(st.booleans()):
        mask = draw(st.lists(st.integers(0, 1), min_size=rows * length, max_size=rows * length))
        inputs["attention_mask"] = np.array(mask).reshape(rows, length)
    if draw(st.integers(0, 3)) == 0:  # a corrupted input
        name = draw(st.sampled_from(["input_ids", "attention_mask", "pixel_values", "spatial_shapes"]))
        inputs[name] = draw(
            anything | st.just(np.zeros((rows, length, 2))) | st.just(np.full((1, 16, 48), np.nan))
        )
    return inputs


@settings(SETTINGS, max_examples=40)
@given(inputs=token_inputs())
def test_generate_takes_any_inputs_or_names_the_problem(model, inputs):
    try:
        tokens = model.generate(**inputs, max_new_tokens=3)
    except Lfm2VlError:
        return
    assert tokens.shape[0] == len(inputs["input_ids"]) and 1 <= tokens.shape[1] <= 3
    assert tokens.min() >= 0 and tokens.max() < VOCAB


# JSONL request lines, results files and command-line options (issue 25) -----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
request_objects = st.fixed_dictionaries(
    {"id": st.text(max_size=4) | st.integers(0, 9) | json_values, "messages": json_values},
    optional={"max_new_tokens": json_values, "seed": json_values, "temperature": json_values},
)
request_lines = st.one_of(
    st.binary(max_size=40),  # any bytes: not UTF-8, not JSON, NUL, BOMs
    json_values.map(lambda v: json.dumps(v).encode()),
    request_objects.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    st.integers(50, 300).map(lambda depth: b"[" * depth + b"]" * depth),
)


@settings(SETTINGS, max_examples=200)
@given(lines=st.lists(request_lines, max_size=6))
def test_any_jsonl_line_is_a_request_or_an_error_record_for_it_alone(tmp_path_factory, lines):
    from lfm2vl_jax.inference.batch_io import BatchRequest, BatchResult, count_lines, read_requests

    path = tmp_path_factory.mktemp("lines") / "requests.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    items = list(read_requests(path, max_line_bytes=64))
    numbers = [number for number, _ in items]
    expected = [n for n, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1) if line.strip()]
    assert numbers == expected and len(items) == count_lines(path)  # one item per non-blank line
    for number, item in items:
        assert isinstance(item, (BatchRequest, BatchResult))
        if isinstance(item, BatchResult):
            assert item.finish_reason == "error" and item.error.startswith(f"line {number}: ")


result_lines = st.fixed_dictionaries(
    {"id": st.text(max_size=4) | st.integers(0, 9), "text": st.text(max_size=5)},
    optional={"finish_reason": st.sampled_from(["stop", "length", "error", "done"])},
).map(lambda v: json.dumps(v, ensure_ascii=False).encode())


@settings(SETTINGS, max_examples=150)
@given(
    content=st.lists(result_lines | request_lines, max_size=4).map(b"\n".join),
    torn=st.sampled_from([b"", b"\n", b'{"id": "x', b'{"id', b"garbage"]),
)
def test_resume_accepts_only_its_own_results_and_changes_nothing_before_opening(
    tmp_path_factory, content, torn
):
    from lfm2vl_jax.inference.batch_io import OutputFileError, ResultWriter

    path = tmp_path_factory.mktemp("results") / "results.jsonl"
    path.write_bytes(content + torn)
    try:
        writer = ResultWriter(path, resume=True)
    except OutputFileError:
        assert path.read_bytes() == content + torn
        return
    assert path.read_bytes() == content + torn
    data = content + torn
    complete = [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]
    for line in complete:
        assert json.loads(line)["finish_reason"] in ("stop", "length", "error")
    assert writer.done_ids == {json.loads(line)["id"] for line in complete}


batch_flags = st.fixed_dictionaries(
    {},
    optional={
        flag: st.integers(-(2**40), 2**40).map(str) | st.sampled_from(["0", "-1", "1", "2"])
        for flag in ("--slots", "--workers", "--prefill-batch", "--max-new-tokens", "--max-length",
                     "--max-line-bytes")
    },
)  # fmt: skip


@settings(SETTINGS, max_examples=60)
@given(
    flags=batch_flags,
    modes=st.sets(st.sampled_from(["--resume", "--overwrite"])),
    output=st.sampled_from(["new", "results", "input", "link", "other"]),
)
def test_batch_options_never_touch_a_file_before_every_check(tmp_path_factory, flags, modes, output):
    """With a model that does not exist, every run is refused (exit 2, one line) and no file changes,
    whatever the options, modes and output."""
    import io

    from lfm2vl_jax.cli import main

    directory = tmp_path_factory.mktemp("batch")
    requests = directory / "requests.jsonl"
    requests.write_text('{"id": 1, "messages": [{"role": "user", "content": "hi"}]}\n')
    (directory / "results").write_text('{"id": 0, "text": "", "finish_reason": "stop"}\n')
    (directory / "other").write_text("a user's notes\n")
    (directory / "link").symlink_to(requests)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    target = requests if output == "input" else directory / output
    argv = [
        "batch",
        "--model",
        str(directory / "no-model"),
        "--input",
        str(requests),
        "--output",
        str(target),
    ]
    argv += [*modes, "--quiet", *(part for item in flags.items() for part in item)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    assert err.getvalue().count("\n") == 1 and ": error: " in err.getvalue(), err.getvalue()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


@settings(SETTINGS, max_examples=150)
@given(
    options=st.dictionaries(
        st.sampled_from(["learning_rate", "weight_decay", "max_grad_norm", "lora_alpha", "peak_tflops",
                         "lr_multiplier", "resume", "skip_bad", "coordinator_timeout", "lora_rank"]),
        anything | st.sampled_from([math.nan, -math.inf, "vision=nan", "language=1e400", {"vision": 1e999}]),
        max_size=3,
    )
)  # fmt: skip
def test_training_options_are_finite_and_typed_or_refused(options):
    from lfm2vl_jax.training.config import SFTConfig

    try:
        config = SFTConfig(model="m", data="d", output="o", **options)
    except Lfm2VlError:
        return
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "lora_alpha"):
        value = getattr(config, name)
        assert not isinstance(value, bool) and math.isfinite(value), (name, value)
    assert all(math.isfinite(v) and v >= 0 for v in config.lr_multiplier.values())
    assert all(isinstance(config.__dict__[k], bool) for k in ("resume", "skip_bad"))
