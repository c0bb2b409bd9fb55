"""The daemon under hostile requests: every bad request gets a 4xx OpenAI-style JSON error, never a 5xx,
and the server stays healthy; cross-site requests are refused; abandoned requests free their slot.
"""
import json
import socket
import time

import httpx
import pytest

from edge_rwkv.cli import main as cli_main
from edge_rwkv.serve.testing import ServerProcess

HUGE = 10**400
CHAT, COMPLETIONS, SESSIONS = "/v1/chat/completions", "/v1/completions", "/v1/sessions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_hostile") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve_hostile_data")
    with ServerProcess(model_path, data, "--max-slots", "1", "--queue", "4", "--max-tokens-limit", "100000",
                       "--body-timeout", "1", "--max-sessions", "40") as srv:
        srv.data = data
        yield srv


def assert_error(r, status=None, param=None, code=None):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --------------------------------------------------------------------------- JSON bodies

JSON_MATRIX = [
    *[(path, {**base, key: value}, key)
      for path, base in ((CHAT, {"messages": MSG}), (COMPLETIONS, {"prompt": "x"}))
      for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
      for value in (HUGE, -HUGE)],
    (CHAT, {"messages": MSG, "top_k": HUGE}, "top_k"),
    (CHAT, {"messages": MSG, "max_tokens": HUGE}, "max_tokens"),
    (CHAT, {"messages": MSG, "seed": HUGE}, "seed"),
    (CHAT, {"messages": MSG, "n": HUGE}, "n"),
    (COMPLETIONS, {"prompt": [HUGE]}, "prompt"),
    (CHAT, {"messages": MSG, "session": "abc\n"}, "session"),
    (SESSIONS, {"id": "abc\n"}, "id"),
    (SESSIONS, {"title": "t" * 257}, "title"),
    (SESSIONS, {"system": "s" * 32769}, "system"),
    (SESSIONS, {"title": ["x"]}, "title"),
]


@pytest.mark.parametrize("path,body,param", JSON_MATRIX)
def test_bad_json_fields(server, path, body, param):
    r = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=30)
    assert_error(r, 400, param)


@pytest.mark.parametrize("extreme", [{"seed": -(2**63)}, {"seed": 2**64 - 1}, {"top_k": 2**31},
                                     {"temperature": 100, "top_p": 1e-300}, {"presence_penalty": -2.0}])
def test_extreme_accepted_values_generate(server, extreme):
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 2, **extreme}, timeout=60)
    assert r.status_code == 200, r.text


def test_bad_query_and_path(server):
    for q in ("limit=0", "limit=abc", "limit=100000", "limit=-1", "after=..%2Fx", "after=nosuch"):
        assert_error(httpx.get(f"{server.url}{SESSIONS}?{q}"), 400)
    assert_error(httpx.get(f"{server.url}{SESSIONS}/nosuch/messages"), 404)
    assert_error(httpx.get(f"{server.url}{SESSIONS}/x/messages?offset=-3"), 400)
    assert_error(httpx.get(server.url + "/v1/sessions/abc%0A"), 400)


# --------------------------------------------------------------------------- cross-site requests

@pytest.mark.parametrize("ctype,body", [
    ("text/plain", '{"messages": [{"role": "user", "content": "hi"}]}'),
    ("application/x-www-form-urlencoded", "a=1"),
    ("multipart/form-data; boundary=x", "--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n"),
    (None, '{"id": "csrf-1"}'),
])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, SESSIONS, SESSIONS + "/victim/fork"])
def test_simple_requests_need_json_content_type(server, ctype, body, path):
    headers = {"content-type": ctype} if ctype else {}
    r = httpx.post(server.url + path, content=body.encode(), headers=headers)
    if ctype is None:  # httpx sends no content type: a body without one is refused too
        assert "content-type" not in r.request.headers
    assert_error(r, 415, code="unsupported_media_type")


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost.evil.example",
                                    "http://127.0.0.1:1", "https://localhost", "file://", "http://[::1"])
def test_foreign_origin_refused_reads_included(server, origin):
    h = {"Origin": origin}
    assert_error(httpx.post(server.url + SESSIONS, json={}, headers=h), 403, code="origin_not_allowed")
    assert_error(httpx.get(server.url + SESSIONS, headers=h), 403)
    assert_error(httpx.get(server.url + "/v1/models", headers=h), 403)
    assert_error(httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 1}, headers=h), 403)


def test_own_origin_allowed(server):
    for origin in (server.url, f"http://localhost:{server.port}"):
        host = origin.split("//")[1]
        r = httpx.get(server.url + SESSIONS, headers={"Origin": origin, "Host": host})
        assert r.status_code == 200, (origin, r.text)
    r = httpx.post(server.url + SESSIONS, json={}, headers={"Origin": server.url})
    assert r.status_code == 201
    assert httpx.post(server.url + SESSIONS).status_code == 201  # no body, no content type: fine


# --------------------------------------------------------------------------- the HTTP layer itself

