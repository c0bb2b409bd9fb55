"""The request handling every route shares, in one place: the OpenAI-style error envelope for every
failure, reading a JSON body and query numbers, the SSE response, and the `AppContext` the routes
receive — the model, the session store and the scheduler, with the hand-off of a request to them
(a job submitted, its events read, a client that leaves noticed, a chat turn saved to its session).

The Guard (guard.py) has already checked Host, Origin, API key, content type and body size by the time
a route runs.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..chat import clean_message
from ..errors import InputError
from ..sampling import SamplingParams
from . import protocol as P
from .config import ServeConfig, load_initial_states
from .protocol import APIError
from .scheduler import Job, Overloaded, Scheduler
from .sessions import SessionStore

log = logging.getLogger("edge_rwkv.serve")
DISCONNECT_POLL_S = 0.2
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client closed the connection before its reply was ready."""


# --------------------------------------------------------------------------- error envelopes

def json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(request, e: APIError):
    return json_error(e.status, e.body(), e.headers)


async def http_error(request, e: StarletteHTTPException):
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
    msg = "no such endpoint" if e.status_code == 404 else str(e.detail)
    return json_error(e.status_code, P.error_body(msg, kind, None, None))


async def validation_error(request, e):
    return json_error(400, P.error_body("invalid request", code="invalid_request"))


async def input_error(request, e):
    return json_error(400, P.error_body(str(e), code="invalid_value"))


async def client_gone(request, e):  # nobody reads it: the connection is closed
    return json_error(499, P.error_body("the client closed the connection", code="client_closed_request"))


async def internal_error(request, e):
    log.exception("internal error")
    return json_error(500, P.error_body("internal server error", "server_error", None, None))


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answers with `{"error": {message, type, param, code}}`, never a framework page."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(ClientDisconnect, client_gone)  # gone while sending its body
    app.add_exception_handler(Exception, internal_error)


# --------------------------------------------------------------------------- reading requests, writing SSE

async def read_json(request: Request) -> dict:
    return P.parse_json(await request.body())


async def read_optional_json(request: Request) -> dict:
    """The body's JSON object; an empty body is an empty object (the endpoints whose fields are all optional)."""
    return await read_json(request) if (await request.body()).strip() else {}


def query_int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    v = request.query_params.get(key)
    if v is None:
        return default
    if not v.isdigit() or len(v) > 9 or not lo <= int(v) <= hi:
        raise P.bad(f"'{key}' must be an integer in [{lo}, {hi}]", key)
    return int(v)


