"""Generation: POST /v1/chat/completions and POST /v1/completions, whole or streamed as SSE.

Both take an extra field "initial_state": the name of a state in --init-states (a state-tuned persona),
which the request (or a session's first turn) starts from. A chat request with an extra field "session"
reads only its last message, continuing that session's saved state, and saves the turn before its last
chunk is sent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import APIRouter, Request

from ...chat import TURN_END, conversation_segments, encode_segments, user_turn
from .. import protocol as P
from ..handling import AppContext, Context, SessionTurn, read_json, sse_response
from ..protocol import APIError, GenRequest
from ..scheduler import Job

router = APIRouter()


@dataclass(frozen=True)
class Reply:
    """What every chunk of one reply repeats: its id, creation time and model name."""
    id: str
    created: int
    model: str


def new_reply(prefix: str, req: GenRequest, ctx: AppContext) -> Reply:
    return Reply(P.new_id(prefix), int(time.time()), req.model or ctx.model_name)


def usage(job: Job) -> dict:
    return P.usage(job.prompt_tokens, len(job.generated))


# --------------------------------------------------------------------------- chat completions

@router.post("/v1/chat/completions")
async def chat_completions(request: Request, ctx: Context):
    req = P.parse_chat(await read_json(request), ctx.cfg)
    turn = ctx.begin_turn(req.session)
    try:
        job = await start_chat(ctx, req)
    except BaseException:
        turn.end()
        raise
    reply = new_reply("chatcmpl", req, ctx)
    if not req.stream:
        return await whole_chat(ctx, req, job, turn, reply, request)
    return sse_response(chat_events(ctx, req, job, turn, reply))


async def start_chat(ctx: AppContext, req: GenRequest) -> Job:
    """The request's job: with a session, its last message read on the session's saved state (or, on the
    first turn, on the system prompt and the named initial state); without, the whole conversation."""
    sid = req.session
    close_turn = False
    if sid is not None:
        meta = await ctx.run(ctx.store.get, sid)
        state = await ctx.run(ctx.store.load_state, sid)
        message = req.messages[-1]["content"]
        system = None
        if state is None:
            system = meta.get("system") or next((m["content"] for m in req.messages if m["role"] == "system"), None)
            state = ctx.initial_state(req.initial_state)
        elif req.initial_state is not None:
            raise P.bad("'initial_state' starts a conversation; this session already has turns", "initial_state")
        segments = user_turn(message, system)
        close_turn = True
    else:
        segments = conversation_segments(req.messages)
        state = ctx.initial_state(req.initial_state)
    tokens, ends = encode_segments(ctx.model.tokenizer, segments)
    boundaries = tuple(sorted({ends[0], ends[-1]})) if ends else ()  # system prompt; the whole history
    sampling = dict(req.sampling, stop=tuple(req.sampling["stop"]) + (TURN_END,))
    return ctx.submit(tokens, sampling, state, close_turn, chat=True, boundaries=boundaries)


async def whole_chat(ctx: AppContext, req: GenRequest, job: Job, turn: SessionTurn, reply: Reply,
                     request: Request) -> dict:
    try:
        await ctx.wait_done(job, request)
        await turn.save(job, req.messages[-1]["content"])
    finally:
        job.cancel()
        turn.end()  # after the save: the session stays busy until it is saved
    return P.chat_response(reply.id, reply.model, job.text, job.finish_reason, usage(job), req.session)


async def chat_events(ctx: AppContext, req: GenRequest, job: Job, turn: SessionTurn, reply: Reply):
    sid = req.session
    try:
        yield P.sse(P.chat_chunk(reply.id, reply.created, reply.model, {"role": "assistant", "content": ""},
                                 session=sid))
        while True:
            kind, payload = await ctx.next_event(job)
            if kind == "text":
                yield P.sse(P.chat_chunk(reply.id, reply.created, reply.model, {"content": payload}, session=sid))
            elif kind == "error":
                yield P.sse(P.error_body(payload, "server_error", None, "generation_failed"))
                break
            else:
                try:
                    await turn.save(job, req.messages[-1]["content"])
                except APIError as e:
                    yield P.sse(e.body())
                    break
                yield P.sse(P.chat_chunk(reply.id, reply.created, reply.model, {}, job.finish_reason, session=sid))
                if req.include_usage:
                    yield P.sse(P.chat_chunk(reply.id, reply.created, reply.model, None, None, usage(job),
                                             session=sid))
                break
        yield P.SSE_DONE
    finally:
        job.cancel()
        turn.end()


# --------------------------------------------------------------------------- completions

@router.post("/v1/completions")
async def completions(request: Request, ctx: Context):
    req = P.parse_completion(await read_json(request), ctx.cfg, ctx.model.config.vocab_size)
    tokens = ctx.model.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    job = ctx.submit(tokens, req.sampling, ctx.initial_state(req.initial_state))
    reply = new_reply("cmpl", req, ctx)
    if not req.stream:
        try:
            await ctx.wait_done(job, request)
        finally:
            job.cancel()
        return P.completion_response(reply.id, reply.model, job.text, job.finish_reason, usage(job))
    return sse_response(completion_events(ctx, req, job, reply))


async def completion_events(ctx: AppContext, req: GenRequest, job: Job, reply: Reply):
    try:
        while True:
            kind, payload = await ctx.next_event(job)
            if kind == "text":
                yield P.sse(P.completion_chunk(reply.id, reply.created, reply.model, payload))
            elif kind == "error":
                yield P.sse(P.error_body(payload, "server_error", None, "generation_failed"))
                break
            else:
                yield P.sse(P.completion_chunk(reply.id, reply.created, reply.model, "", job.finish_reason))
                if req.include_usage:
                    yield P.sse(P.completion_chunk(reply.id, reply.created, reply.model, None, None, usage(job)))
                break
        yield P.SSE_DONE
    finally:
        job.cancel()
