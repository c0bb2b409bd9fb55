"""Resolve the package set jetson/install.sh installs, for each JetPack's Python on aarch64, without a Jetson.

    python jetson/check_packages.py [--jetpack 6 7] [--timeout 240] [--dir jetson/]

For each JetPack: `pip install --dry-run --only-binary=:all:` for the Jetson's platform (aarch64, its
glibc's manylinux tags, its CPython) of requirements-jpN.txt plus the project's own dependencies with
the `serve` extra (torch left out: it comes from the Jetson index), against PyPI; then torch-jpN.txt
against the Jetson AI Lab index where that index can be reached (skipped, and said so, where it cannot).
A pin that has no wheel for the Jetson fails here instead of on the device. pip's own configuration is
ignored (as install.sh ignores it), so a local mirror or extra index cannot hide a missing wheel.
Exit status: 0 all resolved, 1 a resolution failed, 2 PyPI unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class Target:
    jetpack: str
    python: str  # CPython version of the JetPack's Ubuntu
    glibc: int  # glibc minor (2.x) of that Ubuntu: the highest manylinux tag its pip accepts

    def platform_args(self) -> list[str]:
        tags = [f"manylinux_2_{m}_aarch64" for m in range(self.glibc, 16, -1)] + ["linux_aarch64"]
        abi = "cp" + self.python.replace(".", "")
        return [a for t in tags for a in ("--platform", t)] + [
            "--implementation", "cp", "--python-version", self.python, "--abi", abi, "--only-binary=:all:"]


TARGETS = {
    "6": Target("6", "3.10", 35),  # JetPack 6.1 / 6.2: Ubuntu 22.04
    "7": Target("7", "3.12", 39),  # JetPack 7: Ubuntu 24.04
}


def reachable(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status < 400
    except OSError:
        return False


def pip(args: list[str], timeout: float, report: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    with tempfile.TemporaryDirectory() as target:
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", target, *args]
        if report is not None:
            cmd += ["--report", str(report)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def project_requirements(t: Target, timeout: float) -> list[str]:
    """The project's dependencies with the serve extra, torch excluded, from its own metadata."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = pip(["--no-deps", "--index-url", PYPI, *t.platform_args(), f"{HERE.parent}[serve]"], timeout, report)
        if r.returncode:
            raise RuntimeError(f"reading the project's metadata failed:\n{r.stderr.strip()}")
        meta = json.loads(report.read_text())["install"][0]["metadata"]
    reqs = []
    for req in meta.get("requires_dist", []):
        spec, _, marker = req.partition(";")
        if marker and "extra" in marker and '"serve"' not in marker:
            continue  # another extra
        if re.match(r"\s*torch\b", spec):
            continue
        reqs.append(spec.strip())
    return reqs


def resolve(t: Target, reqs: list[str], folder: Path, timeout: float) -> list[str]:
    """Lines to print; raises RuntimeError on a failed resolution."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        r = pip(["--index-url", PYPI, *t.platform_args(), "-r", str(folder / f"requirements-jp{t.jetpack}.txt"), *reqs],
                timeout, report)
        if r.returncode:
            raise RuntimeError(f"JetPack {t.jetpack} (cp{t.python}, aarch64): PyPI set does not resolve:\n"
                               f"{r.stderr.strip()}")
        got = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"])
    lines = [f"JetPack {t.jetpack} (Python {t.python}, aarch64): PyPI set resolves: {' '.join(got)}"]
    torch_file = folder / f"torch-jp{t.jetpack}.txt"
    index = next(ln.split()[1] for ln in torch_file.read_text().splitlines() if ln.startswith("--index-url"))
    if not reachable(index.rstrip("/") + "/", timeout=5):
        lines.append(f"JetPack {t.jetpack}: torch not checked: {index} cannot be reached from here")
        return lines
    r = pip(["--no-deps", *t.platform_args(), "-r", str(torch_file)], timeout)
    if r.returncode:
        raise RuntimeError(f"JetPack {t.jetpack}: {torch_file.name} does not resolve on {index}:\n{r.stderr.strip()}")
    lines.append(f"JetPack {t.jetpack}: {torch_file.name} resolves on {index}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jetpack", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    ap.add_argument("--timeout", type=float, default=240, help="seconds per pip run")
    ap.add_argument("--dir", type=Path, default=HERE, help="folder of requirements-jpN.txt / torch-jpN.txt")
    a = ap.parse_args(argv)
    if not reachable(PYPI + "/pip/", timeout=5):
        print(f"check_packages: {PYPI} cannot be reached: nothing resolved", file=sys.stderr)
        return 2
    failed = False
    try:  # the project's requirements are the same for every platform: read them once
        reqs = project_requirements(TARGETS[a.jetpack[0]], a.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"check_packages: {e}", file=sys.stderr)
        return 1
    for jp in a.jetpack:
        try:
            print("\n".join(resolve(TARGETS[jp], reqs, a.dir, a.timeout)), flush=True)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"check_packages: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
