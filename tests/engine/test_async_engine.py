"""AsyncEngine without HTTP: failures reach the caller as errors, cancellation and refusals leave the engine usable."""

from __future__ import annotations

import asyncio
import time

import pytest

from sala.engine import Engine, EngineConfig, RequestError, SamplingParams
from sala.engine.server import AsyncEngine
from sala.engine.types import EngineError, FinishReason

from .conftest import random_prompt

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture
def aengine(sparse_model):
    eng = AsyncEngine(Engine(sparse_model, None, EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=64)))
    eng.start()
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive()


async def _collect(aeng, prompt, params, request_id=None):
    return [out async for out in aeng.generate(prompt, params, request_id)]


def _wait_idle(aeng, timeout=10.0):
    deadline = time.time() + timeout
    while aeng.engine.has_unfinished() or not aeng._commands.empty():
        assert time.time() < deadline, aeng.stats()
        time.sleep(0.01)


def _slow_down(obj, name: str, seconds: float) -> None:
    """Make ``obj.name`` sleep ``seconds`` before each call (undo with ``del obj.name``)."""
    fn = getattr(obj, name)

    def slow(*args, **kw):
        time.sleep(seconds)
        return fn(*args, **kw)

    setattr(obj, name, slow)


def _assert_serves_again(aeng):
    """The engine thread survived, both slots are free again, and a new request completes."""
    assert aeng._thread.is_alive()
    _wait_idle(aeng)
    assert aeng.stats()["free_slots"] == 2
    outs = asyncio.run(_collect(aeng, random_prompt(8, 0), SamplingParams(max_tokens=2, **GREEDY)))
    assert len(outs) == 2


def test_failed_step_raises_instead_of_finishing(aengine):
    def boom(*args):
        raise RuntimeError("boom")

    aengine.engine.runner.decode = boom
    with pytest.raises(EngineError, match="engine step failed: boom"):
        asyncio.run(_collect(aengine, random_prompt(8, 0), SamplingParams(max_tokens=4, **GREEDY)))
    del aengine.engine.runner.decode
    _wait_idle(aengine)
    outs = asyncio.run(_collect(aengine, random_prompt(8, 0), SamplingParams(max_tokens=3, **GREEDY)))
    assert outs[-1].finish_reason is FinishReason.LENGTH and len(outs) == 3


def test_cancel_before_add_runs(aengine):
    _slow_down(aengine.engine.runner, "decode", 0.3)  # commands wait for the step to end
    added = []
    add = aengine.engine.add_request
    aengine.engine.add_request = lambda *a, **kw: added.append(a[2]) or add(*a, **kw)

    async def main():
        busy = asyncio.create_task(_collect(aengine, random_prompt(8, 1), SamplingParams(max_tokens=3, **GREEDY), "busy"))
        await asyncio.sleep(0.1)
        it = aengine.generate(random_prompt(8, 0), SamplingParams(max_tokens=100, **GREEDY), "gone")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.05)
        return await busy

    assert len(asyncio.run(main())) == 3
    assert added == ["busy"]  # the cancelled add was skipped, not added and aborted
    del aengine.engine.runner.decode, aengine.engine.add_request
    _assert_serves_again(aengine)


def test_cancel_while_add_is_pending(aengine):
    _slow_down(aengine.engine, "add_request", 0.2)  # the caller gives up before the engine thread adds it

    async def main():
        it = aengine.generate(random_prompt(8, 0), SamplingParams(max_tokens=100, **GREEDY))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.05)

    asyncio.run(main())
    time.sleep(0.3)
    del aengine.engine.add_request
    _assert_serves_again(aengine)


def test_duplicate_request_id_does_not_hijack_the_live_one(aengine):
    _slow_down(aengine.engine.runner, "decode", 0.02)  # the first request still runs when the duplicate arrives

    async def main():
        first = asyncio.create_task(_collect(aengine, random_prompt(8, 0), SamplingParams(max_tokens=30, **GREEDY), "same"))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError, match="already in use"):
            await _collect(aengine, random_prompt(8, 1), SamplingParams(max_tokens=2, **GREEDY), "same")
        return await asyncio.wait_for(first, 30)

    outs = asyncio.run(main())
    assert len(outs) == 30 and outs[-1].finish_reason is FinishReason.LENGTH


def test_public_abort_ends_the_stream_with_abort(aengine):
    _slow_down(aengine.engine.runner, "decode", 0.02)

    async def main():
        outs = []
        async for out in aengine.generate(random_prompt(8, 0), SamplingParams(max_tokens=100, **GREEDY), "victim"):
            outs.append(out)
            if len(outs) == 3:
                aengine.abort("victim")
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 30))
    assert outs[-1].finish_reason is FinishReason.ABORT and 3 <= len(outs) < 100
    _wait_idle(aengine)
    assert aengine.stats()["free_slots"] == 2


def test_shutdown_fails_pending_adds(sparse_model):
    eng = AsyncEngine(Engine(sparse_model, None, EngineConfig(max_batch=1, max_seq_len=64, prefill_chunk=64)))
    eng.start()
    _slow_down(eng.engine, "add_request", 0.3)  # shutdown comes while this add runs; the next one is queued

    async def main():
        first = asyncio.create_task(_collect(eng, random_prompt(8, 0), SamplingParams(max_tokens=50, **GREEDY)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(_collect(eng, random_prompt(8, 1), SamplingParams(max_tokens=5, **GREEDY)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(eng.shutdown)
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineError) and "shutting down" in str(r) for r in results), results
    with pytest.raises(EngineError, match="not running"):
        asyncio.run(_collect(eng, random_prompt(8, 0), SamplingParams(max_tokens=1, **GREEDY)))
