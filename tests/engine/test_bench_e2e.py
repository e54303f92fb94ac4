"""``sala bench e2e`` smoke run on CPU with tiny shapes: every system, table, JSON, PNG, no-fit rows."""

from __future__ import annotations

import json

import pytest
import torch

from sala.engine.bench import E2EConfig, _sparse_positions, dense_config, run_e2e, sala_config


def test_bench_e2e_smoke(tmp_path):
    cfg = E2EConfig(shape="tiny", contexts="64,160", decode_steps=2, decode_batch=2, chunk=64, device="cpu", out=str(tmp_path))
    result = run_e2e(cfg, out=open(tmp_path / "log.txt", "w"))
    rows = result["rows"]
    # on a CPU every system runs at one context before the next context (a shared machine's load drifts)
    assert [(r["system"], r["context"]) for r in rows] == [(s, c) for c in (64, 160) for s in ("sala", "dense", "hf")]
    assert all(r["status"] == "ok" and r["ttft_s"] > 0 and r["decode_ms_b1"] > 0 for r in rows)
    assert all(r["decode_ms_bn"] > 0 and r["batch_n"] == 2 for r in rows if r["system"] != "hf")
    assert json.loads((tmp_path / "e2e.json").read_text())["config"]["shape"] == "tiny"
    assert (tmp_path / "e2e.png").stat().st_size > 1000
    assert "| sala | 160 | ok |" in (tmp_path / "e2e.md").read_text()


def test_bench_reports_rows_that_do_not_fit(tmp_path):
    cfg = E2EConfig(shape="tiny", contexts="64,128", decode_steps=1, decode_batch=2, systems="dense", device="cpu",
                    gpu_mem=1.0, out=str(tmp_path))  # 1 GiB < the plan's fixed workspace + overhead
    rows = run_e2e(cfg, out=open(tmp_path / "log.txt", "w"))["rows"]
    assert [r["status"] for r in rows] == ["no-fit", "skipped"]


def test_bench_shapes():
    s = sala_config("released", None, 1 << 20)
    assert s.sparse_layers == [0, 9, 16, 17, 22, 29, 30, 31] and s.max_position_embeddings == 1 << 20
    d = dense_config("released", None, 1 << 20)
    assert (d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.intermediate_size) == (36, 32, 8, 12288)
    assert d.residual_scale == 1.0 and d.logit_divisor == 1.0 and not d.sparse_attention and d.attn_use_rope
    assert _sparse_positions(8) == [0, 7] and _sparse_positions(32)[0] == 0 and _sparse_positions(32)[-1] == 31
    assert sala_config("released", 4, 4096).num_hidden_layers == 4 and dense_config("released", 4, 4096).num_hidden_layers == 4


def test_bench_decode_only(tmp_path):
    """--decode-only: random caches of the context's length, decode timed, no TTFT; hf is refused."""
    cfg = E2EConfig(shape="tiny", contexts="100", decode_steps=2, decode_batch=2, systems="sala,dense", device="cpu",
                    decode_only=True, decode_attention="fused", out=str(tmp_path))
    rows = run_e2e(cfg, out=open(tmp_path / "log.txt", "w"))["rows"]
    assert all(r["status"] == "ok" and r["ttft_s"] is None and r["decode_ms_b1"] > 0 for r in rows)
    with pytest.raises(ValueError, match="decode-only"):
        E2EConfig(shape="tiny", decode_only=True)  # default systems include hf


def test_bench_smollm2_shapes_match_the_real_pair():
    """--shape smollm2: the hybrid is the demo's conversion geometry (8 of 30 softmax layers, 9/3 heads, Lightning
    K/V at 9 heads); the dense baselines are SmolLM2 itself (Llama: no q/k-norm, RoPE 1e5, tied embeddings)."""
    from sala.engine.bench import hf_dense

    s = sala_config("smollm2", None, 32768)
    assert s.sparse_layers == [0, 4, 8, 16, 17, 18, 19, 29] and (s.hidden_size, s.lightning_nkv) == (576, 9)
    d = dense_config("smollm2", None, 32768)
    assert (d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.rope_theta) == (30, 9, 3, 100000.0)
    assert not d.attn_qk_norm and d.tie_word_embeddings
    hf = hf_dense("smollm2", 2, 256, torch.device("cpu"), torch.float32, 0)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_hidden_layers == 2


def test_bench_cpu_defaults_and_explicit_values():
    cfg = E2EConfig(shape="tiny").for_device(torch.device("cpu"))
    assert (cfg.context_list, cfg.decode_steps, cfg.decode_batch) == ([1024, 4096, 8192, 16384, 32768], 8, 1)
    cfg = E2EConfig(shape="tiny", contexts="64", decode_steps=3, decode_batch=2).for_device(torch.device("cpu"))
    assert (cfg.context_list, cfg.decode_steps, cfg.decode_batch) == ([64], 3, 2)
    with pytest.raises(ValueError, match="--decode-steps must be >= 1"):
        E2EConfig(decode_steps=0)


def test_bench_ratios_name_the_fastest_dense_system_in_words():
    """Every ratio is against the fastest dense system of the row, written as faster/slower; the CPU targets
    compare sala with that system and with its own 4K decode."""
    from sala.engine.bench import Row, summarize

    rows = [Row("sala", 4096, ttft_s=2.0, decode_ms_b1=60.0, peak_gib=1.0),
            Row("dense", 4096, ttft_s=5.0, decode_ms_b1=50.0, peak_gib=1.5),
            Row("hf", 4096, ttft_s=4.0, decode_ms_b1=70.0, peak_gib=1.4),
            Row("sala", 32768, ttft_s=10.0, decode_ms_b1=66.0, peak_gib=1.2),
            Row("hf", 32768, ttft_s=40.0, decode_ms_b1=300.0, peak_gib=3.0)]
    table, targets = summarize(rows, {}, None, "smollm2", cpu=True)
    assert "| sala | 4,096 | ok | 2.000 | 2.00x faster (hf) | 60.00 | 1.20x slower (dense) |" in table
    assert "| dense | 4,096 | ok | 5.000 | 1.25x slower (hf) | 50.00 | same |" in table
    assert targets["ttft_4k_sala_over_best_dense"][0] == pytest.approx(0.5)
    assert targets["ttft_32k_sala_over_best_dense"][0] == pytest.approx(0.25)
    assert targets["decode_4k_sala_over_best_dense"][0] == pytest.approx(1.2)
    assert targets["decode_32k_over_sala_4k"][0] == pytest.approx(1.1)
    assert targets["peak_32k_sala_over_lowest_dense"][0] == pytest.approx(0.4)
