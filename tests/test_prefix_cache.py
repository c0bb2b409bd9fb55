"""The prefix-state cache: longest cached prefix, whole prompts with their logits, LRU within a byte bound;
and the daemon continuing a known system prompt from its cached state."""
import httpx
import torch

import edge_rwkv
from edge_rwkv.chat import encode_segments, user_turn
from edge_rwkv.runtime.prefix_cache import PrefixCache
from edge_rwkv.state import State


def state(v: float) -> State:
    s = State.zeros(1, 1, 4, 1, 4)
    s.wkv.fill_(v)
    return s


def test_longest_prefix_and_whole_prompts():
    c = PrefixCache(1 << 20)
    c.put([1, 2], state(1.0))
    c.put([1, 2, 3, 4], state(2.0))
    c.put([1, 2, 3, 4, 5], state(3.0), logits=torch.ones(8))
    hit = c.lookup([1, 2, 3, 4, 9])
    assert hit.length == 4 and float(hit.state.wkv[0, 0, 0, 0, 0]) == 2.0 and hit.logits is None
    hit = c.lookup([1, 2, 3, 4, 5])  # a whole prompt: its state and the logits after it
    assert hit.length == 5 and hit.logits is not None
    assert c.lookup([1, 2, 3, 4]).length == 2  # a whole prompt without logits cannot be drawn from
    assert c.lookup([7, 1, 2]) is None
    assert c.stats()["hits"] == 3 and c.stats()["misses"] == 1


def test_bounded_bytes_least_recent_first():
    one = state(0.0).nbytes
    c = PrefixCache(3 * one)
    for k in range(3):
        c.put([k, k], state(float(k)))
    c.lookup([0, 0, 1])  # entry 0 used: entry 1 is now the least recent
    c.put([9, 9], state(9.0))
    assert len(c) == 3 and c.bytes <= 3 * one
    assert c.lookup([1, 1, 5]) is None and c.lookup([0, 0, 5]) is not None
    big = PrefixCache(one - 1)
    big.put([1], state(1.0))  # larger than the whole cache: not kept
    assert len(big) == 0


def test_daemon_continues_a_cached_system_prompt(tmp_path):
    from edge_rwkv.default_model import default_model_path
    from edge_rwkv.serve.testing import ServerProcess

    m = edge_rwkv.load(default_model_path())
    system = "You answer in one short sentence about the Python standard library."
    with ServerProcess(default_model_path(), tmp_path, "--max-slots", "2") as srv:
        def ask(msg):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "model": "m", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": msg}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        ask("What is os?")
        got = ask("What is socket?")
        cache = httpx.get(srv.url + "/health").json()["prefix_cache"]
    assert cache["hits"] >= 1 and cache["entries"] >= 2
    # the same reading through the API: the system prompt's state, then the rest of the prompt
    tokens, ends = encode_segments(m.tokenizer, user_turn("What is socket?", system))
    _, after_system = m.runner.prefill(tokens[:ends[0]], m.new_state(1))
    want = "".join(m.stream(tokens[ends[0]:], state=after_system, strip_leading=True, temperature=0,
                            max_tokens=16, top_p=0.3, require_text=True, stop=("\n\n",)))
    assert got == want
