"""`edge-rwkv export` as a subprocess: ONNX export with verification, the TensorRT path, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edge_rwkv", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from safetensors.torch import save_file

    from edge_rwkv.synthetic import random_checkpoint

    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    save_file(random_checkpoint(2, 64, 32, vocab_size=113, seed=2), str(path))
    return path


def test_export_onnx_and_verify(tmp_path, model):
    out = tmp_path / "exp"
    r = run("export", str(model), "-o", str(out), "--chunk", "4", "--dtype", "float32", "--verify", "9")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["prefill"]["tokens_per_call"] == 4 and m["precision"]["matmul"] == "float32"
    assert m["target"] == "onnxruntime" and m["graphs"]["prefill"]["any_tokens"]
    assert (out / "decode.onnx").is_file() and (out / "prefill.onnx").is_file()
    assert "decode.onnx" in r.stdout and "laid out for onnxruntime" in r.stdout
    line = next(s for s in r.stdout.splitlines() if s.startswith("verify"))
    rel = float(line.split("= ")[1].split(" ")[0])
    assert rel <= 1e-4, line


def test_export_tensorrt_without_tensorrt(tmp_path, model):
    from edge_rwkv.export.tensorrt import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    out = tmp_path / "trt"
    r = run("export", str(model), "--format", "tensorrt", "-o", str(out), "--chunk", "4", "--batch", "2")
    assert r.returncode == 3
    assert "edge-rwkv: error: cannot build TensorRT engines here" in r.stderr
    assert "not installed" in r.stderr or "no CUDA GPU" in r.stderr
    cmds = [s for s in r.stdout.splitlines() if s.startswith("trtexec ")]
    assert len(cmds) == 2 and all("--stronglyTyped" in c and "--saveEngine=" in c for c in cmds)
    assert "laid out for tensorrt" in r.stdout and "TensorRT lint   10.3: clean" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["target"] == "tensorrt"
    assert (out / "decode.onnx").is_file() and not list(out.glob("*.engine"))


# Bad input in-process through the same entry point (a subprocess each would only add start-up time).

@pytest.mark.parametrize("args,msg", [
    (["--chunk", "1"], "--chunk must be between 2"),
    (["--dtype", "bfloat8"], "--dtype must be float16 or float32"),
    (["--batch", "-3"], "--batch must be between 1"),
])
def test_bad_arguments(tmp_path, model, capsys, args, msg):
    from edge_rwkv.cli import main

    assert main(["export", str(model), "-o", str(tmp_path / "x"), *args]) == 1
    err = capsys.readouterr().err
    assert msg in err and err.startswith("edge-rwkv: error:"), err
    assert not (tmp_path / "x").exists()


def test_missing_model_and_non_empty_dir(tmp_path, model, capsys):
    from edge_rwkv.cli import main

    assert main(["export", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "x")]) == 1
    assert "no such file" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a.txt").write_text("x")
    assert main(["export", str(model), "-o", str(busy)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err


def test_export_without_a_model_uses_the_default_model(tmp_path, capsys):
    from edge_rwkv.cli import main
    from edge_rwkv.default_model import ASSET

    if not ASSET.is_file():
        pytest.skip("the embedded default model is not installed")
    out = tmp_path / "default"
    assert main(["export", "-o", str(out), "--chunk", "4"]) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source_file"] == ASSET.name
    assert m["tokenizer"]["file"] in m["files"] and (out / m["tokenizer"]["file"]).is_file()