def raw(server, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except socket.timeout:
            pass
    return out


def parse_raw(resp: bytes):
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nBad Header Line\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\n: no-name\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", RAW_REQUESTS)
def test_malformed_http_gets_json(server, request_bytes):
    status, body = parse_raw(raw(server, request_bytes))
    assert 400 <= status < 500
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_half_sent_body_times_out(server):
    t0 = time.monotonic()
    resp = raw(server, b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"title\": ", wait=10)
    status, body = parse_raw(resp)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- abandoned requests

def _wait_idle(srv, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        h = httpx.get(srv.url + "/health").json()
        if h["slots_busy"] == 0 and h["queued"] == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"slot still busy after {limit}s: {h}")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_abandoned_non_streaming_request_frees_slot_and_commits_nothing(server, path):
    sid = httpx.post(server.url + SESSIONS, json={}).json()["id"]
    body = {"max_tokens": 100000, "temperature": 1.0}
    body.update({"session": sid, "messages": [{"role": "user", "content": "go on"}]} if path == CHAT
                else {"prompt": "go on"})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + path, json=body, timeout=httpx.Timeout(60, read=1.5))
    left = time.monotonic()  # the client has closed its connection
    _wait_idle(server, 5)
    assert time.monotonic() - left < 1.0
    meta = httpx.get(f"{server.url}{SESSIONS}/{sid}").json()
    assert meta["turns"] == 0 and meta["busy"] is False  # the reply never reached the client: not saved
    assert not (server.data / "sessions" / f"{sid}.state").exists()


def test_max_sessions(server):
    n = len(httpx.get(server.url + SESSIONS, params={"limit": 1000}).json()["data"])
    for _ in range(40 - n):
        assert httpx.post(server.url + SESSIONS, json={}).status_code == 201
    assert_error(httpx.post(server.url + SESSIONS, json={}), 409, code="too_many_sessions")
    sid = httpx.get(server.url + SESSIONS).json()["data"][0]["id"]
    assert_error(httpx.post(f"{server.url}{SESSIONS}/{sid}/fork", json={}), 409, code="too_many_sessions")
    assert httpx.delete(f"{server.url}{SESSIONS}/{sid}").status_code == 200
    assert httpx.post(server.url + SESSIONS, json={}).status_code == 201


def test_listing_is_paginated(server):
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 7, **({"after": after} if after else {})}
        page = httpx.get(server.url + SESSIONS, params=params).json()
        seen += [s["id"] for s in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert len(seen) == len(set(seen)) == page["total"] == 40
    assert pages == 6


def test_api_key_rules_at_start(model_path, tmp_path):
    import subprocess
    import sys

    def serve(*args):
        return subprocess.run([sys.executable, "-m", "edge_rwkv", "serve", str(model_path), "--port", "1",
                               "--data-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=120)

    for args, needle in ((["--host", "0.0.0.0"], "needs --api-key"), (["--api-key", "ключ"], "printable ASCII"),
                         (["--api-key", "a b"], "printable ASCII")):
        r = serve(*args)
        assert r.returncode == 1 and needle in r.stderr and r.stderr.startswith("edge-rwkv: error:"), r.stderr


def test_session_files_are_private(model_path, tmp_path):
    import os

    data = tmp_path / "private"
    os.umask(0o022)
    with ServerProcess(model_path, data) as srv:
        sid = httpx.post(srv.url + SESSIONS, json={}).json()["id"]
        r = httpx.post(srv.url + CHAT, json={"session": sid, "messages": MSG, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    sessions = data / "sessions"
    assert sessions.stat().st_mode & 0o777 == 0o700
    for suffix in (".json", ".state", ".jsonl"):
        assert (sessions / f"{sid}{suffix}").stat().st_mode & 0o777 == 0o600, suffix
    from edge_rwkv.serve.cli import lock_data_dir

    lock_data_dir(str(tmp_path / "new-data")).close()  # the data folder the CLI creates is private too
    assert (tmp_path / "new-data").stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- after all that

def test_server_healthy_after_hostile_requests(server):
    """Runs last in this module: the server still answers, and never logged an unhandled error."""
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = httpx.post(server.url + CHAT, json={"messages": MSG, "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    log = (server.data / "server.log").read_text(errors="replace")
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


@pytest.mark.parametrize("origin,host,same", [
    ("http://localhost:8000", "localhost:8000", True), ("http://localhost", "localhost:80", True),
    ("http://[::1]:8000", "[::1]:8000", True), ("https://box.lan", "box.lan", True),
    ("http://localhost:8000", "127.0.0.1:8000", False), ("http://evil.example:8000", "localhost:8000", False),
    ("https://box.lan", "box.lan:80", False), ("null", "localhost", False), ("http://a/b", "a", False),
    ("http://localhost:99999", "localhost:99999", False), ("ftp://localhost", "localhost", False),
])
def test_same_origin(origin, host, same):
    from edge_rwkv.serve.guard import same_origin

    assert same_origin(origin, host) is same
