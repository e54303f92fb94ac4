"""The server's error replies: the OpenAI-style error object, the exceptions that map to it, the handlers that
turn them into responses and the catch-all middleware for everything else."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sala.engine.types import EngineError, NonFiniteLogitsError, RequestError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


class AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting client text (even a lone surrogate, which UTF-8 cannot
    encode) always renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, code: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    return AsciiJSON(error_body(message, code, param, type_), status_code=status)


def engine_code(e: EngineError) -> str:
    return "non_finite_logits" if isinstance(e, NonFiniteLogitsError) else "engine_error"


class CatchAll:
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
            await error_response(500, f"internal server error ({type(e).__name__}); the server logged the details",
                                 "internal_error", type_="server_error")(scope, receive, send)


async def _api_error(request: Request, exc: APIError):
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.type)


async def _request_error(request: Request, exc: RequestError):
    return error_response(429 if exc.code == "server_busy" else 400, str(exc), exc.code, exc.param)


async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, str(exc.detail), code)


async def _engine_error(request: Request, exc: EngineError):
    return error_response(500, str(exc), engine_code(exc), type_="server_error")


async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(400, str(exc), "invalid_request")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error a route raises with the OpenAI error object: APIError as given, RequestError 400 (429
    when the queue is full), HTTP errors (unknown route, wrong method) with their status, EngineError 500."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
