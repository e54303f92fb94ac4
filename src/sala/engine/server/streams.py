"""Engine outputs to HTTP replies: merging the streams of several prompts, collecting them for a plain JSON reply
or framing them as server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request

from sala.engine.server.errors import APIError, engine_code, error_body
from sala.engine.types import EngineError, FinishReason, RequestOutput


def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else ("length" if reason is FinishReason.LENGTH else "stop")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def sse_guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An engine error after streaming began (headers sent: no status left to set) ends the stream with an
    ``error`` event, as OpenAI and vLLM do, then ``[DONE]``."""
    try:
        async for e in events:
            yield e
    except EngineError as e:
        yield sse(error_body(str(e), engine_code(e), type_="server_error"))
        yield "data: [DONE]\n\n"


async def outputs(stream, first) -> AsyncIterator[RequestOutput]:
    """A started request's outputs: the first one (already awaited), then the rest; closing ends the request."""
    try:
        if first is not None:
            yield first
        async for out in stream:
            yield out
    finally:
        await stream.aclose()


async def merged(iters: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs of several requests as they arrive; the first error ends them all."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, it):
        try:
            async for out in it:
                await q.put((i, out))
        except Exception as e:
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iters)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(request: Request, iters) -> list[dict]:
    """Non-streaming: gather outputs, cancelling everything if the client goes away."""
    results = [{"text": "", "tokens": 0, "prompt": 0, "finish": None} for _ in iters]

    async def consume():
        async for i, out in merged(iters):
            r = results[i]
            r["text"] += out.text
            r["tokens"], r["prompt"] = out.completion_tokens, out.prompt_tokens
            if out.finished:
                r["finish"] = finish_reason(out.finish_reason)

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected", "client_closed")
    task.result()
    return results
