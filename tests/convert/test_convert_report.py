"""What `sala convert` reports: parameter growth by kind, --context, held-out perplexity of source vs hybrid, and the
SmolLM2 geometry (9 heads / 3 KV heads: ALiBi slopes for a non-power-of-two, K/V expansion by 3)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import sala  # noqa: F401
from sala.cli import main
from sala.convert import ConvertConfig, read_source, run_convert
from sala.convert import heldout as heldout_mod
from sala.convert.adapters import sala_config
from sala.convert.heldout import HeldoutReport
from sala.convert.inherit import InitOptions, build_sala_model, expand_kv_heads, parameter_growth
from sala.convert.pipeline import parse_context
from sala.model.configuration_sala import mixer_schedule
from sala.ops import lightning_decay_slopes


@pytest.fixture(autouse=True)
def _builtin_text(monkeypatch):
    monkeypatch.setattr(heldout_mod, "_project_heldout", lambda: None)  # same text whether or not data/text exists


def test_parameter_growth_by_hand(sources):
    """Llama source: 4 layers, hidden 64, 4 heads / 2 KV heads of 16, q/k/v/o biases, vocab 320, MLP 96, untied."""
    spec = read_source(sources["llama"])
    g = parameter_growth(spec, sala_config(spec, mixer_schedule(4, (0, 3))))
    layer = 2 * 64 + (64 * 64 + 64) + 2 * (32 * 64 + 32) + (64 * 64 + 64) + 3 * 64 * 96
    assert g["source_params"] == 2 * 320 * 64 + 64 + 4 * layer == 165_184
    kv = 2 * ((4 - 2) * 16 * 64 + (4 - 2) * 16)  # k and v rows + biases for 2 more heads, per Lightning layer
    assert g["by_kind"] == {"kv_expansion": 2 * kv, "z_proj": 2 * 64 * 64, "o_gate": 2 * 64 * 64,
                            "norms": 2 * (16 + 16 + 64), "untied_lm_head": 0}
    assert g["converted_params"] == g["source_params"] + 2 * kv + 4 * 4096 + 192 == g["source_params"] + g["growth"]
    ref = AutoModelForCausalLM.from_pretrained(sources["llama"])
    assert ref.num_parameters() == g["source_params"]
    model = build_sala_model(spec, sala_config(spec, mixer_schedule(4, (0, 3))), InitOptions())
    assert sum(p.numel() for p in model.parameters()) == g["converted_params"]


def test_parameter_growth_tied_qwen3_untied(sources):
    """Qwen3 has q/k norms (inherited: only o_norm is new); untying adds a vocab x hidden lm_head."""
    spec = read_source(sources["qwen3_tied"])
    g = parameter_growth(spec, sala_config(spec, mixer_schedule(4, (0,)), tie_word_embeddings=False))
    D = spec.head_dim  # Qwen3Config's default 128 (not hidden / heads)
    assert g["by_kind"]["norms"] == 3 * 4 * D  # o_norm [heads * head_dim] in 3 Lightning layers
    assert g["by_kind"]["untied_lm_head"] == 320 * 64
    assert g["by_kind"]["kv_expansion"] == 3 * 2 * ((4 - 2) * D * 64)


def test_growth_in_summary_and_report(sources, tmp_path):
    res = run_convert(ConvertConfig(source=str(sources["llama"]), out=str(tmp_path / "o"), sparse_layers=(0, 3)))
    report = json.loads((tmp_path / "o" / "conversion.json").read_text())
    assert report["parameters"] == res.growth and report["parameters"]["growth"] == 8320 + 8192 + 8192 + 192
    text = res.summary()
    assert "params 165,184 -> 190,080 (+15.1%): kv_expansion +8,320, z_proj +8,192, o_gate +8,192, norms +192" in text
    assert "needs training (sala train) before use" in text  # said even without --verify


def test_parse_context():
    assert parse_context("32K") == 32768 and parse_context("1M") == 1 << 20 and parse_context("131072") == 131072
    assert parse_context("32k") == 32768 and parse_context(4096) == 4096
    with pytest.raises(ValueError, match=r"context must look like 32K, 1M or a token count; got 'lots'"):
        parse_context("lots")
    with pytest.raises(ValueError, match=r"context must look like"):
        ConvertConfig(source="x", out="y", sparse_layers=(0,), context="1T")


def test_context_sets_max_positions(sources, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sala.convert.pipeline"):
        run_convert(ConvertConfig(source=str(sources["qwen2"]), out=str(tmp_path / "keep"), sparse_layers=(0,)))
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["max_position_embeddings"] == 1024
    assert "kept from the source; the hybrid can be raised with --context" in caplog.text
    res = run_convert(ConvertConfig(source=str(sources["qwen2"]), out=str(tmp_path / "long"), sparse_layers=(0,),
                                    context="1M"))
    assert res.max_position_embeddings == 1 << 20
    ids, pos = torch.randint(3, 300, (1, 8)), torch.arange(1500, 1508)[None]  # past the source's 1024 positions
    with torch.no_grad():
        with pytest.raises(ValueError, match="exceeds max_position_embeddings=1024"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "keep")(input_ids=ids, position_ids=pos)
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "long")(input_ids=ids, position_ids=pos).logits
    assert torch.isfinite(logits).all()


def test_verify_reports_source_and_hybrid_perplexity(sources, tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["convert", "--from", str(sources["minicpm"]), "--out", str(out), "--sparse-layers", "0,3",
                 "--verify", "--device", "cpu", "--quiet", "--z-proj-init", "random"]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "conversion.json").read_text())["heldout"]
    assert report["text"] == "built-in text tail" and report["windows"] >= 1
    assert f"source {heldout_mod._fmt(report['source_ppl'])}" in text
    assert f"hybrid (untrained) {heldout_mod._fmt(report['hybrid_ppl'])}" in text
    assert "the weight mapping is right; this says nothing about the hybrid's quality" in text
    assert "pass" not in text.split("identity check")[1].split("\n")[0]  # no bare "pass" beside the hybrid
    assert report["needs_training"] == (report["ppl_ratio"] > 1.5)


def test_verify_text_file_and_catastrophic_warning(sources, tmp_path, monkeypatch):
    """A hybrid far worse than the source gets the warning; --text picks the held-out text."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 200))
    monkeypatch.setattr("sala.convert.pipeline.lm_loss", lambda model, windows: 9.0 if "SALA" in type(model).__name__ else 1.0)
    res = run_convert(ConvertConfig(source=str(sources["qwen2"]), out=str(tmp_path / "o"), sparse_layers=(0,),
                                    verify=True, device="cpu", text_files=(str(text),)))
    assert res.heldout.text == "t.txt tail" and res.heldout.needs_training
    line = res.summary().splitlines()[-1]
    ratio = math.exp(8.0)
    assert line.endswith(f"source 2.72, hybrid (untrained) 8,103 (x{ratio:,.0f}): the hybrid needs training "
                         "(sala train) before use"), line