def sse_response(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


# --------------------------------------------------------------------------- the context routes receive

class AppContext:
    """One daemon's model, session store and scheduler, and the hand-off of requests to them."""

    def __init__(self, model, cfg: ServeConfig):
        self.model, self.cfg = model, cfg
        self.store = SessionStore(cfg.data_dir, model, hot=cfg.hot_sessions, max_sessions=cfg.max_sessions)
        self.scheduler = Scheduler(model, cfg.max_slots, cfg.queue, cfg.prefill_budget, cfg.prefix_cache_bytes)
        self.model_name = cfg.model_name or Path(str(model.path)).stem
        self.initial_states = load_initial_states(model, cfg.init_states_dir)
        self.busy: dict[str, SessionTurn] = {}  # session id → the turn in progress on it
        self.held: dict[Job, tuple] = {}  # job → an event taken from its queue behind merged text, delivered next
        self.started = int(time.time())

    async def run(self, fn, *a):
        """`fn(*a)` off the event loop (file I/O of the session store)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *a)

    def initial_state(self, name: str | None):
        """The named initial state (a copy: a job advances its state), or None."""
        if name is None:
            return None
        if name not in self.initial_states:
            have = ", ".join(sorted(self.initial_states)) or "none (start the server with --init-states DIR)"
            raise P.bad(f"unknown initial_state '{name}'; this server has: {have}", "initial_state",
                        "unknown_initial_state")
        return self.initial_states[name].clone()

    def submit(self, tokens, sampling: dict, state=None, close_turn=False, chat=False, boundaries=()) -> Job:
        """A job for the prompt, queued on the scheduler; a prompt too long or a full queue is refused here."""
        if len(tokens) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(tokens)} tokens; this server accepts at most "
                                f"{self.cfg.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if not tokens:
            raise P.bad("the prompt is empty", "prompt")
        try:
            params = SamplingParams(**sampling)
        except InputError as e:
            raise P.bad(str(e)) from None
        job = Job(tokens, params, self.model.tokenizer, asyncio.get_running_loop(), state=state,
                  close_turn=close_turn, strip_leading=chat, boundaries=boundaries)
        try:
            self.scheduler.submit(job)
        except Overloaded:
            raise APIError(429, "the server is busy (all slots and the queue are full); retry shortly",
                           "rate_limit_error", None, "server_overloaded", {"Retry-After": "1"}) from None
        return job

    async def next_event(self, job: Job):
        """The job's next event; text events waiting behind it are merged into one: under load a
        stream gets one SSE chunk per pass of this loop, not one per token, so writing to clients
        does not fall behind the engine."""
        held = self.held.pop(job, None)
        kind, payload = held if held is not None else await job.events.get()
        if kind != "text":
            return kind, payload
        parts = [payload]
        while not job.events.empty():
            k, p = job.events.get_nowait()
            if k != "text":
                self.held[job] = (k, p)
                break
            parts.append(p)
        return kind, "".join(parts)

    async def wait_done(self, job: Job, request: Request) -> None:
        """Until the job is done; a client that leaves meanwhile (checked every 0.2 s, tokens flowing
        or not) cancels it, which frees its slot at the next step, and gets nothing committed."""
        loop = asyncio.get_running_loop()
        next_check = loop.time()
        while True:
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue
            if kind == "done":
                if await request.is_disconnected():  # gone while the last tokens came
                    raise ClientGone()
                return
            if kind == "error":
                raise APIError(500, payload, "server_error", None, "generation_failed")

    def begin_turn(self, sid: str | None) -> SessionTurn:
        """Hold the session for one reply (a second turn meanwhile gets 409); without a session, a turn
        that holds and saves nothing."""
        if sid is not None and sid in self.busy:
            raise APIError(409, f"session '{sid}' already has a reply in progress", param="session",
                           code="session_busy")
        turn = SessionTurn(self, sid)
        if sid is not None:
            self.busy[sid] = turn
        return turn

    async def commit_turn(self, sid: str, job: Job, messages: list[dict]) -> None:
        try:
            await self.run(self.store.commit_turn, sid, job.final_state, messages)
        except APIError:
            raise
        except Exception as e:  # disk full, permissions: the turn is not saved, and the client is told
            log.exception("saving session %s failed", sid)
            raise APIError(500, f"the reply could not be saved to the session: {e}", "server_error", "session",
                           "session_save_failed") from None


class SessionTurn:
    """A chat reply continuing a session (or none: `sid` None). The session stays busy until `end`, and
    past it until the turn's save has finished."""

    def __init__(self, ctx: AppContext, sid: str | None):
        self.ctx, self.sid = ctx, sid
        self.saving: asyncio.Future | None = None

    async def save(self, job: Job, message: str) -> None:
        """Commit the user's message, the reply and the job's final state to the session (nothing without
        one). Shielded: a client that leaves meanwhile does not cut the save in half."""
        if self.sid is None:
            return
        transcript = [{"role": "user", "content": clean_message(message)}, {"role": "assistant", "content": job.text}]
        self.saving = asyncio.ensure_future(self.ctx.commit_turn(self.sid, job, transcript))
        await asyncio.shield(self.saving)

    def end(self) -> None:
        """Free the session, at once or, while the save runs on, when it is done."""
        if self.saving is not None and not self.saving.done():
            self.saving.add_done_callback(self._free)
        else:
            self._free()

    def _free(self, _saved=None) -> None:
        if self.sid is not None and self.ctx.busy.get(self.sid) is self:
            self.ctx.busy.pop(self.sid, None)


def context(request: Request) -> AppContext:
    return request.app.state.context


# a route's parameter `ctx: Context` receives the app's AppContext
Context = Annotated[AppContext, Depends(context)]


@asynccontextmanager
async def run_scheduler(app: FastAPI):
    """The app's lifespan: the scheduler thread runs while the server does."""
    scheduler = app.state.context.scheduler
    scheduler.start()
    yield
    scheduler.stop()
