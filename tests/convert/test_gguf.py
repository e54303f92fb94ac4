"""GGUF sources: materialised dense copy == the weights written (llama.cpp q/k order undone), the cache, and
`sala convert --from x.gguf` end to end; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import sala  # noqa: F401  (registers the Auto classes)
from sala.cli import main
from sala.convert import ConversionError, UnsupportedArchitectureError, read_source
from sala.convert import gguf as gguf_mod
from sala.convert.default_text import DEFAULT_TEXT
from tests.convert.convert_sources import gguf_source


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SALA_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny.gguf, reference state dict): 2 layers, hidden 48, 3 q heads / 1 kv head of 16, tied, vocab 320."""
    d = tmp_path_factory.mktemp("gguf")
    state = gguf_source(d / "tiny.gguf")
    return d / "tiny.gguf", state


def test_materialised_copy_equals_written_weights(tiny, tmp_path):
    file, ref = tiny
    spec = read_source(file)
    assert spec.family == "llama" and (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (3, 1, 16)
    assert spec.tie_word_embeddings and spec.rope_theta == 100000.0 and spec.max_position_embeddings == 1024
    assert spec.gguf["quant_type"] == "ALL_F32" and spec.gguf["architecture"] == "llama"
    assert spec.gguf["file"] == str(file.resolve()) and len(spec.gguf["sha256"]) == 64
    assert spec.path.parent == tmp_path / "cache" / "gguf"
    stored = load_file(str(spec.path / "model.safetensors"))
    assert set(stored) == set(ref)
    for k in ref:
        assert torch.equal(stored[k], ref[k]), k  # q/k permutation undone exactly, F32 round trip
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    tok = AutoTokenizer.from_pretrained(spec.path)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")  # eos from the GGUF, not transformers' bos mix-up
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    original = AutoTokenizer.from_pretrained(file.parent / ".tiny_tokenizer")
    assert tok(DEFAULT_TEXT[:400])["input_ids"] == original(DEFAULT_TEXT[:400])["input_ids"]
    assert (spec.path / "generation_config.json").exists()


def test_cache_is_reused_and_keyed_by_dtype(tiny, monkeypatch):
    file, _ = tiny
    first = read_source(file)
    calls = []
    monkeypatch.setattr(gguf_mod, "_write_entry", lambda *a: calls.append(a))
    assert read_source(file).path == first.path and not calls  # second read: the cached copy, no dequantisation
    monkeypatch.undo()
    monkeypatch.setenv("SALA_CACHE_DIR", str(first.path.parent.parent))
    half = read_source(file, gguf_dtype="bfloat16")
    assert half.path != first.path and half.torch_dtype == "bfloat16"
    assert not list(first.path.parent.glob(".tmp-*"))  # temporary directories renamed or removed


def test_failed_materialisation_leaves_no_entry(tiny, monkeypatch):
    def boom(file, tmp, dtype):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_mod, "_write_entry", boom)
    with pytest.raises(RuntimeError, match="killed"):
        read_source(tiny[0])
    assert not any(gguf_mod.cache_root().glob("*-float32")) and not any(gguf_mod.cache_root().glob(".tmp-*"))


def test_cli_convert_from_gguf_end_to_end(tiny, tmp_path, capsys):
    file, _ = tiny
    out = tmp_path / "hybrid"
    assert main(["convert", "--from", str(file), "--out", str(out), "--sparse-layers", "0,1", "--verify",
                 "--device", "cpu", "--quiet", "--context", "32K"]) == 0
    text = capsys.readouterr().out
    assert "source GGUF" in text and "ALL_F32" in text
    assert "the weight mapping is right; this says nothing about the hybrid's quality" in text
    report = json.loads((out / "conversion.json").read_text())
    assert report["source"] == str(file) and report["gguf"]["sha256"] == read_source(file).gguf["sha256"]
    assert report["identity_check"]["passed"] and report["identity_check"]["reference"].endswith("LlamaForCausalLM")
    assert report["max_position_embeddings"] == 32768 and report["source_max_position_embeddings"] == 1024
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32768
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "SALAForCausalLM"


def test_directory_with_one_gguf(tiny, tmp_path, capsys):
    d = tmp_path / "one"
    d.mkdir()
    (d / "model-q4.gguf").write_bytes(tiny[0].read_bytes())
    spec = read_source(d)
    assert spec.gguf["file"] == str((d / "model-q4.gguf").resolve())
    assert main(["select-layers", "--from", str(d), "--steps", "1", "--batch-size", "1", "--seq-len", "16",
                 "--probe-len", "48", "--recall-samples", "2", "--recall-queries", "2", "--lm-windows", "1",
                 "--device", "cpu", "--quiet"]) == 0
    assert "softmax layers [0, 1]" in capsys.readouterr().out


def test_directory_with_two_ggufs_lists_them(tiny, tmp_path, capsys):
    d = tmp_path / "two"
    d.mkdir()
    for name in ("a-Q4_K_M.gguf", "b-Q8_0.gguf"):
        (d / name).write_bytes(tiny[0].read_bytes())
    with pytest.raises(ConversionError, match=r"holds 2 .gguf files \(a-Q4_K_M.gguf, b-Q8_0.gguf\); pass the one"):
        read_source(d)
    assert main(["convert", "--from", str(d), "--out", str(tmp_path / "o"), "--sparse-layers", "0"]) == 2
    assert "a-Q4_K_M.gguf, b-Q8_0.gguf" in capsys.readouterr().err


def test_bad_magic(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ConversionError, match=r"is not a GGUF file: it starts with b'vers', a GGUF starts with b'GGUF'"):
        read_source(bad)
    assert main(["convert", "--from", str(bad), "--out", str(tmp_path / "o"), "--sparse-layers", "0"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    f = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"GGUF architecture 'gpt2' is not supported; convertible "
                                                           r"GGUF architectures: llama, mistral, qwen2, qwen3"):
        read_source(f)
    assert not any(gguf_mod.cache_root().glob("*-float32"))  # refused before dequantising anything
