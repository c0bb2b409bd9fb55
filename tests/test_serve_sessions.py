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


# --------------------------------------------------------------------------- bounded metadata, broken files

def _turn(i, size=10):
    return [{"role": "user", "content": f"question {i} " + "q" * size},
            {"role": "assistant", "content": f"answer {i} " + "a" * size}]


def _state(reference, tokens):
    s = reference.new_state()
    s.tokens = tokens
    return s


def test_transcript_never_grows_the_metadata(reference, tmp_path):
    from edge_rwkv.serve.sessions import MAX_META_BYTES, TAIL_CHARS, TAIL_MESSAGES, SessionStore

    store = SessionStore(tmp_path, reference)
    sid = store.create()["id"]
    for i in range(120):  # 6 MB of conversation: one metadata file holding it all would pass the 4 MiB limit
        store.commit_turn(sid, _state(reference, 10 * (i + 1)), _turn(i, 100_000 if i % 4 == 0 else 200))
    meta_size = (tmp_path / "sessions" / f"{sid}.json").stat().st_size
    assert meta_size < MAX_META_BYTES / 4
    assert (tmp_path / "sessions" / f"{sid}.jsonl").stat().st_size > 6_000_000
    m = SessionStore(tmp_path, reference).get(sid)
    assert m["turns"] == 120 and m["message_count"] == 240 and len(m["messages"]) == TAIL_MESSAGES
    assert m["messages"][-1]["content"].startswith("answer 119")
    cut = [x for x in m["messages"] if x.get("truncated")]
    assert cut and all(len(x["content"]) == TAIL_CHARS for x in cut)
    # the whole transcript, page by page
    page = store.messages(sid, offset=0, limit=100)
    assert len(page["data"]) == 100 and page["has_more"] and page["data"][0]["content"].startswith("question 0 ")
    assert len(page["data"][0]["content"]) == len("question 0 ") + 100_000  # never cut in the transcript
    last = store.messages(sid, offset=200, limit=100)
    assert len(last["data"]) == 40 and not last["has_more"]
    assert [s["id"] for s in store.list()["data"]] == [sid]


@pytest.mark.parametrize("damage", ["too-large", "pending-x", "deep", "tokens-1e400", "list", "wrong-id",
                                    "turns-str", "garbage"])
def test_damaged_metadata_never_hides_a_session(reference, tmp_path, damage):
    import json

    from edge_rwkv.serve.sessions import MAX_META_BYTES, SessionStore

    store = SessionStore(tmp_path, reference)
    good = store.create(title="fine")["id"]
    sid = store.create(title="victim")["id"]
    for i in range(3):
        store.commit_turn(sid, _state(reference, 7 * (i + 1)), _turn(i))
    p = tmp_path / "sessions" / f"{sid}.json"
    meta = json.loads(p.read_text())
    raw = {
        "too-large": json.dumps(dict(meta, title="t" * (MAX_META_BYTES + 10))),
        "pending-x": json.dumps(dict(meta, pending="x")),
        "deep": '{"id": "' + sid + '", "x": ' + "[" * 5000 + "]" * 5000 + "}",
        "tokens-1e400": json.dumps(meta).replace(f'"tokens": {meta["tokens"]}', '"tokens": 1e400'),
        "list": "[1, 2, 3]",
        "wrong-id": json.dumps(dict(meta, id="other")),
        "turns-str": json.dumps(dict(meta, turns="3")),
        "garbage": "{garbage",
    }[damage]
    p.write_text(raw)
    store = SessionStore(tmp_path, reference)
    listing = store.list()
    assert {s["id"] for s in listing["data"]} == {good, sid} and listing["broken"] == []
    m = store.get(sid)
    assert m["recovered"] and m["tokens"] == 21  # from the state file
    assert [x["content"] for x in m["messages"]] == [x["content"] for i in range(3) for x in _turn(i)]  # transcript
    assert (tmp_path / "sessions" / f".{sid}.json.broken").read_text() == raw  # kept for inspection
    json.dumps(store.public(m), allow_nan=False)  # answerable as JSON
    store.commit_turn(sid, _state(reference, 30), _turn(3))  # and it continues
    assert store.get(sid)["turns"] == 1 and store.load_state(sid).tokens == 30


def test_unreadable_session_reported_not_fatal(reference, tmp_path):
    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    ids = [store.create()["id"] for _ in range(3)]
    (tmp_path / "sessions" / "brokenone.json").mkdir()  # reading it fails with an OS error
    listing = store.list()
    assert {s["id"] for s in listing["data"]} == set(ids)
    assert [b["id"] for b in listing["broken"]] == ["brokenone"] and listing["broken"][0]["error"]


