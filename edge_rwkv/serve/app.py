"""The daemon's HTTP application: OpenAI-compatible endpoints, durable sessions, the web chat page.

    POST /v1/chat/completions   (stream or not; extra body field "session": continue that session)
    POST /v1/completions        (raw text or token-id prompt)
    GET  /v1/models             GET /health
    POST /v1/sessions           GET /v1/sessions   GET|DELETE /v1/sessions/{id}   POST /v1/sessions/{id}/fork
    GET  /                      the web chat page
Both generation endpoints take an extra field "initial_state": the name of a state in --init-states (a
state-tuned persona), which the request (or a session's first turn) starts from; /v1/models lists them.

Safe defaults: loopback bind, Host-header check against DNS rebinding while bound to loopback,
optional bearer API key (not needed for /health and the page; required off loopback), CORS only for
named origins, a cap on request bodies and on the time to send one, and an OpenAI-style 4xx error
body for every bad request.

Cross-site requests: a browser sends any page's "simple" requests (form, text/plain) to
127.0.0.1 without asking, so request bodies must be declared `application/json` (which a page can
only send after a CORS preflight this server refuses) and a request from a browser page whose
`Origin` is neither this server's own nor one named with --cors-origin is refused (403), reads
included.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..chat import TURN_END, clean_message, conversation_segments, encode_segments, user_turn
from ..errors import EdgeRWKVError, InputError
from ..sampling import SamplingParams
from . import protocol as P
from .protocol import APIError
from .scheduler import Job, Overloaded, Scheduler
from .sessions import LIST_LIMIT, SessionStore

log = logging.getLogger("edge_rwkv.serve")
WEB_PAGE = Path(__file__).parent / "web" / "index.html"
# the browser tab's icon: a speech bubble on the page's accent colour (browsers take SVG at this path)
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
               'fill="#2f6fde"/><path d="M3.5 4h9v6H8.2L5 12.5V10H3.5z" fill="#fff"/></svg>')
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
DISCONNECT_POLL_S = 0.2


@dataclass
class ServeConfig:
    data_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_slots: int = 4
    queue: int = 16
    cors_origins: list[str] = field(default_factory=list)
    max_tokens_limit: int = 2048
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    default_top_p: float = 0.85
    hot_sessions: int = 64
    prefill_budget: int | None = 128  # prompt tokens read per engine step, so decoding streams keep flowing
    prefix_cache_bytes: int = 256 << 20  # host memory for states of known prompt prefixes
    model_name: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    init_states_dir: str | None = None  # folder of named initial states (state-tuning or edge-rwkv state files)
    max_sessions: int | None = 10000
    body_timeout: float = 10.0  # seconds to send a whole request body


INIT_STATE_SUFFIXES = (".pth", ".pt", ".safetensors", ".state")


def load_initial_states(model, folder: str | None) -> dict:
    """name (file stem) → State for every state file in `folder`; a bad file stops the daemon at start."""
    if folder is None:
        return {}
    d = Path(folder)
    if not d.is_dir():
        raise EdgeRWKVError(f"{d}: --init-states must be a folder of state files")
    states = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in INIT_STATE_SUFFIXES:
            if not P.STATE_NAME.fullmatch(f.stem):
                raise EdgeRWKVError(f"{f}: initial state names are letters, digits, '_' or '-' (rename the file)")
            if f.stem in states:
                raise EdgeRWKVError(f"{d}: two files are named {f.stem!r}")
            states[f.stem] = model.initial_state(f)
    return states


class ClientGone(Exception):
    """The client closed the connection before its reply was ready."""


def check_api_key(key: str | None) -> None:
    """A bearer token travels in an HTTP header: printable ASCII without spaces, or it could never match."""
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise EdgeRWKVError("--api-key must be printable ASCII without spaces (other characters cannot be sent "
                            "reliably in an HTTP header, so no client could ever match it)")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_port(header: str) -> int | None:
    h = header.strip()
    tail = h[h.find("]") + 1:] if h.startswith("[") else (h if h.count(":") == 1 else "")
    port = tail.rsplit(":", 1)[1] if ":" in tail else ""
    return int(port) if port.isdigit() and len(port) <= 5 else None


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin is the server the request reached (scheme http(s), Host name and port)."""
    try:
        u = urlsplit(origin)
        port = u.port
    except ValueError:
        return False
    if u.scheme not in ("http", "https") or not u.hostname or u.path or u.query:
        return False
    default = 443 if u.scheme == "https" else 80
    return (u.hostname == host_name(host_header)
            and (port or default) == (host_port(host_header) or default))


