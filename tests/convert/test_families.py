"""Source families are rows of key tables and conventions (``adapters.FAMILIES``), not ``family ==`` branches
(issue 14 item 5)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sala.convert import adapters
from sala.convert.adapters import FAMILIES, Family, read_source

from .convert_sources import hf_source

CONVERT = Path(adapters.__file__).parent


def test_a_family_with_other_tensor_names_is_one_table_row(tmp_path, monkeypatch):
    """A Llama checkpoint whose MLP tensors are named w1/w3/w2 converts once its row says so."""
    src = hf_source(tmp_path / "src", "llama")
    renamed = dict(FAMILIES["llama"].layer_keys)
    for sala_name, ours in (("mlp.gate_proj.weight", "w1"), ("mlp.up_proj.weight", "w3"), ("mlp.down_proj.weight", "w2")):
        renamed[sala_name] = f"model.layers.{{}}.mlp.{ours}.weight"
    monkeypatch.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], layer_keys=renamed))
    spec = read_source(src)
    assert spec.source_key("model.layers.3.mlp.gate_proj.weight") == "model.layers.3.mlp.w1.weight"
    assert spec.source_key("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(adapters.SourceTensorError, match="missing"):  # the files still use the Llama names
        adapters.check_source_tensors(spec)


def test_family_conventions_come_from_the_row(tmp_path, monkeypatch):
    src = hf_source(tmp_path / "src", "llama")
    monkeypatch.setitem(FAMILIES, "llama", Family(name="llama", qk_norm=True, tied_by_default=True))
    spec = read_source(src)
    assert spec.qk_norm and "self_attn.q_norm.weight" in spec.layer_local_shapes()


def test_no_family_string_branches_in_convert():
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(CONVERT.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"family\s*(==|!=|in|not in)\s*[\"'(]", line)]
    assert hits == []


def test_every_supported_family_has_a_row():
    assert set(adapters.SUPPORTED_FAMILIES) == set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "minicpm"}
    assert {f.reference for f in FAMILIES.values()} == {"transformers", "minicpm"}
