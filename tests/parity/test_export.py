"""Export: our params back to transformers checkpoints, orbax checkpoints, the conversion CLIs, and every
way a write can go wrong.

The reference is transformers itself: its `save_pretrained` writes the source checkpoints (random weights
of realistic scale), its safetensors reader (`safetensors`, torch backend) reads both sides of each
comparison, and its `from_pretrained` loads what we export.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_models import (
    REFERENCE_CONFIGS,
    REPO,
    build_reference,
    prompt_with_images,
    random_images,
    randomize_weights,
    reference_logits,
    tiny_config,
)
from safetensors import safe_open
from transformers import GenerationConfig
from transformers import Lfm2VlConfig as HfConfig
from transformers import Lfm2VlForConditionalGeneration as HfModel

import lfm2vl_jax.checkpoint.export as export
from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.export import ExportError, parse_size, save_hf_checkpoint
from lfm2vl_jax.checkpoint.hf import load_hf_checkpoint
from lfm2vl_jax.checkpoint.orbax import load_orbax_checkpoint, save_orbax_checkpoint
from lfm2vl_jax.config import DTypePolicy, RuntimeConfig
from lfm2vl_jax.processing.processor import Lfm2VlProcessor

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hf_to_orbax = load_script("hf_to_orbax")
orbax_to_hf = load_script("orbax_to_hf")


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (all its .safetensors files), read by `safetensors`."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    return tensors


def assert_bit_exact(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for key, expected in reference.items():
        got = ours[key]
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), key
        assert torch.equal(got.flatten().view(torch.uint8), expected.flatten().view(torch.uint8)), key


def side_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in directory.iterdir()
        if p.is_file() and p.name != "config.json" and not p.name.startswith("model")
    }


def leftovers(parent: Path) -> list[str]:
    """Staging or moved-aside directories left beside the targets."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def saved_reference(directory: Path, dtype: str, seed: int, processor_files: Path) -> HfModel:
    """A tiny model saved by transformers, with the processor files of a real checkpoint beside it."""
    reference = build_reference(tiny_config(), seed=seed, dtype=TORCH_DTYPES[dtype])
    reference.save_pretrained(directory)
    for path in processor_files.iterdir():
        shutil.copyfile(path, directory / path.name)
    return reference


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def source(request, tmp_path_factory, checkpoint_450m) -> tuple[Path, HfModel, str]:
    directory = tmp_path_factory.mktemp(f"source-{request.param}")
    return directory, saved_reference(directory, request.param, 3, checkpoint_450m), request.param


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    directory, _, dtype = source
    model = Lfm2VlForConditionalGeneration.from_pretrained(directory, dtype=dtype, progress=False)
    out = tmp_path_factory.mktemp(f"exported-{dtype}") / "out"
    return model.save_pretrained(out, source_dir=directory, progress=False)


@pytest.fixture(scope="module")
def fp32_source(tmp_path_factory, checkpoint_450m) -> tuple[Path, HfModel]:
    directory = tmp_path_factory.mktemp("fp32-source")
    return directory, saved_reference(directory, "float32", 4, checkpoint_450m)


def test_round_trip_is_bit_exact_with_files_carried_over(source, exported):
    directory, _, dtype = source
    assert_bit_exact(read_tensors(exported), read_tensors(directory))
    with safe_open(exported / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["dtype"]) == ("lfm2_vl", dtype)
    # Processor, tokenizer, chat template and the generation config come over byte for byte.
    assert side_files(exported) == side_files(directory)
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(side_files(exported))


