"""Durable sessions: POST /v1/sessions, GET /v1/sessions, GET|DELETE /v1/sessions/{id},
GET /v1/sessions/{id}/messages, POST /v1/sessions/{id}/fork."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .. import protocol as P
from ..handling import Context, query_int, read_optional_json
from ..protocol import APIError
from ..sessions import LIST_LIMIT

router = APIRouter()


@router.post("/v1/sessions", status_code=201)
async def create_session(request: Request, ctx: Context):
    body = await read_optional_json(request)
    sid = body.get("id")
    if sid is not None:
        P.check_session_id(sid, "id")
    system = P.optional_text(body, "system", P.MAX_SYSTEM_CHARS)
    title = P.optional_text(body, "title", P.MAX_TITLE_CHARS)
    return ctx.store.public(await ctx.run(ctx.store.create, sid, system, title))


@router.get("/v1/sessions")
async def list_sessions(request: Request, ctx: Context):
    limit = query_int(request, "limit", 100, 1, LIST_LIMIT)
    after = request.query_params.get("after")
    if after is not None:
        P.check_session_id(after, "after")
    return await ctx.run(ctx.store.list, limit, after)


@router.get("/v1/sessions/{sid}/messages")
async def session_messages(sid: str, request: Request, ctx: Context):
    P.check_session_id(sid, "session_id")
    offset = query_int(request, "offset", 0, 0, 1 << 30)
    limit = query_int(request, "limit", 100, 1, LIST_LIMIT)
    return await ctx.run(ctx.store.messages, sid, offset, limit)


@router.get("/v1/sessions/{sid}")
async def get_session(sid: str, ctx: Context):
    P.check_session_id(sid, "session_id")
    meta = ctx.store.public(await ctx.run(ctx.store.get, sid))
    meta["busy"] = sid in ctx.busy
    return meta


@router.delete("/v1/sessions/{sid}")
async def delete_session(sid: str, ctx: Context):
    P.check_session_id(sid, "session_id")
    if sid in ctx.busy:
        raise APIError(409, f"session '{sid}' has a reply in progress", param="session", code="session_busy")
    await ctx.run(ctx.store.delete, sid)
    return {"id": sid, "object": "session", "deleted": True}


@router.post("/v1/sessions/{sid}/fork", status_code=201)
async def fork_session(sid: str, request: Request, ctx: Context):
    P.check_session_id(sid, "session_id")
    body = await read_optional_json(request)
    new = body.get("id")
    if new is not None:
        P.check_session_id(new, "id")
    title = P.optional_text(body, "title", P.MAX_TITLE_CHARS)
    return ctx.store.public(await ctx.run(ctx.store.fork, sid, new, title))