def test_pagination_and_session_limit(reference, tmp_path):
    from edge_rwkv.serve.protocol import APIError
    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference, max_sessions=12)
    ids = {store.create()["id"] for _ in range(12)}
    with pytest.raises(APIError) as e:
        store.create()
    assert e.value.status == 409 and e.value.code == "too_many_sessions"
    with pytest.raises(APIError):
        store.fork(next(iter(ids)))
    seen, after = [], None
    while True:
        page = store.list(limit=5, after=after)
        seen += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(ids) and page["total"] == 12


def test_crash_points_of_a_turn_with_transcript(reference, tmp_path):
    """The commit's own order: pending metadata → transcript line → state → metadata. A crash after the
    transcript line but before the state drops the turn and cuts the line; after the state, applies it."""
    import json

    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    sid = store.create()["id"]
    store.commit_turn(sid, _state(reference, 10), _turn(0))
    meta_path, tx = tmp_path / "sessions" / f"{sid}.json", tmp_path / "sessions" / f"{sid}.jsonl"
    done, tx_done = json.loads(meta_path.read_text()), tx.read_bytes()
    offset = len(tx_done)
    pending = {"id": "t1", "state_tokens": 25, "time": 5.0, "offset": offset}
    line = json.dumps({"turn": "t1", "time": 5.0, "messages": _turn(1)}).encode() + b"\n"
    for partial in (line, line[:17]):  # the line whole, or cut by the crash
        meta_path.write_text(json.dumps(dict(done, pending=pending)))
        tx.write_bytes(tx_done + partial)
        m = SessionStore(tmp_path, reference).get(sid)
        assert m["turns"] == 1 and tx.read_bytes() == tx_done  # dropped, transcript cut back
    meta_path.write_text(json.dumps(dict(done, pending=pending)))
    tx.write_bytes(tx_done + line)
    _state(reference, 25).save(tmp_path / "sessions" / f"{sid}.state")
    m = SessionStore(tmp_path, reference).get(sid)
    assert m["turns"] == 2 and m["tokens"] == 25 and m["messages"][-1]["content"] == _turn(1)[1]["content"]
    assert len(SessionStore(tmp_path, reference).messages(sid)["data"]) == 4


def test_half_fork_is_absent_and_whole_fork_is_whole(reference, tmp_path):
    import json

    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    src = store.create()["id"]
    store.commit_turn(src, _state(reference, 10), _turn(0))
    new = store.fork(src, "f1")
    assert new["turns"] == 1 and "forking" not in json.loads((tmp_path / "sessions" / "f1.json").read_text())
    assert store.messages("f1")["data"] == store.messages(src)["data"]
    # a fork killed after its (marked) metadata and state but before the final metadata: gone on reading
    store.fork(src, "f2")
    meta = json.loads((tmp_path / "sessions" / "f2.json").read_text())
    (tmp_path / "sessions" / "f2.json").write_text(json.dumps(dict(meta, forking=True)))
    fresh = SessionStore(tmp_path, reference)
    assert {s["id"] for s in fresh.list()["data"]} == {src, "f1"}
    assert not any((tmp_path / "sessions" / f"f2{x}").exists() for x in (".json", ".state", ".jsonl"))


def test_session_id_must_match_whole(reference, tmp_path):
    from edge_rwkv.serve.protocol import APIError, check_session_id
    from edge_rwkv.serve.sessions import SessionStore

    for bad in ("abc\n", "abc\r\n", "a b", "", "-a", "a" * 65):
        with pytest.raises(APIError):
            check_session_id(bad)
        with pytest.raises(APIError):
            SessionStore(tmp_path, reference).create(bad) if bad else check_session_id(bad)


def test_new_session_never_inherits_an_orphan_transcript(reference, tmp_path):
    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    (tmp_path / "sessions" / "reused.jsonl").write_text('{"turn": "x", "messages": [{"role": "user", "content": "old"}]}\n')
    store.create("reused")
    store.commit_turn("reused", _state(reference, 5), _turn(0))
    assert [m["content"] for m in store.messages("reused")["data"]] == [m["content"] for m in _turn(0)]


def test_delete_cut_short_finishes_on_reading(reference, tmp_path, monkeypatch):
    """A delete killed after its mark (state and transcript still there) never brings the session back."""
    from edge_rwkv.serve.sessions import SessionStore

    store = SessionStore(tmp_path, reference)
    sid = store.create()["id"]
    store.commit_turn(sid, _state(reference, 5), _turn(0))
    def killed(*a, **k):
        raise KeyboardInterrupt("killed")  # the process dies at the first removal

    monkeypatch.setattr("pathlib.Path.unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        store.delete(sid)
    monkeypatch.undo()
    assert (tmp_path / "sessions" / f"{sid}.state").exists()
    fresh = SessionStore(tmp_path, reference)
    assert fresh.list()["data"] == []
    assert not any((tmp_path / "sessions" / f"{sid}{x}").exists() for x in (".json", ".state", ".jsonl"))
