"""`sala convert` and `sala select-layers` from the command line, end to end on tiny sources."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import sala  # noqa: F401  (registers the Auto classes)
from sala.cli import main


def test_cli_convert_with_verify_writes_loadable_hybrid(sources, tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert main(["convert", "--from", str(sources["qwen3"]), "--out", str(out), "--sparse-layers", "0,3",
                 "--verify", "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "identity check" in text and "the weight mapping is right" in text and "held-out ppl" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mixer_types"] == ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 20))).logits).all()


def test_cli_select_layers_and_convert_auto(sources, tmp_path, capsys):
    common = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--probe-len", "64", "--recall-samples", "2",
              "--lm-windows", "2", "--device", "cpu", "--quiet"]
    assert main(["select-layers", "--from", str(sources["llama"]), "--out", str(tmp_path / "sel"), *common]) == 0
    report = json.loads((tmp_path / "sel" / "layer_selection.json").read_text())
    assert report["sparse_layers"][0] == 0 and report["sparse_layers"][-1] == 3
    assert (tmp_path / "sel" / "layer_selection.png").exists()
    assert main(["convert", "--from", str(sources["llama"]), "--out", str(tmp_path / "auto"), "--select", "auto", *common]) == 0
    assert (tmp_path / "auto" / "selection" / "layer_selection.json").exists()


def test_cli_convert_errors_are_messages_not_tracebacks(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["convert", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--sparse-layers", "0"]) == 2
    assert "error:" in capsys.readouterr().err
