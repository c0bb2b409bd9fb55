"""What the base install (`pip install edge-rwkv`, no extras) can do, and what a missing extra says.

A base install is imitated in a subprocess where only the standard library and the distributions that
edge-rwkv's base dependencies pull in (read from the installed metadata) can be imported: every other
installed module is blocked. `.ci/run` also checks a real fresh venv before the test extras go in.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_rwkv import extras
from edge_rwkv.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

# Runs `edge-rwkv ARGS` with every module outside the base install blocked (`None` in sys.modules makes
# `import` raise ModuleNotFoundError, as an absent package does).
BASE_ONLY = r"""
import importlib.metadata as md, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def base_requirements(dist):
    reqs = md.requires(dist) or []
    return [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in reqs if not re.search(r"\bextra\s*==", r)]

closure, todo = set(), ["edge-rwkv"]
while todo:
    name = norm(todo.pop())
    if name in closure:
        continue
    closure.add(name)
    try:
        todo += base_requirements(name)
    except md.PackageNotFoundError:  # a requirement whose marker excludes this platform
        pass
blocked = sorted(mod for mod, dists in md.packages_distributions().items()
                 if mod not in sys.stdlib_module_names and not any(norm(d) in closure for d in dists))
for mod in blocked:
    sys.modules[mod] = None
from edge_rwkv.cli import main
if sys.argv[1] != "--each":
    sys.exit(main(sys.argv[1:]))
# --each: several commands in this one interpreter (starting one costs seconds); their results as JSON
import contextlib, io, json, traceback
results = []
for argv in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = "raised"
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def base_only(*commands: list, timeout=300) -> list[dict]:
    """Run each command (a list of arguments) in one base-install interpreter: [{rc, stdout, stderr}]."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    argv = json.dumps([[str(a) for a in c] for c in commands])
    r = subprocess.run([sys.executable, "-c", BASE_ONLY, "--each", argv], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def one_error_line(r: dict) -> str:
    assert r["rc"] == 1, r
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1, r["stderr"]
    return lines[0]


def test_base_install(tmp_path):
    out = tmp_path / "onnx-out"
    help_, generate, export, bench = base_only(
        ["serve", "--help"],
        ["generate", "The socket module", "--max-tokens", "4", "--temperature", "0"],  # README's main job
        ["export", ROOT / "edge_rwkv" / "assets" / "default.safetensors", "-o", out],
        ["bench", "--plot", tmp_path / "b.png"])
    assert help_["rc"] == 0 and help_["stdout"].startswith("usage: edge-rwkv serve"), help_
    assert generate["rc"] == 0 and generate["stdout"].strip() and "Traceback" not in generate["stderr"], generate
    # a missing extra: one line naming it
    assert one_error_line(export) == "edge-rwkv: error: export needs onnx: pip install 'edge-rwkv[export]'"
    assert not out.exists()
    # checked before the measurements, not after minutes of them
    assert one_error_line(bench) == "edge-rwkv: error: bench --plot needs matplotlib: pip install 'edge-rwkv[bench]'"


def test_base_install_runs_the_daemon(tmp_path):
    import httpx

    from edge_rwkv.serve.testing import free_port

    port = free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", BASE_ONLY, "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["model"] == "default"
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "edge-rwkv" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_export_verify_without_onnxruntime(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "onnx-out"
    model = ROOT / "edge_rwkv" / "assets" / "default.safetensors"
    assert cli_main(["export", str(model), "-o", str(out), "--verify", "4"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["edge-rwkv: error: export --verify needs onnxruntime: pip install 'edge-rwkv[export]'"]
    assert not out.exists()  # said before anything is written


def test_a_missing_module_that_is_not_optional_is_a_bug():
    """Only the optional dependencies get the one-line hint; anything else keeps its traceback."""
    assert extras.missing_dependency("export", "onnx.helper").args[0] == \
        "export needs onnx: pip install 'edge-rwkv[export]'"
    assert extras.missing_dependency("serve", "fastapi") is None
    with pytest.raises(ModuleNotFoundError):
        extras.require("edge_rwkv_no_such_module", "test")


# --------------------------------------------------------------------------- pins where they belong

def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(reqs) -> dict[str, str]:
    return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower(): r for r in reqs}


def test_dependency_pins_sit_with_what_needs_them():
    project = pyproject()
    base, extra = names(project["dependencies"]), project["optional-dependencies"]
    assert {"fastapi", "uvicorn"} <= set(base)  # the daemon is part of the base install
    assert "<" not in base["numpy"]  # numpy's cap is numba-cuda's, not the runtime's
    cuda = names(extra["cuda"])
    assert "numba-cuda" in cuda and cuda["numpy"].replace(" ", "") == "numpy<2.5"
    assert names(extra["bench"])["rwkv"].replace(" ", "") == "rwkv==0.8.32"  # the peer bench measures
    assert "tensorrt" not in extra and not any("tensorrt" in r for reqs in extra.values() for r in reqs)
    assert "edge-rwkv[cuda,export,bench]" in extra["test"]


def test_every_install_hint_names_a_real_extra():
    project_extras = pyproject()["optional-dependencies"]
    for module, (name, how) in extras.OPTIONAL.items():
        m = re.fullmatch(r"pip install 'edge-rwkv\[(\w+)\]'", how)
        if module == "tensorrt":  # JetPack's, never pip's
            assert m is None and "JetPack" in how
            continue
        assert m and m.group(1) in project_extras, (module, how)
        dist = name.replace("the ", "").replace(" package", "")
        assert dist in names(project_extras[m.group(1)]), (module, dist, project_extras[m.group(1)])
