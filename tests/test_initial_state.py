"""Tuned initial states: RWKV-PEFT state-tuning files and our own state files as a starting state.

The float64 reference starts from the tuned matrices as its S (rows index values, columns index keys,
the official x070 orientation), so parity also pins down the orientation the file is read in.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv import StateError
from edge_rwkv.cli import main as cli_main
from edge_rwkv.synthetic import random_checkpoint
from reference_numpy import ReferenceRWKV7

VOCAB = 300
TOKENS = [9, 250, 3, 3, 77, 140, 1]
L, C, N = 2, 64, 32
H = C // N


@pytest.fixture(scope="module")
def sd():
    return random_checkpoint(L, C, N, vocab_size=VOCAB, seed=21)


@pytest.fixture(scope="module")
def model(sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("init_state") / "m.safetensors"
    save_file(sd, str(path))
    return edge_rwkv.load(path)


def time_states(seed=0, layers=L, shape=(H, N, N)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # asymmetric matrices, so reading them transposed would give other logits
    return {f"blocks.{i}.att.time_state": torch.randn(*shape, generator=g) * 0.5 for i in range(layers)}


def reference_from(sd, wkv: dict[str, torch.Tensor] | None, tokens) -> np.ndarray:
    ref = ReferenceRWKV7({k: v.double().numpy() for k, v in sd.items()})
    if wkv is not None:
        ref.S = np.stack([wkv[f"blocks.{i}.att.time_state"].double().numpy() for i in range(L)])
    return ref.run(tokens)


def rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float64) - want).max() / want.std())


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_state_tuning_file_matches_reference(sd, model, tmp_path, fmt):
    ts = time_states(seed=1)
    path = tmp_path / f"persona.{fmt}"
    torch.save(ts, path) if fmt == "pth" else save_file(ts, str(path))
    init = model.initial_state(path)
    assert init.batch == 1 and init.fingerprint == model.fingerprint
    assert torch.count_nonzero(init.att_x) == 0 and torch.count_nonzero(init.ffn_x) == 0
    logits, _ = model.forward(TOKENS, init)
    want = reference_from(sd, ts, TOKENS)
    assert rel_err(logits, want) <= 1e-5
    # the state matters, and its orientation: zero or transposed matrices give other logits
    assert rel_err(logits, reference_from(sd, None, TOKENS)) > 1e-2
    transposed = {k: v.transpose(1, 2) for k, v in ts.items()}
    assert rel_err(logits, reference_from(sd, transposed, TOKENS)) > 1e-2


def test_generation_from_initial_state_is_forward_from_it(model, tmp_path):
    """generate(state=…) decodes exactly what greedy steps of forward from that state give."""
    path = tmp_path / "s.pth"
    torch.save(time_states(seed=2), path)
    init = model.initial_state(path)
    greedy, state = [], init
    logits, state = model.forward(TOKENS, state)
    for _ in range(4):
        nxt = int(torch.argmax(logits[-1]))
        if nxt == 0:  # end of text
            break
        greedy.append(nxt)
        logits, state = model.forward([nxt], state)
    gen = model.stream(TOKENS, state=init, max_tokens=4, temperature=0)
    "".join(gen)
    assert gen.tokens == greedy and len(greedy) >= 2
    assert torch.allclose(gen.state.wkv, state.wkv, atol=1e-5)
    assert torch.count_nonzero(init.att_x) == 0  # the initial state given is not changed


def test_merged_model_file_gives_its_state(sd, model, tmp_path):
    """RWKV-PEFT can merge the tuned state into the model file; its time_state tensors are read, the rest ignored."""
    ts = time_states(seed=3)
    torch.save({**sd, **ts}, tmp_path / "merged.pth")
    init = model.initial_state(tmp_path / "merged.pth")
    assert torch.equal(init.wkv[:, 0], torch.stack([ts[f"blocks.{i}.att.time_state"] for i in range(L)]))


def test_own_state_file_as_initial_state(model, tmp_path):
    _, st = model.forward(TOKENS)
    st.save(tmp_path / "after.state")
    init = model.initial_state(tmp_path / "after.state")
    assert torch.equal(init.wkv, st.wkv) and torch.equal(init.att_x, st.att_x) and torch.equal(init.ffn_x, st.ffn_x)
    two = edge_rwkv.State.cat([st, st])
    two.save(tmp_path / "two.state")
    with pytest.raises(StateError, match="2 sequences"):
        model.initial_state(tmp_path / "two.state")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["wrong_shape", "transposed_heads", "missing_layer", "extra_layer", "nan",
                                  "integer", "no_time_state", "truncated", "pickle_payload", "absent"])
def test_bad_state_tuning_files(model, tmp_path, case):
    path = tmp_path / f"{case}.pth"
    ts = time_states(seed=4)
    marker = tmp_path / "PWNED"
    needle = {"wrong_shape": "shape", "transposed_heads": "shape", "missing_layer": "layer",
              "extra_layer": "layer", "nan": "NaN", "integer": "dtype", "no_time_state": "not a state-tuning",
              "truncated": "truncated", "pickle_payload": "refused to unpickle", "absent": "no such file"}[case]
    if case == "wrong_shape":
        ts["blocks.1.att.time_state"] = torch.zeros(H, N, N + 1)
    elif case == "transposed_heads":
        ts = time_states(shape=(N, H, N))
    elif case == "missing_layer":
        del ts["blocks.1.att.time_state"]
    elif case == "extra_layer":
        ts = time_states(layers=L + 1)
    elif case == "nan":
        ts["blocks.0.att.time_state"][0, 1, 2] = float("nan")
    elif case == "integer":
        ts["blocks.0.att.time_state"] = torch.zeros(H, N, N, dtype=torch.int32)
    elif case == "no_time_state":
        ts = {"emb.weight": torch.zeros(3, 3)}
    if case == "pickle_payload":
        torch.save({"blocks.0.att.time_state": _Payload(marker)}, path)
    elif case != "absent":
        torch.save(ts, path)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(StateError) as e:
        model.initial_state(path)
    msg = str(e.value)
    assert str(path) in msg and needle.lower() in msg.lower() and "\n" not in msg, msg
    assert not marker.exists()


# --------------------------------------------------------------------------- command line and daemon

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with the world vocabulary (text prompts) and a state-tuning file for it."""
    d = tmp_path_factory.mktemp("init_state_world")
    assert cli_main(["init", "-o", str(d / "m.safetensors"), "--layers", "2", "--embd", "32", "--head-size", "16",
                     "--seed", "7"]) == 0
    g = torch.Generator().manual_seed(8)
    torch.save({f"blocks.{i}.att.time_state": torch.randn(2, 16, 16, generator=g) * 3 for i in range(2)},
               d / "pirate.pth")
    return d


