"""OpenAI-compatible server over the engine: protocol schemas, the engine thread, the FastAPI app."""

from sala.engine.server.app import ServerConfig, create_app, serve
from sala.engine.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "ServerConfig", "create_app", "serve"]
