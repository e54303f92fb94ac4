"""Memory planner arithmetic on the released shapes (spec §2, §6.3; anchors §4) and the engine's refusal."""

from __future__ import annotations

import pytest

from sala.engine import Engine, EngineConfig, MemoryPlanError, parse_tokens, plan_memory
from sala.engine.bench import dense_config
from sala.engine.planner import GiB, MiB, max_context, num_parameters
from sala.model import preset

RELEASED = preset("minicpm-sala-9b")


def test_parse_tokens():
    assert parse_tokens("1M") == 1 << 20 and parse_tokens("256K") == 262144 and parse_tokens("32k") == 32768
    assert parse_tokens("4096") == 4096 and parse_tokens(7) == 7 and parse_tokens("0.5K") == 512
    for bad in ("", "1G", "-3", "1.3", "abc", "0"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


def test_released_shapes():
    assert num_parameters(RELEASED) == 9_477_203_968
    p = plan_memory(RELEASED, batch=1, context=262144)
    assert p.weights_bytes == 2 * 9_477_203_968  # 17.65 GiB in bf16
    assert p.kv_bytes_per_token == 8 * 1024  # 1 KiB per token per sparse layer, 8 layers
    assert p.state_bytes_per_seq == 24 * 2 * MiB  # 2 MiB per Lightning layer per sequence
    assert p.state_bytes == 2 * 48 * MiB  # one sequence + the scratch row
    assert p.kv_bytes == (262144 + 1) * 8 * 1024  # 2 GiB at 256K (+ one scratch column)
    # compressed keys: (1/16 + 1/64) x 512 B = 40 B per token per layer -> about 80 MiB at 256K for 8 layers
    assert p.compressed_bytes == pytest.approx(8 * 40 * 262144, rel=0.01)


def test_released_1m_fits_80gb_and_dense_256k_does_not_fit_at_1m():
    p = plan_memory(RELEASED, batch=1, context=1 << 20, budget_gib=80)
    assert p.kv_bytes == ((1 << 20) + 1) * 8 * 1024  # 8 GiB at 1M
    assert p.fits and p.total_bytes < 40 * GiB
    dense = dense_config("released", None, 1 << 20)
    assert plan_memory(dense, batch=1, context=1, budget_gib=80).kv_bytes_per_token == 144 * 1024  # Qwen3-8B
    assert plan_memory(dense, batch=1, context=262144, budget_gib=80).fits
    assert not plan_memory(dense, batch=1, context=1 << 20, budget_gib=80).fits  # 144 GiB of KV
    assert plan_memory(dense, batch=1, context=1, budget_gib=80).compressed_bytes == 0  # sparse_attention off


def test_max_context_is_the_boundary():
    n = max_context(RELEASED, batch=4, budget_gib=80)
    assert plan_memory(RELEASED, batch=4, context=n, budget_gib=80).fits
    assert not plan_memory(RELEASED, batch=4, context=n + 1, budget_gib=80).fits
    assert max_context(RELEASED, batch=1, budget_gib=10) == 0  # the weights alone do not fit


def test_plan_check_message():
    p = plan_memory(RELEASED, batch=8, context=1 << 20, budget_gib=24)
    with pytest.raises(MemoryPlanError, match="DOES NOT FIT") as e:
        p.check()
    assert "batch 8 x context 1,048,576" in str(e.value)
    assert plan_memory(RELEASED, batch=1, context=8).fits is None  # no budget: unknown
    with pytest.raises(ValueError, match="dtype"):
        plan_memory(RELEASED, batch=1, context=8, dtype="int3")


def test_engine_refuses_before_allocating(sparse_model, monkeypatch):
    import sala.engine.engine as eng_mod

    Engine(sparse_model, None, EngineConfig(max_batch=1, max_seq_len=4096, memory_budget_gib=2))  # fits

    def boom(*a, **k):
        raise AssertionError("cache allocated although the plan does not fit")

    monkeypatch.setattr(eng_mod, "StaticCache", boom)
    with pytest.raises(MemoryPlanError, match="batch 4096 x context 4,096 needs .* but the budget is"):
        Engine(sparse_model, None, EngineConfig(max_batch=4096, max_seq_len=4096, memory_budget_gib=2))  # 8 GiB of KV
