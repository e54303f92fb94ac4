"""Scheduler bookkeeping (no torch)."""

from __future__ import annotations

import sys

import pytest

from sala.engine.scheduler import Scheduler
from sala.engine.types import FinishReason, RequestError


def run_step(s: Scheduler, stopped=()):
    out = s.schedule()
    return out, s.update(out, stopped)


def test_scheduler_module_needs_no_torch():
    """style: the scheduler is pure bookkeeping; neither it nor the types it uses import torch."""
    import ast

    for module in ("sala.engine.scheduler", "sala.engine.types"):
        tree = ast.parse(open(sys.modules[module].__file__).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n == "torch" or n.startswith("torch.") for n in names), module


def test_chunked_prefill_then_decode():
    s = Scheduler(max_batch=2, max_seq_len=100, prefill_chunk=8)
    s.add("a", prompt_len=20, max_tokens=3)
    out, fin = run_step(s)
    assert out.admitted == [("a", 0)]
    assert [(c.start, c.num_tokens, c.last) for c in out.prefill] == [(0, 8, False)] and not out.decode
    out, _ = run_step(s)
    assert [(c.start, c.num_tokens, c.last) for c in out.prefill] == [(8, 8, False)]
    out, _ = run_step(s)
    assert [(c.start, c.num_tokens, c.last) for c in out.prefill] == [(16, 4, True)]  # first token sampled here
    out, fin = run_step(s)
    assert [(d.slot, d.position) for d in out.decode] == [(0, 20)] and not fin
    out, fin = run_step(s)
    assert [(d.position) for d in out.decode] == [21]
    assert fin == [("a", FinishReason.LENGTH)]  # 3 tokens: 1 from prefill + 2 decode steps
    assert not s.has_unfinished() and s.free_slots == [0, 1]


def test_prefill_budget_is_shared_and_decode_continues():
    s = Scheduler(max_batch=3, max_seq_len=100, prefill_chunk=10)
    s.add("short", 4, 5)
    s.add("long", 30, 5)
    out, _ = run_step(s)
    assert [(c.request_id, c.num_tokens) for c in out.prefill] == [("short", 4), ("long", 6)]
    out, _ = run_step(s)
    assert [d.request_id for d in out.decode] == ["short"]  # decodes while "long" is still prefilling
    assert [(c.request_id, c.start, c.num_tokens) for c in out.prefill] == [("long", 6, 10)]


def test_waiting_requests_take_freed_slots():
    s = Scheduler(max_batch=1, max_seq_len=100, prefill_chunk=64)
    s.add("a", 5, 1)
    s.add("b", 5, 1)
    out, fin = run_step(s)
    assert out.admitted == [("a", 0)] and fin == [("a", FinishReason.LENGTH)]
    out, fin = run_step(s)
    assert out.admitted == [("b", 0)] and fin == [("b", FinishReason.LENGTH)]


def test_stop_and_abort():
    s = Scheduler(max_batch=2, max_seq_len=100, prefill_chunk=64)
    s.add("a", 5, 50)
    s.add("b", 5, 50)
    s.add("c", 5, 50)
    out, fin = run_step(s, stopped={"a"})
    assert fin == [("a", FinishReason.STOP)]
    assert s.abort("b") == 1 and s.abort("c") is None  # b had slot 1, c was still waiting
    assert s.abort("zzz") is None
    assert not s.has_unfinished() and s.free_slots == [0, 1]


def test_abort_while_step_ran_is_ignored_by_update():
    s = Scheduler(max_batch=1, max_seq_len=100, prefill_chunk=64)
    s.add("a", 5, 50)
    out = s.schedule()
    s.abort("a")
    assert s.update(out) == []


def test_request_validation():
    s = Scheduler(max_batch=1, max_seq_len=100, prefill_chunk=64)
    with pytest.raises(RequestError, match="exceeds the context capacity of 100") as e:
        s.add("a", 90, 11)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(RequestError) as e:
        s.add("a", 100, 1)
    assert e.value.param == "prompt"
    with pytest.raises(RequestError, match="empty"):
        s.add("a", 0, 1)
    s.add("a", 10, 10)
    with pytest.raises(RequestError, match="already in use"):
        s.add("a", 10, 10)
    with pytest.raises(ValueError, match=">= 1"):
        Scheduler(0, 10, 10)