def test_generate_cli_with_init_state(world, capsys):
    m = edge_rwkv.load(world / "m.safetensors")
    want = m.generate("Hello", max_tokens=8, temperature=0, state=m.initial_state(world / "pirate.pth"))
    plain = m.generate("Hello", max_tokens=8, temperature=0)
    assert want != plain  # the tuned state changes the continuation
    assert cli_main(["generate", str(world / "m.safetensors"), "Hello", "--max-tokens", "8", "--temperature", "0",
                     "--init-state", str(world / "pirate.pth")]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert cli_main(["generate", str(world / "m.safetensors"), "Hello", "--init-state", str(world / "pirate.pth"),
                     "--state-in", str(world / "pirate.pth")]) == 1
    assert "use one" in capsys.readouterr().err


def test_chat_cli_with_init_state(world, capsys, monkeypatch):
    import io

    m = edge_rwkv.load(world / "m.safetensors")
    init = m.initial_state(world / "pirate.pth")
    first = m.chat(state=init, temperature=0, max_tokens=6).ask("Hi")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nHi\n"))
    assert cli_main(["chat", str(world / "m.safetensors"), "--temperature", "0", "--max-tokens", "6",
                     "--init-state", str(world / "pirate.pth")]) == 0
    out = capsys.readouterr().out
    # the same reply twice: /reset returns to the tuned state, not to the zero state
    assert out.count(f"Assistant: {first}\n") == 2, out
    assert cli_main(["chat", str(world / "m.safetensors"), "--init-state", str(world / "pirate.pth"),
                     "--system", "x"]) == 1


def test_daemon_named_initial_states(world, tmp_path):
    from fastapi.testclient import TestClient

    from edge_rwkv.serve.app import ServeConfig, create_app

    states = tmp_path / "states"
    states.mkdir()
    (states / "pirate.pth").write_bytes((world / "pirate.pth").read_bytes())
    m = edge_rwkv.load(world / "m.safetensors")
    init = m.initial_state(world / "pirate.pth")
    app = create_app(m, ServeConfig(str(tmp_path / "data"), init_states_dir=str(states)))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/v1/models").json()["data"][0]["initial_states"] == ["pirate"]
        body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
        tuned = c.post("/v1/completions", json={**body, "initial_state": "pirate"}).json()
        assert tuned["choices"][0]["text"] == m.generate("Hello", max_tokens=8, temperature=0, state=init)
        plain = c.post("/v1/completions", json=body).json()
        assert plain["choices"][0]["text"] == m.generate("Hello", max_tokens=8, temperature=0)
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 6, "temperature": 0, "initial_state": "pirate"})
        assert chat.json()["choices"][0]["message"]["content"] == m.chat(state=init, temperature=0,
                                                                         max_tokens=6).ask("Hi")
        # a session starts from the tuned state; once it has turns, its own state is what continues
        sid = c.post("/v1/sessions", json={}).json()["id"]
        turn = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
                "session": sid, "initial_state": "pirate"}
        first = c.post("/v1/chat/completions", json=turn)
        assert first.json()["choices"][0]["message"]["content"] == chat.json()["choices"][0]["message"]["content"]
        again = c.post("/v1/chat/completions", json=turn)
        assert again.status_code == 400 and again.json()["error"]["param"] == "initial_state"
        for bad, code in (("ninja", "unknown_initial_state"), ("../x", "invalid_value"), (5, "invalid_type")):
            r = c.post("/v1/completions", json={**body, "initial_state": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
            assert r.json()["error"]["param"] == "initial_state"


def test_daemon_refuses_a_bad_state_folder(world, tmp_path):
    from edge_rwkv.errors import EdgeRWKVError
    from edge_rwkv.serve.app import ServeConfig, create_app

    states = tmp_path / "states"
    states.mkdir()
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 16, 16)}, states / "half.pth")
    m = edge_rwkv.load(world / "m.safetensors")
    with pytest.raises(EdgeRWKVError, match="half.pth"):
        create_app(m, ServeConfig(str(tmp_path / "data"), init_states_dir=str(states)))


def test_serve_command_takes_a_state_folder(world, tmp_path):
    import httpx

    from edge_rwkv.serve.testing import ServerProcess

    states = tmp_path / "states"
    states.mkdir()
    (states / "pirate.pth").write_bytes((world / "pirate.pth").read_bytes())
    with ServerProcess(world / "m.safetensors", tmp_path / "data", "--init-states", str(states)) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["initial_states"] == ["pirate"]
