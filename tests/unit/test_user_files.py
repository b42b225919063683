"""Nothing of a user's is destroyed (issue 25): `overwrite` replaces a checkpoint's own files only, never
a user's; a file in the way of a directory is refused; `lfm2vl batch` checks every option, path and the
model before opening its output, never writes onto its input, and `--resume` reads and checks a file
before changing a byte of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoints import snapshot

from lfm2vl_jax import Lfm2VlForConditionalGeneration
from lfm2vl_jax.checkpoint.export import ExportError
from lfm2vl_jax.checkpoint.orbax import hf_to_orbax, orbax_to_hf
from lfm2vl_jax.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def model(tiny) -> Lfm2VlForConditionalGeneration:
    return Lfm2VlForConditionalGeneration.from_pretrained(tiny, progress=False)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and "Traceback" not in err, err
    return err


def user_files(directory: Path) -> dict[str, str]:
    (directory / "notes").mkdir(parents=True)
    (directory / "notes" / "todo.txt").write_text("mine")
    (directory / "train.jsonl").write_text('{"precious": true}\n')
    return {"notes/todo.txt": "mine", "train.jsonl": '{"precious": true}\n'}


def assert_kept(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (directory / name).read_text() == text, name


# overwrite replaces our files, never a user's ------------------------------------------------------------


def test_save_refuses_a_directory_holding_a_users_files_even_with_overwrite(model, tmp_path):
    target = tmp_path / "out"
    files = user_files(target)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"not part of a checkpoint \(notes, train.jsonl\).*--keep-"):
            model.save_pretrained(target, overwrite=overwrite, progress=False)
    assert snapshot(tmp_path) == before

    model.save_pretrained(target, keep_other_files=True, progress=False)  # written beside them
    assert_kept(target, files)
    assert {"config.json", "model.safetensors"} <= {p.name for p in target.iterdir()}
    # Again, over its own checkpoint: the checkpoint files need overwrite, the user's stay.
    with pytest.raises(ExportError, match="already exists; pass overwrite=True"):
        model.save_pretrained(target, keep_other_files=True, progress=False)
    model.save_pretrained(
        target, overwrite=True, keep_other_files=True, max_shard_size=30_000, progress=False
    )
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names  # stale file gone
    assert_kept(target, files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
    reloaded = Lfm2VlForConditionalGeneration.from_pretrained(target, progress=False)
    assert reloaded.config == model.config


def test_overwrite_replaces_a_checkpoint_dropping_its_stale_shards(model, tmp_path):
    target = tmp_path / "out"
    model.save_pretrained(target, max_shard_size=30_000, progress=False)
    assert len(list(target.glob("model-*.safetensors"))) > 1
    model.save_pretrained(target, overwrite=True, progress=False)
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names)


@pytest.mark.parametrize("kind", ["file", "link"])
def test_something_in_the_way_of_the_directory_is_refused(model, tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("a user's file")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    expected = "a file, not a directory" if kind == "file" else "a symbolic link"
    with pytest.raises(ExportError, match=f"{target} is {expected}; refusing to replace it"):
        model.save_pretrained(target, overwrite=True, keep_other_files=True, progress=False)
    assert snapshot(tmp_path) == before


def test_convert_refuses_a_users_directory_before_reading_and_keeps_files_when_told(tiny, tmp_path, capsys):
    target = tmp_path / "out"
    files = user_files(target)
    before = snapshot(tmp_path)
    for direction in ("hf-to-orbax", "orbax-to-hf"):
        assert main(["convert", direction, str(tiny), str(target), "--overwrite", "--quiet"]) == 2
        assert "--keep-other-files" in one_error_line(capsys)
    assert snapshot(tmp_path) == before
    argv = ["convert", "hf-to-orbax", str(tiny), str(target), "--keep-other-files", "--quiet"]
    assert main(argv) == 0
    assert_kept(target, files)
    assert (target / "params").is_dir()
    hf = orbax_to_hf(target, tmp_path / "hf", progress=False)
    with pytest.raises(ExportError, match="already exists"):
        hf_to_orbax(hf, target, keep_other_files=True, progress=False)
    hf_to_orbax(hf, target, overwrite=True, keep_other_files=True, progress=False)
    assert_kept(target, files)
