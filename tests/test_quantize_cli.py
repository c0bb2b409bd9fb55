"""`edge-rwkv quantize` end to end, and its bad inputs (one-line errors, nothing written)."""
import subprocess
import sys

import pytest
import torch

import edge_rwkv
from edge_rwkv.synthetic import random_checkpoint


def run(*args):
    return subprocess.run([sys.executable, "-m", "edge_rwkv", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("qcli") / "m.pth"
    torch.save(random_checkpoint(1, 64, 32, 65536, seed=2), p)
    return p


def test_quantize_int4_gptq_then_load_and_generate(model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "q4.safetensors"
    r = run("quantize", model, "-o", out, "--bits", "4", "--group-size", "32", "--method", "gptq", "--calib", calib)
    assert r.returncode == 0, r.stderr
    assert "int4 g32, gptq" in r.stdout
    m = edge_rwkv.load(out)
    assert {s["format"] for s in m.metadata["quant"]["tensors"].values()} == {"int4"}
    assert m.metadata["quant"]["policy"]["method"] == "gptq"
    assert "blocks.0.att.output.weight" not in m.metadata["quant"]["tensors"]  # kept fp16 by default
    assert isinstance(m.generate("Hello", max_tokens=4, temperature=0), str)
    info = run("info", out, "--tensors")
    assert info.returncode == 0 and "int4" in info.stdout


@pytest.mark.parametrize("extra,message", [
    (["--calib", "/nonexistent/calib.txt", "--method", "awq"], "cannot read calibration text"),
    (["--calib-tokens", "3", "--method", "gptq"], "--calib-tokens must be at least 16"),
])
def test_bad_calibration_input(model, tmp_path, extra, message):
    out = tmp_path / "q.safetensors"
    r = run("quantize", model, "-o", out, "--bits", "8", *extra)
    assert r.returncode != 0
    assert r.stderr.startswith("edge-rwkv: error:") and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_refuses_missing_input_and_requantizing(model, tmp_path):
    r = run("quantize", tmp_path / "missing.pth", "-o", tmp_path / "x.safetensors", "--bits", "8")
    assert r.returncode != 0 and "no such file" in r.stderr
    q8 = tmp_path / "q8.safetensors"
    assert run("quantize", model, "-o", q8, "--bits", "8").returncode == 0
    r = run("quantize", q8, "-o", tmp_path / "again.safetensors", "--bits", "4")
    assert r.returncode != 0 and "already quantized" in r.stderr
    assert not (tmp_path / "again.safetensors").exists()


def test_device_option(model, tmp_path):
    """--device cpu is the default's arithmetic; a device that is not there fails before anything is written."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("quantize", model, "-o", a, "--bits", "4").returncode == 0
    assert run("quantize", model, "-o", b, "--bits", "4", "--device", "cpu").returncode == 0
    la, lb = edge_rwkv.load(a), edge_rwkv.load(b)
    assert torch.equal(la.forward([1, 2, 3])[0], lb.forward([1, 2, 3])[0])
    for dev, message in (("tpu", "unknown device"), ("cuda", "no CUDA GPU")):
        if dev == "cuda" and torch.cuda.is_available():
            continue
        out = tmp_path / f"{dev}.safetensors"
        r = run("quantize", model, "-o", out, "--bits", "8", "--device", dev)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()


def _imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of the modules a file of `package` imports (relative imports resolved)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_quant_package_depends_neither_on_the_command_line_nor_on_training():
    """Each command is registered by its own package (edge_rwkv.cli.EXTRA_COMMANDS); quantization and
    training share the corpus module instead of importing each other."""
    from pathlib import Path

    assert {"edge_rwkv.cli", "edge_rwkv.quant.cli"} <= _imported_modules("from ..cli import x\nfrom .cli import y",
                                                                         "edge_rwkv.quant")
    quant_dir = Path(edge_rwkv.quant.__file__).parent
    for path in sorted(quant_dir.glob("*.py")):
        imported = _imported_modules(path.read_text(encoding="utf-8"), "edge_rwkv.quant")
        assert not imported & {"edge_rwkv.cli", "edge_rwkv.training"}, (path.name, sorted(imported))
    corpus = (Path(edge_rwkv.__file__).parent / "corpus.py").read_text(encoding="utf-8")
    imported = _imported_modules(corpus, "edge_rwkv")
    assert "edge_rwkv.tokenizer" in imported
    assert not any(m.startswith(("edge_rwkv.quant", "edge_rwkv.training")) for m in imported), sorted(imported)