def test_heldout_summary_formats():
    good = HeldoutReport(text="x", windows=2, window_len=512, source_loss=math.log(21.2), hybrid_loss=math.log(25.0))
    assert good.summary().endswith("source 21.2, hybrid (untrained) 25.0 (x1.18): within x1.5 of the source")
    bad = HeldoutReport(text="x", windows=2, window_len=512, source_loss=math.log(21.2), hybrid_loss=math.log(92437))
    assert bad.summary().endswith("source 21.2, hybrid (untrained) 92,437 (x4,360): the hybrid needs training "
                                  "(sala train) before use")
    assert bad.to_dict()["needs_training"] and not good.to_dict()["needs_training"]


def test_project_heldout_corpus_is_used_when_present(sources, tmp_path, monkeypatch):
    from sala.convert.probes import load_tokenizer

    corpus = tmp_path / "heldout.txt"
    corpus.write_text("first document about tokens.\n\f\nsecond document, longer. " * 100)
    monkeypatch.setattr(heldout_mod, "_project_heldout", lambda: corpus)
    windows, what = heldout_mod.heldout_windows(load_tokenizer(sources["qwen2"]), 320)
    assert what == "project held-out corpus heldout.txt" and windows.shape[1] == 512


def test_smollm2_geometry_slopes_and_kv_expansion():
    """9 Lightning heads: ALiBi's non-power-of-two rule (spec architecture.md §4.2): slopes(8) then every other
    slope of slopes(16), one of them; K/V expansion 3 -> 9 heads: head i takes KV head i // 3."""
    s = lightning_decay_slopes(9).tolist()
    assert s[:8] == [2.0 ** -(i + 1) for i in range(8)] and s[8] == pytest.approx(2.0 ** -0.5)
    w = torch.randn(3 * 64, 576, generator=torch.Generator().manual_seed(0))  # SmolLM2 k_proj: 3 KV heads of 64
    out = expand_kv_heads(w, 3, 9).reshape(9, 64, 576)
    for i in range(9):
        assert torch.equal(out[i], w.reshape(3, 64, 576)[i // 3])
    b = torch.arange(3 * 64.0)
    assert torch.equal(expand_kv_heads(b, 3, 9).reshape(9, 64)[5], b.reshape(3, 64)[1])
