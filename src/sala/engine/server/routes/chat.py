"""``/v1/chat/completions``: messages rendered with the model's chat template, one reply or an SSE stream."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from sala.engine.chat import render_chat
from sala.engine.server.context import ServerContext, server_context
from sala.engine.server.errors import APIError
from sala.engine.server.protocol import ChatCompletionRequest
from sala.engine.server.streams import collect, finish_reason, merged, sse, sse_guard, usage

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, ctx: ServerContext = Depends(server_context)):
    cfg = ctx.cfg
    req: ChatCompletionRequest = await ctx.parse(request, ChatCompletionRequest)
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
    ctx.check_text_size([m["content"] for m in messages], "messages")
    try:
        ids = await asyncio.to_thread(render_chat, ctx.tokenizer, messages)
    except Exception as e:  # jinja errors raised by the model's own template (e.g. role order)
        raise APIError(400, f"chat template failed: {e}", "invalid_messages", "messages") from e
    params = req.sampling_params(ctx.resolve_max_tokens(req.requested_max_tokens(), len(ids)))
    [it] = await ctx.run_all(request, [ids], params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name}
    if not req.stream:
        [r] = await collect(request, [it])
        msg = {"role": "assistant", "content": r["text"]}
        return {**base, "choices": [{"index": 0, "message": msg, "finish_reason": r["finish"], "logprobs": None}],
                "usage": usage(r["prompt"], r["tokens"])}

    async def events():
        chunk = {**base, "object": "chat.completion.chunk"}
        yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        tokens = 0
        async for _, out in merged([it]):
            tokens = out.completion_tokens
            if out.text or out.finished:
                delta = {"content": out.text} if out.text else {}
                yield sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason(out.finish_reason)}]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(len(ids), tokens)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse_guard(events()), media_type="text/event-stream")
