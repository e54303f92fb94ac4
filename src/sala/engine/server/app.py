"""OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or not),
``/v1/models``, ``/health``. FastAPI + uvicorn; the engine runs in its own thread (:class:`AsyncEngine`).

Bad requests get a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / invalid fields / context or max_tokens limits, 401 missing or wrong API key,
404 unknown model or route, 413 body too large, 429 queue full, 500 anything unexpected (never a plain-text
page: a catch-all middleware answers with the same JSON object and keeps the connection usable). A request whose
logits turn non-finite ends with a 500 (or, once streaming, an SSE ``error`` event); the others go on. A client
that disconnects cancels its request, which frees its cache slot at the next engine step. With an API key the
docs pages (``/docs``, ``/redoc``, ``/openapi.json``) are off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sala.engine.chat import render_chat
from sala.engine.server.async_engine import AsyncEngine
from sala.engine.server.protocol import ChatCompletionRequest, CompletionRequest
from sala.engine.types import EngineError, FinishReason, NonFiniteLogitsError, RequestError, RequestOutput, SamplingParams

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
    max_json_depth: int = 64
    """Deepest nesting of arrays/objects accepted in a body (a request needs 4; Python's parser overflows near
    1,000)."""


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting client text (even a lone surrogate, which UTF-8 cannot
    encode) always renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_body(message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, code: str, param: str | None = None,
                    type_: str = "invalid_request_error") -> JSONResponse:
    return _AsciiJSON(_error_body(message, code, param, type_), status_code=status)


class _CatchAll:
    """ASGI middleware: an exception no handler took becomes a 500 with the OpenAI error object (logged with its
    traceback) instead of Starlette's plain-text page and a reset keep-alive connection. After a response has
    started (a stream) there is nothing left to replace, so it is re-raised."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if started:
                raise
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await _error_response(500, f"internal server error ({type(e).__name__}); the server logged the details",
                                  "internal_error", type_="server_error")(scope, receive, send)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # "unrolled": no per-character alternation
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _json_depth(body: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, brackets inside strings excluded; regex passes (C speed) and a
    loop over the brackets alone, so an 8 MiB prompt costs milliseconds, and no recursion."""
    depth = deepest = 0
    for b in _JSON_BRACKET.findall(_JSON_STRING.sub(b'""', body)):
        if b in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _bad_text(data: Any) -> str | None:
    """Path of the first string in ``data`` that is not valid Unicode (a lone UTF-16 surrogate such as ``\ud800``,
    which JSON allows but no tokenizer or UTF-8 encoder takes), else None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(x, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in x.items())
            stack.extend((f"{path}.<key>" if path else "<key>", k) for k in x)
        elif isinstance(x, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(x))
    return None


def _max_token_bytes(tokenizer: Any) -> int:
    """Longest token of the vocabulary in UTF-8 bytes (+1 for a word-start marker that decoding drops): a text of
    B bytes has at least B / this many tokens, so longer prompts are refused before any tokenising."""
    n = len(tokenizer)
    pieces = tokenizer.batch_decode([[i] for i in range(n)])
    return max(len(p.encode("utf-8", "replace")) for p in pieces) + 1


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else ("length" if reason is FinishReason.LENGTH else "stop")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _engine_code(e: EngineError) -> str:
    return "non_finite_logits" if isinstance(e, NonFiniteLogitsError) else "engine_error"


async def _sse_guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An engine error after streaming began (headers sent: no status left to set) ends the stream with an
    ``error`` event, as OpenAI and vLLM do, then ``[DONE]``."""
    try:
        async for e in events:
            yield e
    except EngineError as e:
        yield _sse(_error_body(str(e), _engine_code(e), type_="server_error"))
        yield "data: [DONE]\n\n"


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

    docs = {} if cfg.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)  # no key-less pages
    app = FastAPI(title="sala", lifespan=lifespan, **docs)
    app.add_middleware(_CatchAll)
    # x2: room for normalisers that shrink text; no tokenizer: text prompts fail in tokenize() anyway
    max_prompt_bytes = capacity * _max_token_bytes(tokenizer) * 2 if tokenizer is not None else float("inf")

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

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return _error_response(500, str(exc), _engine_code(exc), type_="server_error")

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
        # read chunk by chunk: a chunked upload (no content-length) is refused as soon as it passes the limit,
        # not after it has been held whole in memory (issue 17 item 4)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > cfg.max_request_bytes:
                raise APIError(413, f"request body exceeds the limit of {cfg.max_request_bytes} bytes", "request_too_large")
            parts.append(part)
        body = b"".join(parts)
        del parts
        depth = _json_depth(body)
        if depth > cfg.max_json_depth:  # json.loads would raise RecursionError near 1,000 levels
            raise APIError(400, f"JSON body nested {depth} levels deep; the limit is {cfg.max_json_depth}", "invalid_json")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"malformed JSON body: {e}", "invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
        bad = _bad_text(data)
        if bad is not None:
            raise APIError(400, f"field '{bad}' is not valid Unicode (a lone UTF-16 surrogate such as \\ud800); send "
                                "UTF-8 text", "invalid_text", bad)
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

    def check_text_size(texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context before tokenising it: an 8 MB prompt took 14-22 s of CPU and
        2 GB of memory to tokenise just to be refused (issue 17 item 4)."""
        n = sum(len(t.encode("utf-8")) for t in texts)
        if n > max_prompt_bytes:
            raise APIError(400, f"prompt is {n:,} bytes of text, more than this server's {capacity}-token context can "
                                f"hold (over {max_prompt_bytes:,} bytes is always too long)", "context_length_exceeded", param)

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
            raise APIError(500, str(e), _engine_code(e), type_="server_error") from e
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
        check_text_size([p for p in prompts if isinstance(p, str)], "prompt")
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

        return StreamingResponse(_sse_guard(sse()), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        check_text_size([m["content"] for m in messages], "messages")
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

        return StreamingResponse(_sse_guard(sse()), media_type="text/event-stream")

    return app


def serve(engine: AsyncEngine, tokenizer: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", shutdown_timeout: float = 10.0) -> None:
    """Run the server in the foreground until SIGTERM / Ctrl-C, then shut down gracefully: stop accepting
    connections, let in-flight requests finish for up to ``shutdown_timeout`` seconds, cancel the rest (their
    cache slots are freed, their clients see the connection close), stop the engine and return (exit status 0).
    Before, SIGTERM waited for every stream however long (a 4,000-token stream delayed exit by 90+ s)."""
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("binding %s without an API key: anyone who can reach this port can use the model", host)
    ucfg = uvicorn.Config(create_app(engine, tokenizer, config), host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=shutdown_timeout)
    server = _GracefulServer(ucfg)
    server.run()
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        raise OSError(f"could not serve on {host}:{port} (see the log above)")


class _GracefulServer(uvicorn.Server):
    """uvicorn re-raises the SIGTERM/SIGINT it caught once shut down, so the process dies of the signal (status
    143); a requested stop that completed its graceful shutdown is a success here (status 0)."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()