def _json_error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware, before any route code runs: Host check, Origin check, API key, JSON content type,
    body-size cap and body-time limit."""

    def __init__(self, app, cfg: ServeConfig):
        check_api_key(cfg.api_key)
        self.app, self.cfg = app, cfg
        self.check_host = is_loopback(cfg.host)
        self.allowed = LOOPBACK_NAMES | {h.lower() for h in cfg.allowed_hosts}
        self.cors = set(cfg.cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        err = self._check(scope, headers)
        if err is not None:
            return await err(scope, receive, send)
        cap, timeout = self.cfg.max_body_bytes, self.cfg.body_timeout
        seen, body_done, deadline = 0, False, None
        loop = asyncio.get_running_loop()

        async def limited_receive():
            nonlocal seen, body_done, deadline
            if body_done:  # after the body: waiting for a disconnect may last as long as the reply
                return await receive()
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body was not sent within {timeout:g} s", code="body_timeout",
                               headers={"Connection": "close"}) from None  # the rest of the body may never come
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise APIError(413, f"request body is larger than {cap} bytes", code="body_too_large",
                                   headers={"Connection": "close"})
                body_done = not msg.get("more_body", False)
            else:
                body_done = True
            return msg

        await self.app(scope, limited_receive, send)

    def _check(self, scope, headers):
        if self.check_host and host_name(headers.get("host", "")) not in self.allowed:
            return _json_error(403, P.error_body("Host header not allowed (this server only answers to localhost)",
                                                 "permission_error", None, "invalid_host"))
        origin = headers.get("origin")
        if (origin is not None and origin not in self.cors and "*" not in self.cors
                and not same_origin(origin, headers.get("host", ""))):
            return _json_error(403, P.error_body("requests from other web pages are not allowed (Origin "
                                                 f"{origin[:100]!r}; see --cors-origin)", "permission_error",
                                                 None, "origin_not_allowed"))
        path = scope.get("path", "")
        method = scope.get("method")
        if self.cfg.api_key and path.startswith("/v1/") and method != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            # headers arrive as Latin-1; the key is ASCII (check_api_key), so equal keys give equal bytes
            if not hmac.compare_digest(given.encode("latin-1"), self.cfg.api_key.encode("latin-1")):
                return _json_error(401, P.error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                     "authentication_error", None, "invalid_api_key"),
                                   {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if method in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            has_body = length not in (None, "0") or "transfer-encoding" in headers
            if (media or has_body) and media != "application/json":
                return _json_error(415, P.error_body("request bodies must be JSON sent as "
                                                     "'Content-Type: application/json'", code="unsupported_media_type"))
        if length is not None:
            if not length.isdigit():
                return _json_error(400, P.error_body("invalid Content-Length", code="invalid_request"))
            if int(length) > self.cfg.max_body_bytes:
                return _json_error(413, P.error_body(f"request body is larger than {self.cfg.max_body_bytes} bytes",
                                                     code="body_too_large"))
        return None


def create_app(model, cfg: ServeConfig) -> FastAPI:
    store = SessionStore(cfg.data_dir, model, hot=cfg.hot_sessions, max_sessions=cfg.max_sessions)
    sched = Scheduler(model, cfg.max_slots, cfg.queue, cfg.prefill_budget, cfg.prefix_cache_bytes)
    model_name = cfg.model_name or Path(str(model.path)).stem
    initial_states = load_initial_states(model, cfg.init_states_dir)
    busy: dict[str, object] = {}  # session id → the request continuing it
    job_held: dict = {}  # job → an event taken from its queue behind merged text, delivered next
    vocab = model.config.vocab_size
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        sched.start()
        yield
        sched.stop()

    app = FastAPI(title="edge-rwkv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.sessions = sched, store

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _json_error(e.status, e.body(), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = "no such endpoint" if e.status_code == 404 else str(e.detail)
        return _json_error(e.status_code, P.error_body(msg, kind, None, None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _json_error(400, P.error_body("invalid request", code="invalid_request"))

    @app.exception_handler(InputError)
    async def _input_error(request, e):
        return _json_error(400, P.error_body(str(e), code="invalid_value"))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # gone while sending its body
    async def _client_gone(request, e):  # nobody reads it: the connection is closed
        return _json_error(499, P.error_body("the client closed the connection", code="client_closed_request"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("internal error")
        return _json_error(500, P.error_body("internal server error", "server_error", None, None))

    async def read_json(request: Request) -> dict:
        return P.parse_json(await request.body())

    async def run(fn, *a):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *a)

    # ------------------------------------------------------------------ basic
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "sessions_dir": str(store.dir), **sched.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "edge-rwkv", "fingerprint": model.fingerprint,
                                            "initial_states": sorted(initial_states)}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"), headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    # ------------------------------------------------------------------ sessions
    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request):
        body = await read_json(request) if (await request.body()).strip() else {}
        sid = body.get("id")
        if sid is not None:
            P.check_session_id(sid, "id")
        system = P.optional_text(body, "system", P.MAX_SYSTEM_CHARS)
        title = P.optional_text(body, "title", P.MAX_TITLE_CHARS)
        return store.public(await run(store.create, sid, system, title))

    def query_int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
        v = request.query_params.get(key)
        if v is None:
            return default
        if not v.isdigit() or len(v) > 9 or not lo <= int(v) <= hi:
            raise P.bad(f"'{key}' must be an integer in [{lo}, {hi}]", key)
        return int(v)

    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        limit = query_int(request, "limit", 100, 1, LIST_LIMIT)
        after = request.query_params.get("after")
        if after is not None:
            P.check_session_id(after, "after")
        return await run(store.list, limit, after)

    @app.get("/v1/sessions/{sid}/messages")
    async def session_messages(sid: str, request: Request):
        P.check_session_id(sid, "session_id")
        offset = query_int(request, "offset", 0, 0, 1 << 30)
        limit = query_int(request, "limit", 100, 1, LIST_LIMIT)
        return await run(store.messages, sid, offset, limit)

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str):
        P.check_session_id(sid, "session_id")
        meta = store.public(await run(store.get, sid))
        meta["busy"] = sid in busy
        return meta

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        P.check_session_id(sid, "session_id")
        if sid in busy:
            raise APIError(409, f"session '{sid}' has a reply in progress", param="session", code="session_busy")
        await run(store.delete, sid)
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{sid}/fork", status_code=201)
    async def fork_session(sid: str, request: Request):
        P.check_session_id(sid, "session_id")
        body = await read_json(request) if (await request.body()).strip() else {}
        new = body.get("id")
        if new is not None:
            P.check_session_id(new, "id")
        title = P.optional_text(body, "title", P.MAX_TITLE_CHARS)
        return store.public(await run(store.fork, sid, new, title))

    # ------------------------------------------------------------------ generation
    def initial_state(name: str | None):
        """The named initial state (a copy: a job advances its state), or None."""
        if name is None:
            return None
        if name not in initial_states:
            have = ", ".join(sorted(initial_states)) or "none (start the server with --init-states DIR)"
            raise P.bad(f"unknown initial_state '{name}'; this server has: {have}", "initial_state",
                        "unknown_initial_state")
        return initial_states[name].clone()

    def make_job(tokens, sampling, state=None, close_turn=False, chat=False, boundaries=()) -> Job:
        if len(tokens) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(tokens)} tokens; this server accepts at most "
                                f"{cfg.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if not tokens:
            raise P.bad("the prompt is empty", "prompt")
        try:
            params = SamplingParams(**sampling)
        except InputError as e:
            raise P.bad(str(e)) from None
        job = Job(tokens, params, model.tokenizer, asyncio.get_running_loop(), state=state,
                  close_turn=close_turn, strip_leading=chat, boundaries=boundaries)
        try:
            sched.submit(job)
        except Overloaded:
            raise APIError(429, "the server is busy (all slots and the queue are full); retry shortly",
                           "rate_limit_error", None, "server_overloaded", {"Retry-After": "1"}) from None
        return job

    async def next_event(job: Job):
        """The job's next event; text events waiting behind it are merged into one: under load a
        stream gets one SSE chunk per pass of this loop, not one per token, so writing to clients
        does not fall behind the engine."""
        held = job_held.pop(job, None)
        kind, payload = held if held is not None else await job.events.get()
        if kind != "text":
            return kind, payload
        parts = [payload]
        while not job.events.empty():
            k, p = job.events.get_nowait()
            if k != "text":
                job_held[job] = (k, p)
                break
            parts.append(p)
        return kind, "".join(parts)

    async def wait_done(job: Job, request: Request) -> None:
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = P.parse_chat(await read_json(request), cfg)
        sid = req.session
        state, close_turn = None, False
        if sid is not None:
            if sid in busy:
                raise APIError(409, f"session '{sid}' already has a reply in progress", param="session",
                               code="session_busy")
            token = object()
            busy[sid] = token
        try:
            if sid is not None:
                meta = await run(store.get, sid)
                state = await run(store.load_state, sid)
                message = req.messages[-1]["content"]
                system = None
                if state is None:
                    system = meta.get("system") or next((m["content"] for m in req.messages
                                                         if m["role"] == "system"), None)
                    state = initial_state(req.initial_state)
                elif req.initial_state is not None:
                    raise P.bad("'initial_state' starts a conversation; this session already has turns",
                                "initial_state")
                segments = user_turn(message, system)
                close_turn = True
            else:
                segments = conversation_segments(req.messages)
                state = initial_state(req.initial_state)
            tokens, ends = encode_segments(model.tokenizer, segments)
            boundaries = tuple(sorted({ends[0], ends[-1]})) if ends else ()  # system prompt; the whole history
            sampling = dict(req.sampling, stop=tuple(req.sampling["stop"]) + (TURN_END,))
            job = make_job(tokens, sampling, state, close_turn, chat=True, boundaries=boundaries)
        except BaseException:
            if sid is not None:
                busy.pop(sid, None)
            raise
        rid = P.new_id("chatcmpl")
        created = int(time.time())

        def transcript():
            return [{"role": "user", "content": clean_message(req.messages[-1]["content"])},
                    {"role": "assistant", "content": job.text}]

        def release():
            if sid is not None and busy.get(sid) is token:
                busy.pop(sid, None)

        if not req.stream:
            commit = None
            try:
                await wait_done(job, request)
                if sid is not None:
                    commit = asyncio.ensure_future(_commit(sid, job, transcript()))
                    await asyncio.shield(commit)
            finally:
                job.cancel()
                if commit is not None and not commit.done():  # keep the session busy until it is saved
                    commit.add_done_callback(lambda _: release())
                else:
                    release()
            return P.chat_response(rid, req.model or model_name, job.text, job.finish_reason,
                                   P.usage(job.prompt_tokens, len(job.generated)), sid)

        name = req.model or model_name

        async def events():
            commit = None
            try:
                yield P.sse(P.chat_chunk(rid, created, name, {"role": "assistant", "content": ""}, session=sid))
                while True:
                    kind, payload = await next_event(job)
                    if kind == "text":
                        yield P.sse(P.chat_chunk(rid, created, name, {"content": payload}, session=sid))
                    elif kind == "error":
                        yield P.sse(P.error_body(payload, "server_error", None, "generation_failed"))
                        break
                    else:
                        if sid is not None:
                            commit = asyncio.ensure_future(_commit(sid, job, transcript()))
                            try:
                                await asyncio.shield(commit)
                            except APIError as e:
                                yield P.sse(e.body())
                                break
                        yield P.sse(P.chat_chunk(rid, created, name, {}, job.finish_reason, session=sid))
                        if req.include_usage:
                            yield P.sse(P.chat_chunk(rid, created, name, None, None,
                                                     P.usage(job.prompt_tokens, len(job.generated)), session=sid))
                        break
                yield P.SSE_DONE
            finally:
                job.cancel()
                if commit is not None and not commit.done():
                    commit.add_done_callback(lambda _: release())
                else:
                    release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _commit(sid: str, job: Job, messages: list[dict]) -> None:
        try:
            await run(store.commit_turn, sid, job.final_state, messages)
        except APIError:
            raise
        except Exception as e:  # disk full, permissions: the turn is not saved, and the client is told
            log.exception("saving session %s failed", sid)
            raise APIError(500, f"the reply could not be saved to the session: {e}", "server_error", "session",
                           "session_save_failed") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = P.parse_completion(await read_json(request), cfg, vocab)
        tokens = model.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        job = make_job(tokens, req.sampling, initial_state(req.initial_state))
        rid = P.new_id("cmpl")
        created = int(time.time())
        name = req.model or model_name
        if not req.stream:
            try:
                await wait_done(job, request)
            finally:
                job.cancel()
            return P.completion_response(rid, name, job.text, job.finish_reason,
                                         P.usage(job.prompt_tokens, len(job.generated)))

        async def events():
            try:
                while True:
                    kind, payload = await next_event(job)
                    if kind == "text":
                        yield P.sse(P.completion_chunk(rid, created, name, payload))
                    elif kind == "error":
                        yield P.sse(P.error_body(payload, "server_error", None, "generation_failed"))
                        break
                    else:
                        yield P.sse(P.completion_chunk(rid, created, name, "", job.finish_reason))
                        if req.include_usage:
                            yield P.sse(P.completion_chunk(rid, created, name, None, None,
                                                           P.usage(job.prompt_tokens, len(job.generated))))
                        break
                yield P.SSE_DONE
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    wrapped = Guard(app, cfg)
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        wrapped = CORSMiddleware(wrapped, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                                 allow_headers=["authorization", "content-type", "x-api-key"])
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped
