"""OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming or not),
``/v1/models``, ``/health``. FastAPI + uvicorn; the engine runs in its own thread (:class:`AsyncEngine`).

Bad requests get a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / invalid fields / context or max_tokens limits, 401 missing or wrong API key,
404 unknown model or route, 413 body too large, 429 queue full, 500 anything unexpected (never a plain-text
page: a catch-all middleware answers with the same JSON object and keeps the connection usable). A request whose
logits turn non-finite ends with a 500 (or, once streaming, an SSE ``error`` event); the others go on. A client
that disconnects cancels its request, which frees its cache slot at the next engine step. With an API key the
docs pages (``/docs``, ``/redoc``, ``/openapi.json``) are off.

This module assembles the app; the routes live in :mod:`sala.engine.server.routes`, the request checks they share
in :mod:`~sala.engine.server.context`, error replies in :mod:`~sala.engine.server.errors` and output framing in
:mod:`~sala.engine.server.streams`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI

from sala.engine.server.async_engine import AsyncEngine
from sala.engine.server.context import ServerConfig, ServerContext
from sala.engine.server.errors import APIError, CatchAll, install_error_handlers
from sala.engine.server.routes import ROUTERS
from sala.engine.server.streams import sse_guard as _sse_guard  # noqa: F401  (its old home; tests import it here)

__all__ = ["APIError", "ServerConfig", "create_app", "serve"]

logger = logging.getLogger(__name__)


def create_app(engine: AsyncEngine, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """Build the FastAPI app around a started-or-not :class:`AsyncEngine` (its lifespan starts and stops it)."""
    cfg = config or ServerConfig()

    async def lifespan(app: FastAPI):
        if not engine.running:
            engine.start()
        yield
        engine.shutdown()

    docs = {} if cfg.api_key is None else dict(docs_url=None, redoc_url=None, openapi_url=None)  # no key-less pages
    app = FastAPI(title="sala", lifespan=lifespan, **docs)
    app.state.sala = ServerContext(engine, tokenizer, cfg)  # what the routes reach through ``server_context``
    app.add_middleware(CatchAll)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
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
