"""`edge-rwkv tune`: state tuning on tiny random models — a persona learned, gradients reaching the
initial state, two gloo ranks equal to one, a killed rank, bad data files, quantized bases, LoRA."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import edge_rwkv
from edge_rwkv.checkpoint import load_checkpoint
from edge_rwkv.cli import main as cli_main
from edge_rwkv.synthetic import random_checkpoint
from edge_rwkv.tokenizer import default_tokenizer
from edge_rwkv.tune import (Ranks, TuneError, build_tuning_net, collate, dense_tensors, load_samples, loss_sum,
                            mean_loss)
from edge_rwkv.wkv import wkv7_chunked

PERSONA = "I am Captain Goose, a pirate."
QUESTIONS = ["Hi", "Who are you?", "What is your name?", "Tell me about yourself.", "Hello there", "Good morning",
             "Introduce yourself", "Hey"]


def write_model(path: Path, n_layer=2, n_embd=64, head_size=16, seed=7) -> Path:
    sd = random_checkpoint(n_layer, n_embd, head_size, seed=seed)
    # ln0 scaled down: the embedding's share of the residual stream shrinks, so the state's part is large
    # enough for a random model to learn a persona in a few dozen steps
    sd["blocks.0.ln0.weight"] *= 0.1
    sd["blocks.0.ln0.bias"] *= 0.1
    save_file(sd, str(path))
    return path


def write_persona(path: Path) -> Path:
    with open(path, "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": PERSONA}]}) + "\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one thread does them fastest, and on a busy shared CPU torch's worker
    threads waiting on each other made the persona run 3-4× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    return {"model": write_model(d / "m.safetensors"), "small": write_model(d / "s.safetensors", 1, 32, 16),
            "data": write_persona(d / "persona.jsonl")}


def last_json(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


# --------------------------------------------------------------------------- learning a persona

def test_state_tuning_learns_a_persona(files, tmp_path, capsys):
    out = tmp_path / "pirate.state"
    assert cli_main(["tune", str(files["model"]), "--data", str(files["data"]), "-o", str(out), "--steps", "60",
                     "--lr", "2", "--batch", "4", "--ctx", "64", "--val-every", "20"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["val_loss"] < 0.8 < res["val_loss_start"] and res["kept_step"] > 0
    m = edge_rwkv.load(files["model"])
    init = m.initial_state(out)
    assert init.fingerprint == m.fingerprint and torch.count_nonzero(init.att_x) == 0
    assert m.chat(state=init, temperature=0, max_tokens=12).ask("Who are you?").startswith(PERSONA)
    assert not m.chat(temperature=0, max_tokens=12).ask("Who are you?").startswith(PERSONA[:6])
    # the command line loads it as --init-state (the daemon's --init-states reads the same loader)
    assert cli_main(["generate", str(files["model"]), "User: Who are you?\n\nAssistant:", "--temperature", "0",
                     "--max-tokens", "10", "--init-state", str(out)]) == 0
    assert capsys.readouterr().out.startswith(" " + PERSONA[:18])
    # and the daemon takes it from its --init-states folder by name
    from edge_rwkv.serve.config import load_initial_states

    assert torch.equal(load_initial_states(m, str(tmp_path))["pirate"].wkv, init.wkv)


# --------------------------------------------------------------------------- the gradient reaches state0

def test_state_gradient_matches_reference_and_finite_differences(files):
    """d(loss)/d(state0) through the chunked WKV form (what long CPU windows use) equals the gradient
    through the step-by-step recurrence, and a central finite difference along a random direction."""
    ckpt = load_checkpoint(files["small"])
    net, tun = build_tuning_net(ckpt.config, dense_tensors(ckpt), torch.float32, torch.device("cpu"), "state")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tun.state.copy_(torch.randn(tun.state.shape, generator=g) * 0.5)
    inputs = torch.randint(0, 65536, (2, 37), generator=g)
    targets = torch.randint(0, 65536, (2, 37), generator=g)
    mask = torch.rand(2, 37, generator=g) < 0.7

    def grad_with(wkv):
        net.wkv = wkv
        tun.state.grad = None
        loss_sum(net, tun.state, inputs, targets, mask).backward()
        return tun.state.grad.clone()

    from edge_rwkv.wkv import wkv7_reference

    g_chunked = grad_with(lambda *x: wkv7_chunked(*x, chunk=8))
    g_ref = grad_with(wkv7_reference)
    assert g_ref.abs().max() > 0 and torch.count_nonzero(g_ref[0]) > 0 and torch.count_nonzero(g_ref[-1]) > 0
    torch.testing.assert_close(g_chunked, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())
    direction = torch.randn(tun.state.shape, generator=g)
    eps = 1e-2
    with torch.no_grad():
        up = loss_sum(net, tun.state + eps * direction, inputs, targets, mask)
        down = loss_sum(net, tun.state - eps * direction, inputs, targets, mask)
    fd = float((up.double() - down.double()) / (2 * eps))
    analytic = float((g_ref * direction).sum())
    assert abs(fd - analytic) <= 2e-2 * abs(analytic), (fd, analytic)


def _sim_checks() -> dict:
    """Run under the Numba CUDA simulator (child process): the tuning loss through the GPU autograd WKV
    (cuda_kernels.wkv7, layers recomputed) gives the state gradient of the float32 step-by-step reference."""
    import tempfile

    from edge_rwkv.cuda_kernels import wkv7
    from edge_rwkv.cuda_kernels._runtime import simulator
    from edge_rwkv.wkv import wkv7_reference

    assert simulator()
    with tempfile.TemporaryDirectory() as d:
        ckpt = load_checkpoint(write_model(Path(d) / "m.safetensors", 1, 32, 16))
        net, tun = build_tuning_net(ckpt.config, dense_tensors(ckpt), torch.float32, torch.device("cpu"), "state")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tun.state.copy_(torch.randn(tun.state.shape, generator=g) * 0.5)
    inputs, targets = torch.randint(0, 65536, (2, 6), generator=g), torch.randint(0, 65536, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    grads = []
    for wkv in (wkv7, wkv7_reference):
        net.wkv = wkv
        tun.state.grad = None
        loss_sum(net, tun.state, inputs, targets, mask, recompute=True).backward()
        grads.append(tun.state.grad.clone())
    err = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    return {"state_grad_through_kernel": [err <= 1e-4 and bool(grads[1].abs().max() > 0), f"rel err {err:.3g}"]}


def test_state_gradient_through_the_gpu_kernel_under_the_simulator():
    from _simulator import simulator_results

    ok, detail = simulator_results(__file__)["state_grad_through_kernel"]
    assert ok, detail


def test_recompute_gives_the_same_gradient(files):
    ckpt = load_checkpoint(files["small"])
    net, tun = build_tuning_net(ckpt.config, dense_tensors(ckpt), torch.float32, torch.device("cpu"), "state")
    train, _ = load_samples(files["data"], default_tokenizer(), 64, 0.2)
    inputs, targets, mask = collate(train[:3], "cpu")
    grads = []
    for recompute in (True, False):
        tun.state.grad = None
        loss_sum(net, tun.state, inputs, targets, mask, recompute=recompute).backward()
        grads.append(tun.state.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def _cuda_kernels_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from edge_rwkv.cuda_kernels import cuda_available

    return cuda_available()


needs_gpu = pytest.mark.skipif(not _cuda_kernels_ready(), reason="needs CUDA and numba-cuda")


@pytest.mark.gpu
@needs_gpu
def test_gpu_state_gradient_matches_cpu(files):
    """The GPU path (Numba WKV autograd, layers recomputed) gives the CPU reference's state gradient."""
    from edge_rwkv.wkv import wkv7_reference

    ckpt = load_checkpoint(files["model"])
    grads = []
    for device in ("cuda", "cpu"):
        net, tun = build_tuning_net(ckpt.config, dense_tensors(ckpt), torch.float32, torch.device(device), "state")
        if device == "cpu":
            net.wkv = wkv7_reference
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            tun.state.copy_(torch.randn(tun.state.shape, generator=g) * 0.5)
        inputs, targets = (torch.randint(0, 65536, (2, 150), generator=g).to(device) for _ in range(2))
        mask = torch.ones(2, 150, dtype=torch.bool, device=device)
        loss_sum(net, tun.state, inputs, targets, mask).backward()
        grads.append(tun.state.grad.cpu())
    err = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    assert err <= 1e-3, err


