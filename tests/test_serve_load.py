"""Continuous batching under load: 16 concurrent streams, overload → 429, disconnects free slots; Host/API key."""
import json
import threading
import time

import httpx
import pytest

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.serve.testing import ServerProcess

N_STREAMS = 16
N_TOKENS = 10
KEY = "test-key-123"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_load") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "11"]) == 0
    return path


def read_stream(url, body, headers=None):
    text, finish = "", None
    with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        for c in json.loads(ln[6:])["choices"]:
            text += c["delta"].get("content") or ""
            finish = c["finish_reason"] or finish
    return text, finish


def test_concurrent_streams_equal_single_runs(model_path, tmp_path):
    m = edge_rwkv.load(model_path)
    prompts = [f"Question number {i}: what comes next?" for i in range(N_STREAMS)]
    expected = ["".join(m.chat(temperature=0, max_tokens=N_TOKENS).send(p)) for p in prompts]
    results: dict[int, tuple] = {}
    with ServerProcess(model_path, tmp_path / "data", "--max-slots", str(N_STREAMS), "--queue", "0") as srv:
        start = threading.Barrier(N_STREAMS)

        def worker(i):
            start.wait()
            results[i] = read_stream(srv.url + "/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": N_TOKENS,
                "temperature": 0, "stream": True})

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = httpx.get(srv.url + "/health").json()
    assert len(results) == N_STREAMS
    for i in range(N_STREAMS):
        text, finish = results[i]
        assert finish in ("stop", "length")
        assert text == expected[i], f"stream {i}"
    # decoded together: far fewer engine steps than 16 separate runs would take
    assert health["steps"] < N_STREAMS * (N_TOKENS + 2) / 2
    assert health["slots_busy"] == 0


@pytest.fixture(scope="module")
def small_server(model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve_load_small")
    with ServerProcess(model_path, data, "--max-slots", "1", "--queue", "1", "--max-tokens-limit", "100000",
                       api_key=KEY) as srv:
        yield srv


def _long_stream(srv):
    """Open a long streaming request and return (context manager, response) after its first chunk."""
    cm = httpx.stream("POST", srv.url + "/v1/chat/completions", headers=srv.headers, timeout=60, json={
        "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 100000, "stream": True})
    r = cm.__enter__()
    assert r.status_code == 200
    return cm, r


def _wait_idle(srv, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        h = httpx.get(srv.url + "/health").json()
        if h["slots_busy"] == 0 and h["queued"] == 0:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"slot still busy after {limit}s: {h}")


def test_disconnect_frees_slot_within_1s(small_server):
    srv = small_server
    cm, r = _long_stream(srv)
    lines = r.iter_lines()
    got = [next(lines) for _ in range(4)]
    assert any(ln.startswith("data: ") for ln in got)
    assert httpx.get(srv.url + "/health").json()["slots_busy"] == 1
    t0 = time.monotonic()
    cm.__exit__(None, None, None)  # the client goes away mid-stream
    _wait_idle(srv, 5)
    assert time.monotonic() - t0 < 1.0


def test_disconnect_mid_turn_leaves_session_unchanged(small_server):
    srv = small_server
    sid = httpx.post(srv.url + "/v1/sessions", json={}, headers=srv.headers).json()["id"]
    cm = httpx.stream("POST", srv.url + "/v1/chat/completions", headers=srv.headers, timeout=60, json={
        "session": sid, "messages": [{"role": "user", "content": "talk"}], "max_tokens": 100000, "stream": True})
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    [next(lines) for _ in range(4)]
    busy = httpx.post(srv.url + "/v1/chat/completions", headers=srv.headers, json={
        "session": sid, "messages": [{"role": "user", "content": "again"}], "max_tokens": 2})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
    cm.__exit__(None, None, None)
    _wait_idle(srv, 5)
    meta = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=srv.headers).json()
    assert meta["turns"] == 0 and meta["busy"] is False  # an unfinished turn is not committed
    ok = httpx.post(srv.url + "/v1/chat/completions", headers=srv.headers, timeout=60, json={
        "session": sid, "messages": [{"role": "user", "content": "again"}], "max_tokens": 3})
    assert ok.status_code == 200
    assert httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=srv.headers).json()["turns"] == 1


def test_overload_gets_429_with_retry_after(small_server):
    srv = small_server
    first = _long_stream(srv)  # takes the only slot
    body = {"messages": [{"role": "user", "content": "queued"}], "max_tokens": 5}
    queued = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/chat/completions", json=body,
                                                        headers=srv.headers, timeout=60))
    queued.start()
    deadline = time.monotonic() + 10
    while httpx.get(srv.url + "/health").json()["queued"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.headers, timeout=60)
    assert r.status_code in (429, 503)
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "server_overloaded"
    first[0].__exit__(None, None, None)
    queued.join()
    _wait_idle(srv, 5)
    ok = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=srv.headers, timeout=60)
    assert ok.status_code == 200


def test_api_key_and_host_checks(small_server):
    srv = small_server
    url = srv.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers=srv.headers).status_code == 200
    assert httpx.get(url, headers={"x-api-key": KEY}).status_code == 200
    assert httpx.post(srv.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(srv.url + "/health").status_code == 200  # open for monitoring
    assert httpx.get(srv.url + "/").status_code == 200  # the page asks for the key itself
    # DNS rebinding: a foreign name pointing at 127.0.0.1 is refused; loopback names with any port pass
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil"):
        r = httpx.get(srv.url + "/health", headers={"Host": host})
        assert r.status_code == 403, host
        assert r.json()["error"]["code"] == "invalid_host"
    for host in ("localhost", "localhost:1234", "127.0.0.1", f"127.0.0.1:{srv.port}", "[::1]", "[::1]:8080"):
        assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200, host
    # another web page's requests are refused, reads included; no CORS headers unless --cors-origin is given
    r = httpx.get(url, headers={**srv.headers, "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    assert httpx.get(url, headers={**srv.headers, "Origin": srv.url}).status_code == 200  # the server's own page