def test_export_loads_in_transformers_with_the_same_logits(source, exported):
    """No missing or unexpected keys, and transformers' logits from the export equal its logits from the
    original checkpoint exactly (same weights, same code). In float32 ours agree too: relative error
    (max |diff| / max |reference|) <= 1e-5, the parity tests' bound for summation-order differences; a
    wrong weight moves logits by O(1)."""
    directory, reference, dtype = source
    torch_dtype = TORCH_DTYPES[dtype]
    loaded, info = HfModel.from_pretrained(exported, dtype=torch_dtype, output_loading_info=True)
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    assert loaded.dtype == torch_dtype
    config = reference.config
    inputs = random_images(config, [(4, 6), (8, 8)], max_patches=64, seed=1)
    inputs["input_ids"] = prompt_with_images(config, [3, (4, 6), 7, (8, 8), 5], seed=1)[None]
    expected = reference_logits(HfModel.from_pretrained(directory, dtype=torch_dtype).eval(), inputs)
    np.testing.assert_array_equal(reference_logits(loaded.eval(), inputs), expected)
    if dtype == "float32":
        ours = Lfm2VlForConditionalGeneration.from_pretrained(exported, progress=False)(**inputs).logits
        assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() <= 1e-5


def test_sharded_export_loads_in_transformers_and_ours(fp32_source, tmp_path):
    directory, reference = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    out = save_hf_checkpoint(tmp_path / "out", config, params, max_shard_size="100KB", progress=False)

    original = read_tensors(directory)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and sorted(index["weight_map"]) == sorted(
        original
    )
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for name in shards:  # at most 100 kB each, unless a single tensor is larger
        with safe_open(out / name, framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
        assert len(sizes) == 1 or sum(np.prod(s) * 4 for s in sizes) <= 100_000
    assert_bit_exact(read_tensors(out), original)

    _, reloaded = load_hf_checkpoint(out, progress=False)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)
    loaded, info = HfModel.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_per_layer_layout_exports_and_restores_the_same(fp32_source, tmp_path):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, RuntimeConfig(scan_layers=False), progress=False)
    exported = save_hf_checkpoint(tmp_path / "hf", config, params, progress=False)
    assert_bit_exact(read_tensors(exported), read_tensors(directory))
    save_orbax_checkpoint(tmp_path / "orbax", config, params)
    _, restored = load_orbax_checkpoint(tmp_path / "orbax")
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, restored, params)


def test_cli_round_trip_hf_orbax_hf(source, tmp_path, capsys):
    """In the checkpoint's own dtype throughout, unless asked otherwise."""
    directory, _, dtype = source
    orbax_dir, out = tmp_path / "orbax", tmp_path / "hf"
    assert hf_to_orbax.main([str(directory), str(orbax_dir), "--quiet"]) == 0
    config, params = load_hf_checkpoint(directory, uniform(dtype, scan_layers=False), progress=False)
    restored_config, restored = load_orbax_checkpoint(orbax_dir)
    assert restored_config == config
    assert jax.tree.structure(restored) == jax.tree.structure(params)  # lists stay lists
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))  # on the device, not numpy
    assert [x.dtype for x in jax.tree.leaves(restored)] == [x.dtype for x in jax.tree.leaves(params)]
    jax.tree.map(np.testing.assert_array_equal, restored, params)

    assert orbax_to_hf.main([str(orbax_dir), str(out), "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_bit_exact(read_tensors(out), read_tensors(directory))
    assert side_files(orbax_dir) == side_files(directory) == side_files(out)


def test_cli_script_casts_to_bfloat16_as_torch_rounds(fp32_source, tmp_path):
    """`python convert/hf_to_orbax.py ... --dtype bfloat16` runs as a script; the bf16 weights that come back
    are torch's round-to-nearest-even of the fp32 originals."""
    directory, reference = fp32_source
    command = [
        sys.executable,
        "convert/hf_to_orbax.py",
        str(directory),
        str(tmp_path / "orbax"),
        "--dtype",
        "bfloat16",
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert orbax_to_hf.main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--quiet"]) == 0
    expected = {key: value.to(torch.bfloat16) for key, value in read_tensors(directory).items()}
    assert_bit_exact(read_tensors(tmp_path / "hf"), expected)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_real_450m_shapes_round_trip(tmp_path):
    """The released 450M config, random weights saved in bfloat16 (as released) by transformers: every tensor
    comes back bit for bit and transformers loads the export with no missing or unexpected keys."""
    raw = json.loads((REFERENCE_CONFIGS / "lfm2-vl-450m" / "config.json").read_text())
    config = HfConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    reference = randomize_weights(HfModel(config).float(), seed=0).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "source")
    del reference
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        tmp_path / "source", dtype=jnp.bfloat16, progress=False
    )
    model.save_pretrained(tmp_path / "out", progress=False)
    del model
    assert_bit_exact(read_tensors(tmp_path / "out"), read_tensors(tmp_path / "source"))
    _, info = HfModel.from_pretrained(tmp_path / "out", dtype=torch.bfloat16, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])


