"""``/v1/completions``: one or several prompts (text or token ids), one reply or an SSE stream."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from sala.engine.server.context import ServerContext, server_context
from sala.engine.server.errors import APIError
from sala.engine.server.protocol import CompletionRequest
from sala.engine.server.streams import collect, finish_reason, merged, sse, sse_guard, usage

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request, ctx: ServerContext = Depends(server_context)):
    cfg = ctx.cfg
    req: CompletionRequest = await ctx.parse(request, CompletionRequest)
    prompts = req.prompts()
    if len(prompts) > cfg.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {cfg.max_prompts}", "too_many_prompts", "prompt")
    ctx.check_text_size([p for p in prompts if isinstance(p, str)], "prompt")
    ids = [await asyncio.to_thread(ctx.tokenize, p) for p in prompts]
    if any(not x for x in ids):
        raise APIError(400, "prompt is empty", "empty_prompt", "prompt")
    max_tokens = min(ctx.resolve_max_tokens(req.max_tokens, len(x)) for x in ids)
    params = req.sampling_params(max_tokens)
    iters = await ctx.run_all(request, ids, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
    if not req.stream:
        results = await collect(request, iters)
        choices = [{"index": i, "text": r["text"], "finish_reason": r["finish"], "logprobs": None} for i, r in enumerate(results)]
        return {**base, "choices": choices, "usage": usage(sum(r["prompt"] for r in results), sum(r["tokens"] for r in results))}

    async def events():
        tokens = [0] * len(iters)
        async for i, out in merged(iters):
            first = tokens[i] == 0
            tokens[i] = out.completion_tokens
            # a prompt's first token is always sent, text or not (a held-back partial character, a token the
            # tokenizer cannot spell): the client sees its time to first token, as chat's role chunk shows it
            if out.text or out.finished or first:
                choice = {"index": i, "text": out.text, "finish_reason": finish_reason(out.finish_reason), "logprobs": None}
                yield sse({**base, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": usage(sum(len(x) for x in ids), sum(tokens))})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse_guard(events()), media_type="text/event-stream")
