"""Durable sessions: resume after restart, fork, delete, and kill -9 during saves never corrupts a session."""
import random
import threading
import time

import httpx
import pytest
import torch

import edge_rwkv
from edge_rwkv.cli import main as cli_main
from edge_rwkv.serve.testing import ServerProcess
from edge_rwkv.state import State

N_TOKENS = 6


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_sessions") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "9"]) == 0
    return path


@pytest.fixture(scope="module")
def reference(model_path):
    return edge_rwkv.load(model_path)


def reference_turns(m, messages, system=None):
    """Replies and states of an uninterrupted greedy chat (the embedded API)."""
    chat = m.chat(system=system, temperature=0, max_tokens=N_TOKENS)
    replies, states = [], []
    for msg in messages:
        replies.append("".join(chat.send(msg)))
        states.append(chat.state.clone())
    return replies, states


def turn(srv, sid, message, **kw):
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, headers=srv.headers,
                   json={"session": sid, "messages": [{"role": "user", "content": message}],
                         "max_tokens": N_TOKENS, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session"] == sid
    return body["choices"][0]["message"]["content"]


def stream_turn(srv, sid, message):
    text = ""
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=120,
                      json={"session": sid, "messages": [{"role": "user", "content": message}],
                            "max_tokens": N_TOKENS, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        import json
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    text += c["delta"].get("content") or ""
    return text


def create(srv, **body):
    r = httpx.post(srv.url + "/v1/sessions", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def state_file(data, sid):
    return data / "sessions" / f"{sid}.state"


def test_resume_after_restart_fork_delete(model_path, reference, tmp_path):
    msgs = ["Hello, who are you?", "What is the weather?", "Tell me more.", "Thanks, bye."]
    system = "You are terse."
    replies, states = reference_turns(reference, msgs, system=system)
    data = tmp_path / "data"
    with ServerProcess(model_path, data) as srv:
        sid = create(srv, system=system, title="weather")["id"]
        assert turn(srv, sid, msgs[0]) == replies[0]
        assert stream_turn(srv, sid, msgs[1]) == replies[1]
        meta = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
        assert meta["turns"] == 2 and meta["title"] == "weather" and len(meta["messages"]) == 4
        fork = httpx.post(f"{srv.url}/v1/sessions/{sid}/fork", json={"id": "fork-1"}).json()
        assert fork["id"] == "fork-1" and fork["parent"] == sid and fork["turns"] == 2
        assert httpx.post(f"{srv.url}/v1/sessions/{sid}/fork", json={"id": "fork-1"}).status_code == 409
        # a second daemon on the same data folder is refused
        import subprocess
        import sys

        second = subprocess.run([sys.executable, "-m", "edge_rwkv", "serve", str(model_path), "--port", "1",
                                 "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "already using" in second.stderr
    # a new process: the conversation continues from the saved state, as if never interrupted
    with ServerProcess(model_path, data) as srv:
        ids = {s["id"] for s in httpx.get(srv.url + "/v1/sessions").json()["data"]}
        assert {sid, "fork-1"} <= ids
        assert turn(srv, sid, msgs[2]) == replies[2]
        assert turn(srv, sid, msgs[3]) == replies[3]
        # the fork branches from turn 2, independently of the original
        assert turn(srv, "fork-1", msgs[2]) == replies[2]
        meta = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
        assert meta["turns"] == 4 and meta["messages"][-1]["content"] == replies[3]
        st = State.load(state_file(data, sid), expect_fingerprint=reference.fingerprint)
        torch.testing.assert_close(st.wkv, states[3].wkv, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st.att_x, states[3].att_x, atol=1e-4, rtol=1e-4)
        # delete
        r = httpx.delete(f"{srv.url}/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}").status_code == 404
        assert httpx.delete(f"{srv.url}/v1/sessions/{sid}").status_code == 404
        assert not state_file(data, sid).exists()
        assert httpx.get(f"{srv.url}/v1/sessions/fork-1").json()["turns"] == 3
        # a session id that exists is refused for a new one; a bad id never reaches the file system
        assert httpx.post(srv.url + "/v1/sessions", json={"id": "fork-1"}).status_code == 409
        assert httpx.get(f"{srv.url}/v1/sessions/..").status_code in (400, 404)


def test_kill9_during_saves_never_corrupts(model_path, reference, tmp_path):
    n_sessions, n_msgs, rounds = 4, 8, 3
    convs = {f"kill-{j}": [f"message {k} in conversation {j}" for k in range(n_msgs)] for j in range(n_sessions)}
    ref = {sid: reference_turns(reference, msgs)[1] for sid, msgs in convs.items()}
    acked = {sid: 0 for sid in convs}  # turns whose reply the client received in full
    data = tmp_path / "data"
    rng = random.Random(0)

    def talker(srv, sid, stop):
        while not stop.is_set():
            k = acked[sid]
            if k >= n_msgs:
                return
            try:
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                    "session": sid, "messages": [{"role": "user", "content": convs[sid][k]}],
                    "max_tokens": N_TOKENS, "temperature": 0})
            except httpx.HTTPError:
                return  # the server was killed
            if r.status_code != 200:
                return
            acked[sid] = k + 1

    for rnd in range(rounds):
        srv = ServerProcess(model_path, data).start()
        if rnd == 0:
            for sid in convs:
                create(srv, id=sid)
        else:
            for sid in convs:  # the turn count after the crash is the state file's
                meta = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
                assert meta["turns"] in (acked[sid], acked[sid] + 1), (meta, acked[sid])
                acked[sid] = meta["turns"]
        stop = threading.Event()
        threads = [threading.Thread(target=talker, args=(srv, sid, stop)) for sid in convs]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.8, 2.0))
        srv.kill9()  # mid-traffic: saves are in flight
        stop.set()
        for t in threads:
            t.join()

    # every session loads (checksum, fingerprint) and equals a completed turn, never less than acknowledged
    with ServerProcess(model_path, data) as srv:
        assert not list((data / "sessions").glob(".*.tmp"))
        progressed = 0
        for sid in convs:
            meta = httpx.get(f"{srv.url}/v1/sessions/{sid}").json()
            turns = meta["turns"]
            assert turns in (acked[sid], acked[sid] + 1)
            progressed += turns
            path = state_file(data, sid)
            if turns == 0:
                assert not path.exists()
                continue
            st = State.load(path, expect_fingerprint=reference.fingerprint)
            assert st.tokens == meta["tokens"]
            want = ref[sid][turns - 1]
            torch.testing.assert_close(st.wkv, want.wkv, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(st.ffn_x, want.ffn_x, atol=1e-4, rtol=1e-4)
            assert len(meta["messages"]) == 2 * turns
        assert progressed > 0


def test_store_reconciles_every_crash_point(reference, tmp_path):
    """Each point a crash can stop commit_turn at: the session reads back as the old or the new turn."""
    import json

    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    sid = store.create(system="sys")["id"]
    s1 = reference.new_state()
    s1.tokens = 10
    store.commit_turn(sid, s1, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    meta_path, state_path = tmp_path / "sessions" / f"{sid}.json", tmp_path / "sessions" / f"{sid}.state"
    done = json.loads(meta_path.read_text())
    assert done["turns"] == 1 and done["tokens"] == 10 and "pending" not in done

    s2 = reference.new_state()
    s2.tokens = 25
    turn2 = [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    # 1) crash after the pending metadata, before the state: the turn is dropped
    meta_path.write_text(json.dumps(dict(done, pending={"messages": turn2, "state_tokens": 25, "time": 1.0})))
    fresh = SessionStore(tmp_path, reference)
    m = fresh.get(sid)
    assert m["turns"] == 1 and m["tokens"] == 10 and "pending" not in json.loads(meta_path.read_text())
    # 2) crash after the state, before the final metadata: the turn is applied
    meta_path.write_text(json.dumps(dict(done, pending={"messages": turn2, "state_tokens": 25, "time": 1.0})))
    s2.save(state_path)
    m = SessionStore(tmp_path, reference).get(sid)
    assert m["turns"] == 2 and m["tokens"] == 25 and m["messages"][-1]["content"] == "d"
    # 3) metadata unreadable: rebuilt from the state file; 4) metadata gone: the state still makes the session
    meta_path.write_text("{garbage")
    m = SessionStore(tmp_path, reference).get(sid)
    assert m["tokens"] == 25 and m["recovered"]
    meta_path.unlink()
    store = SessionStore(tmp_path, reference)
    assert store.get(sid)["tokens"] == 25 and store.load_state(sid).tokens == 25
    # leftover temp files from an interrupted atomic write are removed at start-up
    (tmp_path / "sessions" / f".{sid}.state.abc.tmp").write_bytes(b"partial")
    SessionStore(tmp_path, reference)
    assert not list((tmp_path / "sessions").glob(".*.tmp"))
    # a corrupt state file is refused with a 4xx, never loaded
    state_path.write_bytes(state_path.read_bytes()[:-10])
    from edge_rwkv.serve.protocol import APIError

    with pytest.raises(APIError) as e:
        SessionStore(tmp_path, reference).load_state(sid)
    assert e.value.status == 409
