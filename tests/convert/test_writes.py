"""Issue 17 item 3: ``sala convert --out`` writes through a temporary sibling, never deletes files it did not write,
refuses a non-empty folder without --force, leaves the old checkpoint intact when killed, and refuses NaN weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sala.convert import ConversionError, ConvertConfig, run_convert
from sala.model.checkpoint_io import CheckpointError
from sala.utils import fs


def _convert(src, out, **kw):
    return run_convert(ConvertConfig(source=str(src), out=str(out), sparse_layers=(0,), **kw))


def _foreign(out):
    """Files a user keeps in the folder: sala must never delete or change them."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.ones(3)}, str(out / "mine.safetensors"))
    (out / "notes.txt").write_text("keep me\n")


def _foreign_intact(out):
    return torch.equal(load_file(str(out / "mine.safetensors"))["x"], torch.ones(3)) and \
        (out / "notes.txt").read_text() == "keep me\n"


def test_non_empty_out_is_refused_without_force(sources, tmp_path):
    out = tmp_path / "o"
    _foreign(out)
    with pytest.raises(ValueError, match=r"output folder .* is not empty \(2 entries: mine.safetensors, notes.txt\).*--force"):
        _convert(sources["qwen2"], out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.safetensors", "notes.txt"] and _foreign_intact(out)


def test_force_keeps_files_sala_did_not_write(sources, tmp_path):
    """Before: every *.safetensors in --out was deleted, the user's included."""
    out = tmp_path / "o"
    _foreign(out)
    _convert(sources["qwen2"], out, force=True)
    assert _foreign_intact(out)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if fs.TMP_MARK in p.name]  # no temporary sibling left


def test_rewrite_removes_only_its_own_stale_shards(sources, tmp_path):
    out = tmp_path / "o"
    first = _convert(sources["qwen2"], out, max_shard_size="20KB")
    assert len(first.files) > 1
    _foreign(out)
    second = _convert(sources["qwen2"], out, force=True)  # one file now: the earlier shards and index are stale
    assert [f.name for f in second.files] == ["model.safetensors"]
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert _foreign_intact(out)
    written = json.loads((out / fs.MANIFEST).read_text())
    assert "model.safetensors" in written and "mine.safetensors" not in written


def test_killed_rewrite_leaves_the_old_checkpoint(sources, tmp_path, monkeypatch):
    """Before: the old weights were deleted first, and a kill mid-write left a .tmp shard and no model."""
    out = tmp_path / "o"
    _convert(sources["qwen2"], out, max_shard_size="20KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import sala.convert.inherit as inherit

    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill, mid-way through the shards
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(inherit, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _convert(sources["qwen2"], out, max_shard_size="20KB", seed=1, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if fs.TMP_MARK in p.name]


def test_stale_tmp_sibling_of_a_dead_process_is_removed(tmp_path):
    dead = tmp_path / f".o{fs.TMP_MARK}999999999-abcd"
    dead.mkdir()
    (dead / "part.safetensors.tmp").write_bytes(b"x")
    with fs.atomic_dir(tmp_path / "o") as work:
        (work / "a.txt").write_text("a")
    assert not dead.exists() and (tmp_path / "o" / "a.txt").read_text() == "a"


def test_nan_source_weights_are_refused(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["qwen2"], src)
    [f] = list(src.glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) with NaN/inf values: .*up_proj.weight \(1 of"):
        _convert(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    _convert(src, tmp_path / "o2", check_weights=False)  # the escape hatch writes it anyway


def test_select_layers_refuses_a_folder_with_other_files_before_any_work(sources, tmp_path):
    from sala.convert import SelectConfig, run_select_layers

    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match=r"not empty \(1 entries: notes.txt\).*--force"):
        run_select_layers(SelectConfig(source=str(sources["qwen2"]), out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
