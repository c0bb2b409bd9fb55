"""GET /health (open without the API key: slots, queue, steps) and GET /v1/models."""
from __future__ import annotations

from fastapi import APIRouter

from ..handling import Context

router = APIRouter()


@router.get("/health")
async def health(ctx: Context):
    return {"status": "ok", "model": ctx.model_name, "sessions_dir": str(ctx.store.dir), **ctx.scheduler.stats()}


@router.get("/v1/models")
async def models(ctx: Context):
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": ctx.started,
                                        "owned_by": "edge-rwkv", "fingerprint": ctx.model.fingerprint,
                                        "initial_states": sorted(ctx.initial_states)}]}
