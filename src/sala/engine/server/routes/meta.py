"""``/health`` (liveness and engine counters, no key needed) and ``/v1/models`` (the one model served)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from sala.engine.server.context import ServerContext, server_context

router = APIRouter()


@router.get("/health")
async def health(ctx: ServerContext = Depends(server_context)):
    return {"status": "ok", **ctx.engine.stats()}


@router.get("/v1/models")
async def models(request: Request, ctx: ServerContext = Depends(server_context)):
    ctx.check_auth(request)
    return {"object": "list", "data": [{"id": ctx.cfg.model_name, "object": "model", "created": 0, "owned_by": "sala",
                                        "max_model_len": ctx.capacity}]}
