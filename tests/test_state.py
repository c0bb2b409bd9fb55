"""The typed recurrent state: batch surgery, files, and rejection of every kind of bad state file."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

import edge_rwkv
from edge_rwkv import State, StateError
from edge_rwkv.synthetic import random_checkpoint

VOCAB = 1000
PROMPT = [5, 99, 300, 7, 42, 640]


def _model(folder: Path, seed: int, n_embd: int = 64):
    path = folder / f"m{seed}_{n_embd}.safetensors"
    save_file(random_checkpoint(2, n_embd, 32, vocab_size=VOCAB, seed=seed), str(path))
    return edge_rwkv.load(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("state_model"), seed=1)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("state_model2"), seed=2)


@pytest.fixture(scope="module")
def used_state(model):
    _, s = model.forward(PROMPT)
    return s


def states_equal(a: State, b: State) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("att_x", "wkv", "ffn_x"))


# --------------------------------------------------------------------------- in memory

def test_new_state_shapes_and_nbytes(model):
    s = model.new_state(batch=2)
    c = model.config
    assert s.att_x.shape == (c.n_layer, 2, c.n_embd) and s.ffn_x.shape == (c.n_layer, 2, c.n_embd)
    assert s.wkv.shape == (c.n_layer, 2, c.n_head, c.head_size, c.head_size)
    assert all(t.dtype == torch.float32 for t in (s.att_x, s.wkv, s.ffn_x))
    assert s.nbytes == c.state_bytes(2) == 2 * c.n_layer * (2 * c.n_embd + c.n_head * c.head_size ** 2) * 4
    assert s.fingerprint == model.fingerprint and s.tokens == 0
    assert s.dims() == {"n_layer": 2, "batch": 2, "n_embd": 64, "n_head": 2, "head_size": 32}
    with pytest.raises(edge_rwkv.InputError):
        model.new_state(batch=0)


def test_clone_is_independent(used_state):
    c = used_state.clone()
    assert states_equal(c, used_state) and c.tokens == used_state.tokens and c.fingerprint == used_state.fingerprint
    c.wkv += 1
    c.att_x.zero_()
    assert not torch.equal(c.wkv, used_state.wkv) and not torch.equal(c.att_x, used_state.att_x)


def test_to_keeps_values(used_state):
    s = used_state.to("cpu")
    assert s.device.type == "cpu" and states_equal(s, used_state) and s.tokens == used_state.tokens


def test_select_and_cat(model):
    prompts = [PROMPT, [1, 2, 3, 4, 5, 6], [900, 800, 700, 600, 500, 400]]
    _, batch = model.forward(torch.tensor(prompts))
    singles = [model.forward(p)[1] for p in prompts]
    for i in range(3):
        sel = batch.select(i)
        assert sel.batch == 1
        torch.testing.assert_close(sel.wkv, singles[i].wkv, rtol=1e-5, atol=1e-6)
    sub = batch.select([2, 0])
    assert sub.batch == 2 and torch.equal(sub.wkv[:, 0], batch.wkv[:, 2]) and torch.equal(sub.wkv[:, 1], batch.wkv[:, 0])
    assert batch.select(slice(1, 3)).batch == 2
    sub.wkv.zero_()  # select copies
    assert batch.wkv.abs().sum() > 0
    cat = State.cat(singles)
    assert cat.batch == 3 and cat.fingerprint == model.fingerprint and cat.tokens == len(PROMPT)
    assert torch.equal(cat.select(1).ffn_x, singles[1].ffn_x)


def test_cat_refuses_states_of_different_models(model, other_model):
    with pytest.raises(StateError, match="different models"):
        State.cat([model.new_state(), other_model.new_state()])


def test_forward_refuses_foreign_or_misshaped_state(model, other_model, tmp_path):
    with pytest.raises(StateError, match="another model"):
        model.forward(PROMPT, other_model.new_state())
    wide = _model(tmp_path, seed=1, n_embd=96)
    s = wide.new_state()
    s.fingerprint = ""
    with pytest.raises(StateError, match="dimensions"):
        model.forward(PROMPT, s)
    with pytest.raises(edge_rwkv.InputError, match="batch"):
        model.forward(PROMPT, model.new_state(batch=2))


# --------------------------------------------------------------------------- files

def test_save_load_round_trip_same_continuation(model, tmp_path):
    gen = model.stream(PROMPT, max_tokens=6, temperature=0)
    "".join(gen)
    state = gen.state
    path = tmp_path / "conv.state"
    state.save(path)
    loaded = model.load_state(path)
    assert states_equal(loaded, state)
    assert loaded.tokens == state.tokens == len(PROMPT) + len(gen.tokens)
    assert loaded.fingerprint == model.fingerprint
    cont = [11, 12, 13]
    a = model.stream(cont, state=state, max_tokens=8, temperature=0)
    b = model.stream(cont, state=loaded, max_tokens=8, temperature=0)
    assert "".join(a) == "".join(b) and a.tokens == b.tokens and len(a.tokens) > 0
    la, _ = model.forward(cont, state)
    lb, _ = model.forward(cont, loaded)
    assert torch.equal(la, lb)
    # State.load without a fingerprint expectation also works, and to_bytes is deterministic
    assert states_equal(State.load(path), state)
    assert path.read_bytes() == state.to_bytes()


def test_batched_state_round_trip(model, tmp_path):
    _, s = model.forward(torch.tensor([PROMPT, PROMPT[::-1]]))
    s.save(tmp_path / "b.state")
    t = State.load(tmp_path / "b.state", expect_fingerprint=model.fingerprint)
    assert t.batch == 2 and states_equal(s, t)


def _meta_and_tensors(data: bytes):
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    meta = json.loads(header["__metadata__"]["edge_rwkv_state"])
    from safetensors.torch import load

    return meta, load(data)


def _rebuild(tensors: dict, meta: dict) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()},
                metadata={"edge_rwkv_state": json.dumps(meta, sort_keys=True)})


@pytest.fixture
def state_file(used_state, tmp_path):
    path = tmp_path / "good.state"
    used_state.save(path)
    return path


def _reject(model, path, *needles):
    with pytest.raises(StateError) as e:
        model.load_state(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg.lower(), msg
    return msg


@pytest.mark.parametrize("keep", [0, 5, 12, 200, -50, -1])
def test_truncated_state_rejected(model, state_file, tmp_path, keep):
    data = state_file.read_bytes()
    bad = tmp_path / "trunc.state"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    msg = _reject(model, bad)
    assert "truncated" in msg.lower() or "not an edge-rwkv state" in msg.lower(), msg


def test_truncated_data_section_says_truncated(model, state_file, tmp_path):
    data = state_file.read_bytes()
    bad = tmp_path / "trunc.state"
    bad.write_bytes(data[:-64])
    _reject(model, bad, "truncated")


@pytest.mark.parametrize("where", [0.0, 0.3, 0.77, 1.0])
def test_bit_flip_rejected_by_checksum(model, state_file, tmp_path, where):
    data = bytearray(state_file.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    start = 8 + hlen  # the tensor data: att_x, wkv, ffn_x
    pos = start + int(where * (len(data) - 1 - start))
    data[pos] ^= 0x10
    bad = tmp_path / "flip.state"
    bad.write_bytes(bytes(data))
    _reject(model, bad, "checksum")


def test_wrong_model_rejected_by_fingerprint(model, other_model, tmp_path):
    _, s = other_model.forward(PROMPT)
    path = tmp_path / "other.state"
    s.save(path)
    _reject(model, path, "another model", "fingerprint")
    assert states_equal(other_model.load_state(path), s)


def test_unknown_version_rejected(model, state_file, tmp_path):
    meta, tensors = _meta_and_tensors(state_file.read_bytes())
    meta["format_version"] = 99
    bad = tmp_path / "v99.state"
    bad.write_bytes(_rebuild(tensors, meta))
    _reject(model, bad, "version", "99")


@pytest.mark.parametrize("kind", ["random", "model", "json", "empty-meta"])
def test_not_a_state_file_rejected(model, tmp_path, kind):
    bad = tmp_path / f"{kind}.state"
    if kind == "random":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    elif kind == "model":
        save_file(random_checkpoint(1, 64, 32, vocab_size=100), str(bad))
    elif kind == "json":
        bad.write_text('{"hello": "world"}\n')
    else:
        bad.write_bytes(save({"att_x": torch.zeros(2, 1, 64)}, metadata={"other": "x"}))
    _reject(model, bad)


def test_missing_file_rejected(model, tmp_path):
    _reject(model, tmp_path / "nope.state", "no such")


@pytest.mark.parametrize("what", ["tensor-shape", "meta-dims", "dtype", "missing-tensor"])
def test_wrong_shapes_rejected(model, state_file, tmp_path, what):
    meta, tensors = _meta_and_tensors(state_file.read_bytes())
    if what == "tensor-shape":
        tensors["wkv"] = tensors["wkv"][:, :, :, :16].contiguous()
    elif what == "meta-dims":
        meta["n_embd"], meta["n_head"] = 96, 3
    elif what == "dtype":
        tensors["ffn_x"] = tensors["ffn_x"].half()
    else:
        del tensors["ffn_x"]
    bad = tmp_path / f"{what}.state"
    bad.write_bytes(_rebuild(tensors, meta))
    _reject(model, bad, "shape")


def test_state_of_other_dimensions_rejected_on_use(model, tmp_path):
    """A well-formed state of another model size is refused by the model that tries to use it."""
    wide = _model(tmp_path, seed=1, n_embd=96)
    _, s = wide.forward(PROMPT)
    s.fingerprint = model.fingerprint  # even with a matching fingerprint, the dimensions are checked
    path = tmp_path / "wide.state"
    s.save(path)
    loaded = model.load_state(path)
    with pytest.raises(StateError, match="dimensions"):
        model.forward(PROMPT, loaded)


def _temp_files(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_failed_save_keeps_old_file(model, used_state, tmp_path, monkeypatch):
    path = tmp_path / "keep.state"
    used_state.save(path)
    old = path.read_bytes()
    _, newer = model.forward([1, 2, 3], used_state)

    real_write = Path.write_bytes

    def half_then_fail(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError):
        newer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert states_equal(model.load_state(path), used_state)
    assert _temp_files(tmp_path) == []


def test_failed_rename_keeps_old_file(model, used_state, tmp_path, monkeypatch):
    import edge_rwkv.fileio as fileio

    path = tmp_path / "keep.state"
    used_state.save(path)
    old = path.read_bytes()

    def fail(*a, **k):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(fileio.os, "replace", fail)
    _, newer = model.forward([1, 2, 3], used_state)
    with pytest.raises(OSError):
        newer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old and _temp_files(tmp_path) == []


def test_failed_serialisation_keeps_old_file(model, used_state, tmp_path, monkeypatch):
    from edge_rwkv import state as state_module

    path = tmp_path / "keep.state"
    used_state.save(path)
    old = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("serialisation failed midway")

    monkeypatch.setattr(state_module, "safetensors_save", boom)
    with pytest.raises(RuntimeError):
        used_state.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old and _temp_files(tmp_path) == []


def test_save_creates_parent_folder_and_overwrites(used_state, model, tmp_path):
    path = tmp_path / "a" / "b" / "s.state"
    model.new_state().save(path)
    used_state.save(path)
    assert states_equal(State.load(path), used_state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.state"]


# --------------------------------------------------------------------------- the header is checked and checksummed

@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.pop("fingerprint"), "fingerprint is missing"),
    (lambda m: m.update(fingerprint=12345), "fingerprint must be a string"),
    (lambda m: m.update(fingerprint=["x"]), "fingerprint must be a string"),
    (lambda m: m.update(tokens=-1), "tokens"),
    (lambda m: m.update(tokens=10**400), "tokens"),
    (lambda m: m.update(tokens=True), "tokens"),
    (lambda m: m.update(n_layer=2147483648), "n_layer"),
    (lambda m: m.update(head_size=0), "head_size"),
    (lambda m: m.update(sha256=None), "sha256"),
])
def test_invalid_header_fields_rejected(model, state_file, tmp_path, edit, needle):
    meta, tensors = _meta_and_tensors(state_file.read_bytes())
    edit(meta)
    bad = tmp_path / "field.state"
    bad.write_bytes(_rebuild(tensors, meta))
    _reject(model, bad, needle)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(tokens=m["tokens"] + 1),
    lambda m: m.update(fingerprint="0" * 64),
    lambda m: m.update(extra="x"),
])
def test_checksum_covers_the_header(state_file, tmp_path, edit):
    meta, tensors = _meta_and_tensors(state_file.read_bytes())
    assert meta["format_version"] == 2
    edit(meta)
    bad = tmp_path / "header.state"
    bad.write_bytes(_rebuild(tensors, meta))
    with pytest.raises(StateError, match="checksum"):
        State.load(bad)  # no fingerprint expectation: the checksum alone catches it


def test_extra_header_metadata_rejected(state_file, tmp_path):
    meta, tensors = _meta_and_tensors(state_file.read_bytes())
    bad = tmp_path / "extra.state"
    bad.write_bytes(save({k: v.contiguous() for k, v in tensors.items()},
                         metadata={"edge_rwkv_state": json.dumps(meta, sort_keys=True), "note": "x"}))
    with pytest.raises(StateError, match="unexpected metadata"):
        State.load(bad)


def test_version_1_files_still_read(model, used_state, tmp_path):
    """Format 1 (checksum over the tensors only) loads as before; its header fields are still type-checked."""
    import hashlib

    tensors = {k: getattr(used_state, k).contiguous() for k in ("att_x", "wkv", "ffn_x")}
    h = hashlib.sha256()
    for k in ("att_x", "wkv", "ffn_x"):
        h.update(tensors[k].numpy().tobytes())
    meta = {"format": "edge-rwkv-state", "format_version": 1, "fingerprint": model.fingerprint,
            "tokens": used_state.tokens, "sha256": h.hexdigest(), **used_state.dims()}
    old = tmp_path / "v1.state"
    old.write_bytes(_rebuild(tensors, meta))
    assert states_equal(model.load_state(old), used_state)
    meta["fingerprint"] = 7
    old.write_bytes(_rebuild(tensors, meta))
    _reject(model, old, "fingerprint must be a string")


def test_killed_saves_leave_no_temp_files_behind(used_state, tmp_path):
    """A save killed mid-write leaves its temp file; the next save to the folder removes it (and only
    temps whose writer is gone: a live writer's temp is kept)."""
    import os
    import signal
    import subprocess
    import sys

    from edge_rwkv.fileio import atomic_write_bytes, remove_stale_temps

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".other.state.partial-{child.pid}-abc123.tmp"
        live.write_bytes(b"being written")
        # a real save killed while writing: the writer process dies between write and rename
        code = ("import os, sys, time\n"
                "from pathlib import Path\n"
                "import edge_rwkv.fileio as f\n"
                "with f.atomic_path(sys.argv[1]) as tmp:\n"
                "    Path(tmp).write_bytes(b'x' * 100000)\n"
                "    print('written', flush=True)\n"
                "    time.sleep(60)\n")
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s.state")], stdout=subprocess.PIPE)
            assert p.stdout.readline() == b"written\n"
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
        dead = [q for q in tmp_path.iterdir() if q.name.startswith(".s.state.partial-")]
        assert len(dead) == 1  # each killed save already removed the temp of the one killed before it
        mine_stale = tmp_path / f".x.partial-{os.getpid()}-zzz.tmp"  # this process, not in flight
        mine_stale.write_bytes(b"old")
        unrelated = tmp_path / ".notes.tmp"
        unrelated.write_bytes(b"not ours")
        used_state.save(tmp_path / "s.state")
        left = sorted(q.name for q in tmp_path.iterdir())
        assert left == sorted([live.name, unrelated.name, "s.state"]), left
        assert State.load(tmp_path / "s.state").tokens == used_state.tokens
    finally:
        child.kill()
        child.wait()
    assert remove_stale_temps(tmp_path) == 1  # the writer of `live` is gone now
    atomic_write_bytes(tmp_path / "m", b"x", mode=0o600)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o600
