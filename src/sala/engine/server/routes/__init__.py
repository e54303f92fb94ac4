"""The server's routes, one router per concern: ``meta`` (/health, /v1/models), ``completions``
(/v1/completions), ``chat`` (/v1/chat/completions). Each handler gets its app's
:class:`~sala.engine.server.context.ServerContext` through the ``server_context`` dependency."""

from sala.engine.server.routes import chat, completions, meta

ROUTERS = (meta.router, completions.router, chat.router)
"""In the order the app includes them."""

__all__ = ["ROUTERS", "chat", "completions", "meta"]
