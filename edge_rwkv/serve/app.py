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

This module composes the pieces: the routes (routes/), the request handling they share and the context
they receive (handling.py), and the Guard in front of them (guard.py).
"""
from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from .config import ServeConfig
from .guard import Guard
from .handling import AppContext, install_error_handlers, run_scheduler
from .routes import chat, models, sessions, web

ROUTERS = (models.router, web.router, sessions.router, chat.router)


def create_app(model, cfg: ServeConfig):
    """The ASGI app serving `model`: the FastAPI routes behind the Guard (and CORS for named origins)."""
    context = AppContext(model, cfg)
    app = FastAPI(title="edge-rwkv", lifespan=run_scheduler, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = context
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    wrapped = Guard(app, cfg)
    if cfg.cors_origins:
        wrapped = CORSMiddleware(wrapped, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                                 allow_headers=["authorization", "content-type", "x-api-key"])
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped
