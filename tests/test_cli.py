"""The `edge-rwkv` command line, end to end through subprocesses (tiny models, vocab 65,536 for the tokenizer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import edge_rwkv
from edge_rwkv import State
from edge_rwkv.synthetic import random_checkpoint

PROMPT = "Once upon a time"


def cli(*args, stdin=None, cwd=None, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "edge_rwkv", *map(str, args)], input=stdin, capture_output=True,
                          encoding="utf-8", errors="strict", cwd=cwd, env=env, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def failed(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edge-rwkv: error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    pth = d / "official.pth"
    torch.save(random_checkpoint(2, 32, 16, vocab_size=65536, seed=9), pth)
    return d


@pytest.fixture(scope="module")
def artifact(work):
    """official .pth → fp16 edge-rwkv artifact, via `convert`."""
    out = work / "model-fp16.safetensors"
    r = ok(cli("convert", work / "official.pth", "-o", out, "--dtype", "float16"))
    assert out.exists() and "float16" in r.stdout
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    return out


SAMPLING = ("--temperature", "0", "--max-tokens", "8")


def test_init_and_info(work):
    out = work / "init.safetensors"
    r = ok(cli("init", "-o", out, "--layers", "1", "--embd", "32", "--head-size", "16", "--seed", "3"))
    assert out.exists() and "random" in r.stdout
    text = ok(cli("info", out)).stdout
    assert "RWKV-7 x070" in text and "1 layers" in text and "width 32" in text and "2 heads" in text
    assert "vocab 65536" in text and "state" in text
    info = json.loads(ok(cli("info", out, "--json")).stdout)
    assert info["config"]["n_layer"] == 1 and info["config"]["n_embd"] == 32 and info["n_head"] == 2
    assert info["format"] == "edge-rwkv artifact" and info["dtype"] == "float32"
    assert info["state_bytes_per_sequence"] == (2 * 32 * 4 + 2 * 16 * 16 * 4)
    m = edge_rwkv.load(out)
    assert m.config.n_layer == 1 and m.metadata["random_init"] == {"seed": 3}


def test_convert_and_info_json(work, artifact):
    info = json.loads(ok(cli("info", artifact, "--json")).stdout)
    assert info["dtype"] == "float16" and info["config"]["n_layer"] == 2
    assert info["source_sha256"] and len(info["source_sha256"]) == 64
    assert info["format"] == "edge-rwkv artifact" and info["parameters"] > 0
    # the converted artifact holds the same weights, rounded to fp16
    a = edge_rwkv.load(artifact)
    b = edge_rwkv.load(work / "official.pth")
    assert a.fingerprint == b.fingerprint
    assert a.net.head.weight.dtype == torch.float32  # cpu computes in fp32 by default
    assert torch.equal(a.net.head.weight, b.net.head.weight.half().float())


def test_generate_greedy_and_state_files(work, artifact):
    s1 = work / "after-prompt.state"
    r1 = ok(cli("generate", artifact, PROMPT, *SAMPLING, "--state-out", s1))
    r2 = ok(cli("generate", artifact, PROMPT, *SAMPLING))
    assert r1.stdout == r2.stdout and r1.stdout.strip()
    assert "state saved" in r1.stderr
    m = edge_rwkv.load(artifact)
    assert r1.stdout == m.generate(PROMPT, max_tokens=8, temperature=0) + "\n"
    saved = m.load_state(s1)
    gen = m.stream(PROMPT, max_tokens=8, temperature=0)
    "".join(gen)
    assert saved.tokens == gen.state.tokens == len(m.tokenizer.encode(PROMPT)) + len(gen.tokens)
    assert torch.equal(saved.wkv, gen.state.wkv)
    r3 = ok(cli("generate", artifact, " and then", *SAMPLING, "--state-in", s1))
    assert r3.stdout == m.generate(" and then", max_tokens=8, temperature=0, state=saved) + "\n"


def test_chat_with_save_load_reset(work, artifact):
    saved = work / "chat.state"
    script = (f"/save {saved}\nHello there\n/save {saved}\n/reset\nWho are you?\n/load {work / 'absent.state'}\n"
              f"/bogus\n/load\n/load {saved}\nTell me more\n/quit\nnever read\n")
    r = ok(cli("chat", artifact, "--temperature", "0", "--max-tokens", "6", stdin=script))
    assert r.stdout.count("Assistant:") == 3
    # command errors are reported on stderr and the chat goes on
    assert "nothing to save yet" in r.stderr and "no such state file" in r.stderr
    assert "unknown command /bogus" in r.stderr and "needs a file path" in r.stderr
    assert f"[saved" in r.stderr and "[conversation reset]" in r.stderr and f"[loaded state from {saved}]" in r.stderr
    assert "never read" not in r.stdout
    replies = [part.split("\n\n")[0] for part in r.stdout.split("Assistant: ")[1:]]
    # the same conversation in-process gives the same replies: after /load it continues the saved turn
    m = edge_rwkv.load(artifact)
    chat = m.chat(temperature=0, max_tokens=6)
    assert chat.ask("Hello there") == replies[0]
    st = State.load(saved, expect_fingerprint=m.fingerprint)
    assert torch.equal(st.wkv, chat.state.wkv) and st.tokens == chat.state.tokens
    fresh = m.chat(temperature=0, max_tokens=6)
    assert fresh.ask("Who are you?") == replies[1]
    chat2 = m.chat(temperature=0, max_tokens=6)
    chat2.load(saved)
    assert chat2.ask("Tell me more") == replies[2]


# --------------------------------------------------------------------------- bad input

def test_missing_model_file(work):
    failed(cli("info", work / "nope.pth"), "no such file", "nope.pth")


def test_corrupt_model_file(work):
    bad = work / "corrupt.safetensors"
    data = (work / "official.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    failed(cli("generate", bad, "hi"), "corrupt.safetensors")


def test_bad_dtype(artifact):
    failed(cli("generate", artifact, "hi", "--dtype", "int3"), "unsupported dtype", "int3")


def test_bad_temperature(artifact):
    failed(cli("generate", artifact, "hi", "--temperature", "-1"), "temperature")


def test_corrupt_state_in(work, artifact):
    bad = work / "bad.state"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    failed(cli("generate", artifact, "hi", "--state-in", bad), "bad.state")


# --------------------------------------------------------------------------- help

def test_help_subprocess():
    r = ok(cli("--help"))
    for c in ("info", "convert", "init", "generate", "chat"):
        assert c in r.stdout


def test_help_for_every_subcommand(capsys):
    """Every registered subcommand's --help exits 0 (in-process: one interpreter start per command is slow)."""
    from edge_rwkv.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = list(sub.choices)
    assert {"info", "convert", "init", "generate", "chat"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith("usage: edge-rwkv " + name), out[:80]


@pytest.mark.parametrize("args,needle", [
    (["generate", "{model}", "", "--max-tokens", "2"], "prompt is empty"),
    (["generate", "{model}", "hi", "--top-p", "2"], "top_p"),
    (["generate", "{model}", "hi", "--max-tokens", "-1"], "max_tokens"),
    (["generate", "{model}", "hi", "--device", "tpu"], "device"),
    (["init", "-o", "{dir}/x.safetensors", "--embd", "30", "--head-size", "16"], "multiple"),
    (["convert", "{model}", "-o", "{model}"], "overwrite"),
    (["convert", "{model}", "-o", "{dir}/y.safetensors", "--dtype", "int8"], "dtype"),
])
def test_more_bad_inputs_in_process(artifact, capsys, args, needle):
    """Same error contract, checked in-process (cheaper than a new interpreter per case)."""
    from edge_rwkv.cli import main

    argv = [a.format(model=artifact, dir=artifact.parent) for a in args]
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("edge-rwkv: error: ") and needle in err[0], err


# --------------------------------------------------------------------------- first-run paper cuts

@pytest.mark.parametrize("arg", ["{model}", "{dir}/absent.pth", "other-model.safetensors"])
def test_generate_with_the_prompt_forgotten(artifact, capsys, arg):
    """A lone model file (existing, or named like one) is not taken as the prompt."""
    from edge_rwkv.cli import main

    name = arg.format(model=artifact, dir=artifact.parent)
    assert main(["generate", name]) == 1
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("edge-rwkv: error: no prompt: ") and name in err[0], err
    assert cap.out == ""


def test_generate_reads_the_prompt_from_stdin(artifact):
    r = ok(cli("generate", artifact, "-", *SAMPLING, stdin=PROMPT + "\n"))  # the final newline is not prompt
    m = edge_rwkv.load(artifact)
    assert r.stdout == m.generate(PROMPT, max_tokens=8, temperature=0) + "\n"
    failed(cli("generate", artifact, "-", *SAMPLING, stdin=""), "prompt is empty")


def test_output_into_a_closed_pipe_ends_quietly(artifact):
    """`edge-rwkv info MODEL | head` where head has gone: no error, no traceback; the status of SIGPIPE."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "edge_rwkv", "info", str(artifact), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == "", err


def test_serve_on_a_busy_port(artifact, tmp_path, capsys):
    """One line, at once (before the model loads), and nothing written to the data folder."""
    import socket

    from edge_rwkv.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(artifact), "--port", str(port), "--data-dir", str(tmp_path / "data")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"edge-rwkv: error: cannot listen on 127.0.0.1:{port}: the port is in use (another server is "
                   f"running there; choose another --port)"], err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_model_files_get_the_permissions_open_would_give(tmp_path, umask, mode):
    """Written through a temp file (mkstemp: 0600) and safetensors (which replaces it): the result follows
    the umask like any file the user writes."""
    from edge_rwkv.cli import main

    out = tmp_path / "m.safetensors"
    old = os.umask(umask)
    try:
        assert main(["init", "-o", str(out), "--layers", "1", "--embd", "32", "--head-size", "16"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
