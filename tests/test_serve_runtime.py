"""The daemon decodes through the same runtime as the Python API: the same text for the same prompt
(greedy, with stop strings, and seeded sampling, alone or among concurrent requests), and chat replies
of the default model are never empty (the chat defaults of `edge-rwkv chat` apply)."""
import concurrent.futures

import httpx
import pytest

import edge_rwkv
from edge_rwkv.default_model import default_model_path
from edge_rwkv.serve.testing import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve_runtime")
    with ServerProcess(default_model_path(), data, "--max-slots", "8", "--queue", "64") as srv:
        yield srv


@pytest.fixture(scope="module")
def api():
    return edge_rwkv.load(default_model_path())


def complete(srv, **body):
    r = httpx.post(srv.url + "/v1/completions", json={"model": "m", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


PROMPTS = ["The socket module", "Return the number of", "Parameters\n----------\nx :", "def open(file,"]


def test_greedy_and_stop_strings_equal_the_api(server, api):
    for p in PROMPTS:
        want = api.generate(p, max_tokens=24, temperature=0)
        assert complete(server, prompt=p, max_tokens=24, temperature=0) == want
        stop = want[5:8] if len(want) >= 8 else None
        if stop and stop.strip():
            cut = api.generate(p, max_tokens=24, temperature=0, stop=stop)
            assert cut == want[:want.find(stop)]
            assert complete(server, prompt=p, max_tokens=24, temperature=0, stop=stop) == cut


def test_greedy_chat_equals_the_api_chat(server, api):
    """A chat request (no session) and `Model.chat` build the same prompt, with the same defaults."""
    for message in ("hello", "What does the socket module do?", "Explain   the\n\nos module"):
        want = api.chat(temperature=0, max_tokens=24).ask(message)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": message}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        assert want.strip()


def test_seeded_sampling_alone_and_concurrent_equals_the_api(server, api):
    settings = [dict(prompt=p, max_tokens=20, temperature=1.0, top_p=0.8, seed=40 + i) for i, p in enumerate(PROMPTS)]
    want = [api.generate(s["prompt"], max_tokens=20, temperature=1.0, top_p=0.8, seed=s["seed"]) for s in settings]
    assert complete(server, **settings[0]) == want[0]
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:  # batched in the engine together
        got = list(pool.map(lambda s: complete(server, **s), settings))
    assert got == want


def test_no_empty_chat_replies(server):
    """50 sampled chat requests of the default model (its chat defaults: the reply shows text before it
    may end): every reply has visible content."""
    def ask(i):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": f"Tell me about module {i}."}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(50)))
    assert [r for r in replies if not r.strip()] == []