@pytest.mark.gpu
@needs_gpu
def test_state_tuning_learns_a_persona_on_cuda(files, tmp_path, capsys):
    out = tmp_path / "pirate.state"
    assert cli_main(["tune", str(files["model"]), "--data", str(files["data"]), "-o", str(out), "--steps", "60",
                     "--lr", "2", "--batch", "4", "--ctx", "64", "--val-every", "20", "--device", "cuda",
                     "--dtype", "float32"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["val_loss"] < 0.8 < res["val_loss_start"]
    m = edge_rwkv.load(files["model"])
    assert m.chat(state=m.initial_state(out), temperature=0, max_tokens=12).ask("Who are you?").startswith(PERSONA)


# --------------------------------------------------------------------------- ranks (torch.distributed, gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    """The environment of a child process that imports the edge_rwkv this test imported (the children
    run in a temporary folder: `python -m` puts the working folder first on the path)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = str(Path(edge_rwkv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def tune_args(files, out, *extra) -> list[str]:
    return [str(files["small"]), "--data", str(files["data"]), "-o", str(out), "--ctx", "64", "--batch", "4",
            "--lr", "0.1", *extra]


TWO_GPUS = pytest.mark.skipif(not (_cuda_kernels_ready() and torch.cuda.device_count() >= 2), reason="needs 2 GPUs")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_two_ranks_give_the_state_of_one(files, tmp_path, capsys, device):
    """2 ranks (gloo on CPU, NCCL on 2 GPUs) make the update 1 rank makes over the same global batch."""
    one, two = tmp_path / "one.state", tmp_path / "two.state"
    steps = ["--steps", "3", "--val-every", "3", "--device", device, "--dtype", "float32"]
    assert cli_main(["tune", *tune_args(files, one, *steps)]) == 0
    single = capsys.readouterr().out
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "edge_rwkv.tune",
                           *tune_args(files, two, *steps)], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert pair.returncode == 0, pair.stderr[-3000:]
    assert "2 rank(s)" in pair.stdout and pair.stdout.count("tuning state") == 1  # rank 0 alone reports
    a, b = edge_rwkv.State.load(one), edge_rwkv.State.load(two)
    assert torch.count_nonzero(a.wkv) > 0
    torch.testing.assert_close(b.wkv, a.wkv, rtol=1e-4, atol=1e-5)
    assert last_json(single)["val_loss"] == pytest.approx(last_json(pair.stdout)["val_loss"], rel=1e-5)


def test_a_killed_rank_ends_the_run_with_an_error_and_no_file(files, tmp_path):
    out = tmp_path / "never.state"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "edge_rwkv.tune",
                                       *tune_args(files, out, "--steps", "100000")], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        first = procs[0].stdout.readline()  # rank 0's opening line: training is under way
        while first and not first.startswith("step"):
            first = procs[0].stdout.readline()
        assert first.startswith("step"), procs[0].stderr.read()[-2000:]
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert "lost contact with another rank" in err and "no file written" in err, err[-2000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


# --------------------------------------------------------------------------- bad data

def _bad(tmp_path, case) -> Path:
    ok = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    files = {
        "empty": ("d.jsonl", b""),
        "bad_json": ("d.jsonl", (ok + "\n{\"messages\": [\n").encode()),
        "wrong_keys": ("d.jsonl", (ok + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n").encode()),
        "message_keys": ("d.jsonl", (ok + "\n" + json.dumps({"messages": [{"from": "user", "value": "x"}]})).encode()),
        "bad_role": ("d.jsonl", (ok + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]})).encode()),
        "no_reply": ("d.jsonl", (ok + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})).encode()),
        "binary": ("d.txt", bytes(range(256)) * 4),
        "not_utf8": ("d.txt", "héllo\n\nworld".encode("latin-1")),
        "suffix": ("d.csv", b"a,b\n"),
        "one_document": ("d.txt", b"only one paragraph here"),
        "absent": ("missing.jsonl", None),
    }
    name, data = files[case]
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    return path


