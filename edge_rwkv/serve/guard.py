"""The Guard: ASGI middleware in front of every route. Before any route code runs it checks the Host
header (against DNS rebinding while bound to loopback), the browser's Origin, the API key, the JSON
content type, and caps the request body's size and the time to send it.

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
import re
from urllib.parse import urlsplit

from ..errors import EdgeRWKVError
from . import protocol as P
from .config import ServeConfig
from .handling import json_error
from .protocol import APIError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


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
        await self.app(scope, LimitedBody(receive, self.cfg.max_body_bytes, self.cfg.body_timeout), send)

    def _check(self, scope, headers):
        if self.check_host and host_name(headers.get("host", "")) not in self.allowed:
            return json_error(403, P.error_body("Host header not allowed (this server only answers to localhost)",
                                                "permission_error", None, "invalid_host"))
        origin = headers.get("origin")
        if (origin is not None and origin not in self.cors and "*" not in self.cors
                and not same_origin(origin, headers.get("host", ""))):
            return json_error(403, P.error_body("requests from other web pages are not allowed (Origin "
                                                f"{origin[:100]!r}; see --cors-origin)", "permission_error",
                                                None, "origin_not_allowed"))
        path = scope.get("path", "")
        method = scope.get("method")
        if self.cfg.api_key and path.startswith("/v1/") and method != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            # headers arrive as Latin-1; the key is ASCII (check_api_key), so equal keys give equal bytes
            if not hmac.compare_digest(given.encode("latin-1"), self.cfg.api_key.encode("latin-1")):
                return json_error(401, P.error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                                    "authentication_error", None, "invalid_api_key"),
                                  {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if method in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            has_body = length not in (None, "0") or "transfer-encoding" in headers
            if (media or has_body) and media != "application/json":
                return json_error(415, P.error_body("request bodies must be JSON sent as "
                                                    "'Content-Type: application/json'", code="unsupported_media_type"))
        if length is not None:
            if not length.isdigit():
                return json_error(400, P.error_body("invalid Content-Length", code="invalid_request"))
            if int(length) > self.cfg.max_body_bytes:
                return json_error(413, P.error_body(f"request body is larger than {self.cfg.max_body_bytes} bytes",
                                                    code="body_too_large"))
        return None


class LimitedBody:
    """A request's ASGI receive channel, cut off once the body passes `cap` bytes or takes longer than
    `timeout` seconds to arrive (a Content-Length can be absent or wrong: the bytes themselves are counted)."""

    def __init__(self, receive, cap: int, timeout: float):
        self.receive, self.cap, self.timeout = receive, cap, timeout
        self.seen, self.body_done, self.deadline = 0, False, None

    async def __call__(self):
        if self.body_done:  # after the body: waiting for a disconnect may last as long as the reply
            return await self.receive()
        loop = asyncio.get_running_loop()
        if self.deadline is None:
            self.deadline = loop.time() + self.timeout
        try:
            msg = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - loop.time()))
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body was not sent within {self.timeout:g} s", code="body_timeout",
                           headers={"Connection": "close"}) from None  # the rest of the body may never come
        if msg["type"] == "http.request":
            self.seen += len(msg.get("body", b""))
            if self.seen > self.cap:
                raise APIError(413, f"request body is larger than {self.cap} bytes", code="body_too_large",
                               headers={"Connection": "close"})
            self.body_done = not msg.get("more_body", False)
        else:
            self.body_done = True
        return msg
