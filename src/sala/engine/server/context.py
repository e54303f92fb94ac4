"""What every route shares: the server's limits (:class:`ServerConfig`) and, per app, the engine, the tokenizer
and the request checks built on them (:class:`ServerContext`): API key, body size and shape, model name, prompt
and max_tokens limits, and submitting prompts to the engine."""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import ValidationError

from sala.engine.server.async_engine import AsyncEngine
from sala.engine.server.errors import APIError, engine_code
from sala.engine.server.streams import outputs
from sala.engine.types import EngineError, RequestOutput, SamplingParams


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


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # "unrolled": no per-character alternation
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
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


def bad_text(data: Any) -> str | None:
    """Path of the first string in ``data`` that is not valid Unicode (a lone UTF-16 surrogate such as ``\\ud800``,
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


def max_token_bytes(tokenizer: Any) -> int:
    """Longest token of the vocabulary in UTF-8 bytes (+1 for a word-start marker that decoding drops): a text of
    B bytes has at least B / this many tokens, so longer prompts are refused before any tokenising."""
    n = len(tokenizer)
    pieces = tokenizer.batch_decode([[i] for i in range(n)])
    return max(len(p.encode("utf-8", "replace")) for p in pieces) + 1


class ServerContext:
    """One app's engine, tokenizer and limits, with the checks and engine calls its routes share."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any, config: ServerConfig) -> None:
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, config
        self.capacity = engine.engine.config.max_seq_len
        self.max_tokens_limit = config.max_tokens_limit or self.capacity
        # x2: room for normalisers that shrink text; no tokenizer: text prompts fail in tokenize() anyway
        self.max_prompt_bytes = (self.capacity * max_token_bytes(tokenizer) * 2 if tokenizer is not None
                                 else float("inf"))

    def check_auth(self, request: Request) -> None:
        cfg = self.cfg
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "invalid_api_key",
                           type_="authentication_error")

    async def parse(self, request: Request, schema):
        """The request body as ``schema``, after the API key, size, nesting, JSON, Unicode and model checks."""
        cfg = self.cfg
        self.check_auth(request)
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
        depth = json_depth(body)
        if depth > cfg.max_json_depth:  # json.loads would raise RecursionError near 1,000 levels
            raise APIError(400, f"JSON body nested {depth} levels deep; the limit is {cfg.max_json_depth}", "invalid_json")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"malformed JSON body: {e}", "invalid_json") from e
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", "invalid_json")
        bad = bad_text(data)
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
        req.check_unsupported()  # RequestError -> 400 through the app's handler
        return req

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)

    def check_text_size(self, texts: list[str], param: str) -> None:
        """Refuse text that cannot fit the context before tokenising it: an 8 MB prompt took 14-22 s of CPU and
        2 GB of memory to tokenise just to be refused (issue 17 item 4)."""
        n = sum(len(t.encode("utf-8")) for t in texts)
        if n > self.max_prompt_bytes:
            raise APIError(400, f"prompt is {n:,} bytes of text, more than this server's {self.capacity}-token context "
                                f"can hold (over {self.max_prompt_bytes:,} bytes is always too long)",
                           "context_length_exceeded", param)

    def resolve_max_tokens(self, requested: int | None, prompt_len: int) -> int:
        limit, capacity = self.max_tokens_limit, self.capacity
        if requested is not None and requested > limit:
            raise APIError(400, f"max_tokens {requested} exceeds the server limit of {limit}", "max_tokens_too_large", "max_tokens")
        if prompt_len >= capacity:
            raise APIError(400, f"prompt has {prompt_len} tokens; this server's context is {capacity} tokens "
                                "(prompt + max_tokens must fit)", "context_length_exceeded", "prompt")
        return requested if requested is not None else min(limit, capacity - prompt_len)

    async def start(self, prompt_ids: list[int], params: SamplingParams
                    ) -> tuple[AsyncIterator[RequestOutput], RequestOutput | None]:
        """Submit and wait for the first output, so a refusal becomes a 4xx before any streaming starts."""
        stream = self.engine.generate(prompt_ids, params)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except EngineError as e:
            raise APIError(500, str(e), engine_code(e), type_="server_error") from e
        return stream, first

    async def run_all(self, request: Request, prompts: list[list[int]], params: SamplingParams):
        """Start every prompt (4xx on refusal), returning per-prompt output iterators."""
        started = []
        try:
            for ids in prompts:
                started.append(await self.start(ids, params))
        except BaseException:
            for stream, _ in started:
                await stream.aclose()
            raise
        return [outputs(s, f) for s, f in started]


def server_context(request: Request) -> ServerContext:
    """FastAPI dependency: the :class:`ServerContext` of the app serving ``request``."""
    return request.app.state.sala
