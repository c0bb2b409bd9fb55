"""`edge-rwkv serve` over real HTTP: OpenAI client (stream and not), models, health, the bad-request matrix."""
import json

import httpx
import pytest

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.serve.testing import ServerProcess

openai = pytest.importorskip("openai")
MAX_TOKENS_LIMIT = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_api") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "5"]) == 0
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("serve_api_data")
    with ServerProcess(model_path, data, "--max-slots", "4", "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
                       "--max-prompt-tokens", "200", "--max-body-bytes", "20000") as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_path):
    return edge_rwkv.load(model_path)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ref_chat(m, message, n):
    return "".join(m.chat(temperature=0, max_tokens=n).send(message))


def test_health_and_models(server, client):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4
    models = client.models.list()
    assert [x.id for x in models.data] == ["tiny"]


def test_chat_non_streaming_equals_reference(client, reference):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                       max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref_chat(reference, "Hello there", 10)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode("User: Hello there\n\nAssistant:"))
    assert 1 <= r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage, n = "", None, None, 0
    for chunk in stream:
        n += 1
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert n >= 3
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions(client, reference):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].text == reference.generate("The quick brown fox", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens <= 8
    ids = reference.tokenizer.encode("The quick brown fox")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].text


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell a story"}], max_tokens=8,
              temperature=1.0, top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    (CHAT, {"messages": MSG, "seed": 2**70}, 400, "seed"),
    (CHAT, {"messages": MSG, "top_k": "x"}, 400, "top_k"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    (CHAT, {"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MSG, "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": MSG, "n": 2}, 400, "n"),
    (CHAT, {"messages": MSG, "stop": [1]}, 400, "stop"),
    (CHAT, {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": MSG, "model": 7}, 400, "model"),
    (CHAT, {"messages": MSG, "session": "../../etc/passwd"}, 400, "session"),
    (CHAT, {"messages": MSG, "session": 12}, 400, "session"),
    (CHAT, {"messages": MSG, "session": "no-such-session"}, 404, "session"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    (CHAT, {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 70000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_p": -1}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/sessions", {"id": "bad/id"}, 400, "id"),
    ("/v1/sessions", {"system": 3}, 400, "system"),
    ("/v1/sessions/..%2F..%2Fx/fork", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests(server, path, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_body_cap_and_bad_paths(server):
    big = {"messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(server.url + CHAT, json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(server.url + CHAT, content=chunks(), timeout=30, headers={"content-type": "application/json"})
    assert r.status_code == 413
    for path in ("/v1/sessions/bad.id", "/v1/sessions/a%00b"):
        r = httpx.get(server.url + path)
        assert r.status_code in (400, 404) and "error" in r.json()
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and "error" in r.json()


def test_web_page_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert "Content-Security-Policy" in r.headers
    assert '<link rel="icon" href="/favicon.ico"' in r.text


def test_favicon_served(server):
    """The browser's request for the tab icon gets a small SVG, not a 404 in the log."""
    r = httpx.get(server.url + "/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert r.text.startswith("<svg") and r.text.endswith("</svg>") and len(r.content) < 1024


def test_cors_only_for_named_origins(reference, tmp_path):
    from starlette.testclient import TestClient

    from edge_rwkv.serve.app import ServeConfig, create_app

    pre = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type"}
    with_cors = TestClient(create_app(reference, ServeConfig(str(tmp_path / "a"), cors_origins=["http://app.local"])),
                           base_url="http://localhost")
    r = with_cors.options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.local"
    r = with_cors.options("/v1/chat/completions", headers=dict(pre, Origin="http://evil.example"))
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    no_cors = TestClient(create_app(reference, ServeConfig(str(tmp_path / "b"))), base_url="http://localhost")
    r = no_cors.get("/health", headers={"Origin": "http://app.local"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = with_cors.get("/v1/models", headers={"Origin": "http://app.local"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.local"


def test_session_through_openai_client(server, client, reference):
    sid = httpx.post(server.url + "/v1/sessions", json={"title": "client"}).json()["id"]
    chat = reference.chat(temperature=0, max_tokens=6)
    for msg in ("first question", "second question"):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": msg}], max_tokens=6,
                                           temperature=0, extra_body={"session": sid})
        assert r.choices[0].message.content == "".join(chat.send(msg))
    meta = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
    assert meta["turns"] == 2 and meta["title"] == "client"
    assert sid in {s["id"] for s in httpx.get(server.url + "/v1/sessions").json()["data"]}