def test_generation_config_and_processor_without_a_source_directory(fp32_source, checkpoint_450m, tmp_path):
    directory, _ = fp32_source
    loaded = Lfm2VlForConditionalGeneration.from_pretrained(directory, progress=False)
    # By default the files of the directory a model was loaded from are carried over...
    carried = loaded.save_pretrained(tmp_path / "carried", progress=False)
    source_files = sorted(p.name for p in directory.iterdir() if not p.name.endswith(".safetensors"))
    for name in source_files:
        if name != "config.json":
            assert (carried / name).read_bytes() == (directory / name).read_bytes(), name
    # ...a model made from params alone has none to carry.
    model = Lfm2VlForConditionalGeneration(loaded.config, loaded.params)
    model.generation_config = {"do_sample": True, "temperature": 0.3, "min_p": 0.15, "eos_token_id": 7}
    processor = Lfm2VlProcessor.from_pretrained(checkpoint_450m)
    out = model.save_pretrained(tmp_path / "out", processor=processor, progress=False)

    assert GenerationConfig.from_pretrained(out).to_diff_dict() | {"transformers_version": None} == (
        GenerationConfig(**model.generation_config).to_diff_dict() | {"transformers_version": None}
    )
    reloaded = Lfm2VlProcessor.from_pretrained(out)
    text = "<|im_start|>user\nDescribe <image> in detail.<|im_end|>\n"
    image = np.full((40, 60, 3), 128, np.uint8)
    for key, value in processor(images=[image], text=text).items():
        np.testing.assert_array_equal(reloaded(images=[image], text=text)[key], value, err_msg=key)

    model.generation_config = {}
    bare = model.save_pretrained(tmp_path / "bare", progress=False)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_existing_target_is_refused_unless_overwrite(fp32_source, tmp_path, capsys):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # a user's file is never replaced
        with pytest.raises(ExportError, match="target holds files that are not part of a checkpoint"):
            save_hf_checkpoint(target, config, params, overwrite=overwrite, progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert orbax_to_hf.main([str(directory), str(target), "--quiet"]) == 2  # refused before reading SRC
    assert hf_to_orbax.main([str(directory), str(target), "--quiet"]) == 2
    assert "--keep-other-files" in capsys.readouterr().err

    save_hf_checkpoint(target, config, params, keep_other_files=True, progress=False)
    with pytest.raises(ExportError, match="target already exists.*overwrite"):
        save_hf_checkpoint(target, config, params, keep_other_files=True, progress=False)
    save_hf_checkpoint(target, config, params, overwrite=True, keep_other_files=True, progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]
    assert (target / "keep.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    save_hf_checkpoint(tmp_path / "empty", config, params, progress=False)  # an empty directory is fine
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("crash", [OSError, KeyboardInterrupt], ids=lambda e: e.__name__)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_crash_midway_leaves_no_partial_checkpoint(fp32_source, tmp_path, monkeypatch, crash, existing):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    target = tmp_path / "target"
    if existing:
        save_hf_checkpoint(target, config, params, dtype="bfloat16", progress=False)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if existing else None
    partial = []
    write = export.write_safetensors

    def crashing_write(path, layout, arrays, metadata=None):
        def some_then_crash():
            for i, array in enumerate(arrays):
                if i == len(layout) // 2:
                    partial.append((path, path.stat().st_size))
                    raise crash("simulated crash")
                yield array

        write(path, layout, some_then_crash(), metadata)

    monkeypatch.setattr(export, "write_safetensors", crashing_write)
    with pytest.raises(crash, match="simulated crash"):
        save_hf_checkpoint(target, config, params, overwrite=True, progress=False)
    ((path, size),) = partial
    assert size > 0 and not path.exists()  # a half-written file existed, and is gone
    assert leftovers(tmp_path) == []
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    else:
        assert not target.exists()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (flip_last_byte, "tensor '{last}' reads back different"),
        (truncate, r"model\.safetensors: truncated file"),
    ],
    ids=["flipped-bit", "truncated"],
)
def test_verification_catches_a_bad_write(fp32_source, tmp_path, monkeypatch, corrupt, message):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    write = export.write_safetensors

    def corrupting_write(path, layout, arrays, metadata=None):
        write(path, layout, arrays, metadata)
        corrupt(path)

    monkeypatch.setattr(export, "write_safetensors", corrupting_write)
    last = max(read_tensors(directory))  # tensors are written in key order: the last one ends the file
    with pytest.raises(ExportError, match=message.format(last=last.replace(".", r"\."))):
        save_hf_checkpoint(tmp_path / "out", config, params, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_verification_catches_a_missing_tensor(fp32_source, tmp_path, monkeypatch):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    write = export.write_safetensors

    def dropping_write(path, layout, arrays, metadata=None):
        arrays = iter(arrays)
        write(path, layout[1:], (array for i, array in enumerate(arrays, 1) if i > 1), metadata)

    monkeypatch.setattr(export, "write_safetensors", dropping_write)
    n = len(read_tensors(directory))
    with pytest.raises(ExportError, match=f"holds {n - 1} tensors, expected {n}; missing"):
        save_hf_checkpoint(tmp_path / "out", config, params, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors: truncated file"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json at all!"),
            "corrupt header",
        ),
    ],
    ids=["truncated", "corrupt-header"],
)
def test_bad_input_checkpoint_gives_one_error_naming_the_file(fp32_source, tmp_path, capsys, damage, message):
    directory, _ = fp32_source
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    damage(broken)
    assert hf_to_orbax.main([str(broken), str(tmp_path / "orbax"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"hf_to_orbax: error: {broken / 'model.safetensors'}") and message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_orbax_checkpoint_not_matching_its_config_is_refused(fp32_source, tmp_path, capsys):
    directory, _ = fp32_source
    config, params = load_hf_checkpoint(directory, progress=False)
    orbax_dir = save_orbax_checkpoint(tmp_path / "orbax", config, params)
    raw = json.loads((orbax_dir / "config.json").read_text())
    raw["text_config"]["vocab_size"] += 1
    (orbax_dir / "config.json").write_text(json.dumps(raw))
    assert orbax_to_hf.main([str(orbax_dir), str(tmp_path / "hf"), "--quiet"]) == 2
    assert "['text']['embed'] is stored as float32(512, 64), expected (513, 64)" in capsys.readouterr().err
    shutil.rmtree(orbax_dir / "params")
    with pytest.raises(ExportError, match="holds no orbax checkpoint"):
        load_orbax_checkpoint(orbax_dir)


def test_size_strings_as_transformers_reads_them():
    from transformers.utils.hub import convert_file_size_to_int

    for size in ["5GB", "50MB", "100KB", "3GiB", "7MiB", "12KiB", 1234]:
        assert parse_size(size) == convert_file_size_to_int(size), size
    for bad in ["5 parsecs", "GB", "-1", 0]:
        with pytest.raises(ExportError):
            parse_size(bad)


def uniform(dtype, scan_layers: bool = True) -> RuntimeConfig:
    return RuntimeConfig(dtypes=DTypePolicy.uniform(dtype), scan_layers=scan_layers)
