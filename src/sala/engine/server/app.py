"""OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or not),
``/v1/models``, ``/health``. FastAPI + uvicorn; the engine runs in its own thread (:class:`AsyncEngine`).

Bad requests get a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / invalid fields / context or max_tokens limits, 401 missing or wrong API key,
404 unknown model or route, 413 body too large, 429 queue full. A client that disconnects cancels its
request, which frees its cache slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sala.engine.chat import render_chat
from sala.engine.server.async_engine import AsyncEngine
from sala.engine.server.protocol import ChatCompletionRequest, CompletionRequest
from sala.engine.types import EngineError, FinishReason, RequestError, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ServerConfig:
    """HTTP-side limits and identity of ``sala serve``."""

    model_name: str = "sala"
    """Name reported by /v1/models and required in the ``model`` field."""
    api_key: str | None = None
    """When set, /v1/* needs ``Authorization: Bearer <api_key>``."""
    max_request_bytes: int = 8 * 2**20
    """Largest request body accepted (413 above)."""
    max_tokens_limit: int | None = None
    """Largest max_tokens accepted; None: the engine's context capacity."""
    max_prompts: int = 16
    """Most prompts in one /v1/completions call."""


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def _error_response(status: int, message: str, code: str, param: str | None = None,
                    type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else ("length" if reason is FinishReason.LENGTH else "stop")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: AsyncEngine, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app around a started-or-not :class:`AsyncEngine` (its lifespan starts and stops it)."""
    cfg = config or ServerConfig()
    capacity = engine.engine.config.max_seq_len
    max_tokens_limit = cfg.max_tokens_limit or capacity

    async def lifespan(app: FastAPI):
        if not engine._thread.is_alive():
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="sala", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.code, exc.param, exc.type)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error_response(429 if exc.code == "server_busy" else 400, str(exc), exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(400, str(exc), "invalid_request")

    def check_auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "invalid_api_key",
                           type_="authentication_error")

    async def parse(request: Request, schema):
        check_auth(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_request_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {cfg.max_request_bytes}", "request_too_large")
        body = await request.body()
        if len(body) > cfg.max_request_bytes:
            raise APIError(413, f"request body of {len(body)} bytes exceeds the limit of {cfg.max_request_bytes}", "request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", "invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"invalid field '{loc}': {err['msg']}", "invalid_request", loc) from e
        if req.model != cfg.model_name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{cfg.model_name}'", "model_not_found", "model")
        req.check_unsupported()  # RequestError -> 400 through the handler above
        return req

    def tokenize(prompt: str | list[int]) -> list[int]:
        return list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)

    def resolve_max_tokens(requested: int | None, prompt_len: int) -> int:
        if requested is not None and requested > max_tokens_limit:
            raise APIError(400, f"max_tokens {requested} exceeds the server limit of {max_tokens_limit}", "max_tokens_too_large", "max_tokens")
        if prompt_len >= capacity:
            raise APIError(400, f"prompt has {prompt_len} tokens; this server's context is {capacity} tokens "
                                "(prompt + max_tokens must fit)", "context_length_exceeded", "prompt")
        return requested if requested is not None else min(max_tokens_limit, capacity - prompt_len)

    async def start(prompt_ids: list[int], params: SamplingParams) -> tuple[AsyncIterator[RequestOutput], RequestOutput | None]:
        """Submit and wait for the first output, so a refusal becomes a 4xx before any streaming starts."""
        stream = engine.generate(prompt_ids, params)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineError as e:
            raise APIError(500, str(e), "engine_error", type_="server_error") from e
        return stream, first

    async def outputs(stream, first) -> AsyncIterator[RequestOutput]:
        try:
            if first is not None:
                yield first
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def run_all(request: Request, prompts: list[list[int]], params: SamplingParams):
        """Start every prompt (4xx on refusal), returning per-prompt output iterators."""
        started = []
        try:
            for ids in prompts:
                started.append(await start(ids, params))
        except BaseException:
            for stream, _ in started:
                await stream.aclose()
            raise
        return [outputs(s, f) for s, f in started]

    async def merged(iters: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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
                    r["finish"] = _finish(out.finish_reason)

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected", "client_closed")
        task.result()
        return results

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "sala",
                                            "max_model_len": capacity}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = req.prompts()
        if len(prompts) > cfg.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {cfg.max_prompts}", "too_many_prompts", "prompt")
        ids = [await asyncio.to_thread(tokenize, p) for p in prompts]
        if any(not x for x in ids):
            raise APIError(400, "prompt is empty", "empty_prompt", "prompt")
        max_tokens = min(resolve_max_tokens(req.max_tokens, len(x)) for x in ids)
        params = req.sampling_params(max_tokens)
        iters = await run_all(request, ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
        if not req.stream:
            results = await collect(request, iters)
            choices = [{"index": i, "text": r["text"], "finish_reason": r["finish"], "logprobs": None} for i, r in enumerate(results)]
            return {**base, "choices": choices, "usage": usage(sum(r["prompt"] for r in results), sum(r["tokens"] for r in results))}

        async def sse():
            tokens = [0] * len(iters)
            async for i, out in merged(iters):
                tokens[i] = out.completion_tokens
                if out.text or out.finished:
                    choice = {"index": i, "text": out.text, "finish_reason": _finish(out.finish_reason), "logprobs": None}
                    yield _sse({**base, "choices": [choice]})
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(sum(len(x) for x in ids), sum(tokens))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            ids = await asyncio.to_thread(render_chat, tokenizer, messages)
        except Exception as e:  # jinja errors raised by the model's own template (e.g. role order)
            raise APIError(400, f"chat template failed: {e}", "invalid_messages", "messages") from e
        params = req.sampling_params(resolve_max_tokens(req.requested_max_tokens(), len(ids)))
        [it] = await run_all(request, [ids], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name}
        if not req.stream:
            [r] = await collect(request, [it])
            msg = {"role": "assistant", "content": r["text"]}
            return {**base, "choices": [{"index": 0, "message": msg, "finish_reason": r["finish"], "logprobs": None}],
                    "usage": usage(r["prompt"], r["tokens"])}

        async def sse():
            chunk = {**base, "object": "chat.completion.chunk"}
            yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            tokens = 0
            async for _, out in merged([it]):
                tokens = out.completion_tokens
                if out.text or out.finished:
                    delta = {"content": out.text} if out.text else {}
                    yield _sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": _finish(out.finish_reason)}]})
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({**chunk, "choices": [], "usage": usage(len(ids), tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def serve(engine: AsyncEngine, tokenizer: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("binding %s without --api-key: anyone who can reach this port can use the model", host)
    uvicorn.run(create_app(engine, tokenizer, config), host=host, port=port, log_level=log_level)
