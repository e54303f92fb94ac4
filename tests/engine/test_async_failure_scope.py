"""What a failed engine step fails (issue 14 item 5: the docstring said "every request it touched")."""

from __future__ import annotations

import asyncio

import pytest

from sala.engine import Engine, EngineConfig, SamplingParams
from sala.engine.server import AsyncEngine
from sala.engine.types import EngineError

from .conftest import random_prompt


def test_failed_step_fails_every_request_in_flight_including_queued_ones(sparse_model):
    """Two slots, three requests: the third is still waiting when a decode step fails, and fails too."""
    eng = AsyncEngine(Engine(sparse_model, None, EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=64)))

    def boom(*args, **kw):
        raise RuntimeError("boom")

    eng.engine.runner.decode = boom
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def one(i):
        try:
            return [o async for o in eng.generate(random_prompt(8, i), params)]
        except EngineError as e:
            return e

    async def three():
        return await asyncio.gather(*(one(i) for i in range(3)))

    eng.start()
    try:
        results = asyncio.run(three())
    finally:
        eng.shutdown()
    assert all(isinstance(r, EngineError) and "engine step failed: boom" in str(r) for r in results), results