BAD = {"empty": "empty", "bad_json": ":2: not valid JSON", "wrong_keys": ":2: each line must be an object",
       "message_keys": ":2: message 0 must be an object", "bad_role": ":2: message 0 needs a role",
       "no_reply": ":2: the conversation has no assistant reply", "binary": "binary file",
       "not_utf8": "not UTF-8", "suffix": ".txt or .jsonl", "one_document": "at least 2 documents (or one longer than --ctx 64)",
       "absent": "no such data file"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_files_get_clear_errors(tmp_path, case):
    path = _bad(tmp_path, case)
    with pytest.raises(TuneError) as e:
        load_samples(path, default_tokenizer(), 64, 0.1)
    msg = str(e.value)
    assert str(path) in msg and BAD[case] in msg and "\n" not in msg, msg


def test_bad_data_on_the_command_line(files, tmp_path, capsys):
    out = tmp_path / "x.state"
    assert cli_main(["tune", str(files["small"]), "--data", str(_bad(tmp_path, "bad_json")), "-o", str(out)]) == 1
    assert "not valid JSON" in capsys.readouterr().err and not out.exists()
    assert cli_main(["tune", str(files["small"]), "--data", str(files["data"]), "-o", str(out), "--steps", "0"]) == 1
    assert "--steps must be positive" in capsys.readouterr().err and not out.exists()


def test_text_documents_and_windows(tmp_path):
    tok = default_tokenizer()
    path = tmp_path / "d.txt"
    path.write_text("first document " * 40 + "\n\n\n" + "second one\n\nthird")
    train, val = load_samples(path, tok, 16, 0.34)
    assert len(val) == 1 and val[0].ids.tolist() == [0] + tok.encode("third")
    assert all(len(s.mask) <= 16 and len(s.ids) == len(s.mask) + 1 for s in train)
    assert sum(s.targets for s in train) == len(tok.encode(("first document " * 40).strip())) + len(tok.encode("second one"))


def test_one_long_document_holds_out_its_tail(tmp_path):
    tok = default_tokenizer()
    path = tmp_path / "book.txt"
    path.write_text("a line of the one long document\n" * 30)
    train, val = load_samples(path, tok, 32, 0.25)
    ids = [0] + tok.encode(("a line of the one long document\n" * 30).strip())
    assert len(train) + len(val) == -(-(len(ids) - 1) // 32) and len(val) == round((len(train) + len(val)) * 0.25)
    assert val[-1].ids.tolist() == ids[-len(val[-1].ids):]


def test_minutes_bound_the_run(files, tmp_path, capsys):
    out = tmp_path / "t.state"
    t0 = time.time()
    assert cli_main(["tune", *tune_args(files, out, "--minutes", "0.002", "--steps", "100000")]) == 0
    res = last_json(capsys.readouterr().out)
    assert 1 <= res["steps"] < 100000 and time.time() - t0 < 60 and out.exists()


# --------------------------------------------------------------------------- quantized base, LoRA

def test_quantized_base_is_scored_on_the_quantized_model(files, tmp_path, capsys):
    q = tmp_path / "q8.safetensors"
    assert cli_main(["quantize", str(files["small"]), "-o", str(q), "--bits", "8"]) == 0
    out = tmp_path / "q.state"
    assert cli_main(["tune", str(q), "--data", str(files["data"]), "-o", str(out), "--steps", "4", "--lr", "0.5",
                     "--batch", "4", "--ctx", "64", "--val-every", "2"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["val_loss_quantized"] is not None and res["val_loss"] < res["val_loss_start"]
    assert res["val_loss_quantized"] == pytest.approx(res["val_loss"], rel=1e-3)
    m = edge_rwkv.load(q)
    _, val = load_samples(files["data"], m.tokenizer, 64, 0.1)
    state = m.initial_state(out).wkv[:, 0]
    assert mean_loss(m.net, state, val, 4, Ranks(), m.device) == pytest.approx(res["val_loss_quantized"], rel=1e-6)


def test_lora_writes_a_merged_artifact(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert cli_main(["tune", str(files["small"]), "--data", str(files["data"]), "-o", str(out), "--method", "lora",
                     "--steps", "6", "--lr", "1e-2", "--batch", "4", "--ctx", "64", "--val-every", "3"]) == 0
    res = last_json(capsys.readouterr().out)
    assert res["val_loss"] < res["val_loss_start"]
    merged, base = edge_rwkv.load(out), edge_rwkv.load(files["small"])
    assert load_checkpoint(out).tensors["blocks.0.att.key.weight"].dtype == torch.float32  # the base's dtype
    assert merged.fingerprint == base.fingerprint  # a persona state tuned on the base still fits
    _, val = load_samples(files["data"], merged.tokenizer, 64, 0.1)
    zero = torch.zeros(1, 2, 16, 16)
    assert mean_loss(merged.net, zero, val, 4, Ranks(), merged.device) == pytest.approx(res["val_loss"], rel=1e-4)
    assert mean_loss(base.net, zero, val, 4, Ranks(), base.device) == pytest.approx(res["val_loss_start"], rel=1e-4)


if __name__ == "__main__":
    from _simulator import report

    report(_sim_checks())
