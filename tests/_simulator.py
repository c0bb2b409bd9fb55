"""Running checks under the Numba CUDA simulator from a pytest test (CPU CI).

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so a test module's checks run once in
a child process started with it set: the module run as a script calls `report(checks())`, which
prints one line of results; the test side reads them back with `simulator_results(__file__)`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MARK = "SIMRESULTS "


def simulator_results(test_file: str, timeout: int = 900) -> dict:
    """{check name: [ok, detail]} from running `test_file` as a script under the simulator."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve())], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"simulator run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def report(results: dict) -> None:
    """Print the results (readable lines, then the one line `simulator_results` parses)."""
    for name, (ok, detail) in results.items():
        print(("PASS " if ok else "FAIL ") + name + ": " + detail)
    print(MARK + json.dumps(results))
