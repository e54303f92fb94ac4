"""``sala bench e2e`` smoke run on CPU with tiny shapes: every system, table, JSON, PNG, no-fit rows."""

from __future__ import annotations

import json

import pytest

from sala.engine.bench import E2EConfig, _sparse_positions, dense_config, run_e2e, sala_config


def test_bench_e2e_smoke(tmp_path):
    cfg = E2EConfig(shape="tiny", contexts="64,160", decode_steps=2, decode_batch=2, chunk=64, device="cpu", out=str(tmp_path))
    result = run_e2e(cfg, out=open(tmp_path / "log.txt", "w"))
    rows = result["rows"]
    assert {(r["system"], r["context"]) for r in rows} == {(s, c) for s in ("sala", "dense", "hf") for c in (64, 160)}
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
