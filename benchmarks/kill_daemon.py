"""kill -9 durability of `edge-rwkv serve`: SIGKILL the daemon N times mid-traffic, check every session after each restart.

    python benchmarks/kill_daemon.py --kills 100                # the embedded default model, on CPU
    python benchmarks/kill_daemon.py --kills 20 --model m.safetensors --json out.json

Each round starts the daemon on the same data folder, checks every session (turns acknowledged
never lost, state loads and equals an uninterrupted chat's, transcript complete, no half fork, no
temp file left), lets four clients chat and one fork and delete, and kills it 0-1 s after the round's first
acknowledged turn (saves in flight).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from edge_rwkv.default_model import resolve_model
from edge_rwkv.serve.testing import kill9_durability


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--model", default=None, help="model file (default: the embedded model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as data:
        f = kill9_durability(resolve_model(a.model), data, kills=a.kills, seed=a.seed, sessions=a.sessions)
    f["seconds"] = round(time.monotonic() - t0)
    print(f"kills {f['kills']}  turns acknowledged {f['turns_acknowledged']}  session checks {f['session_checks']}  "
          f"forks {f['forks_made']}  defects {len(f['defects'])}  ({f['seconds']} s)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(f, fh, indent=1)
    return 1 if f["defects"] else 0


if __name__ == "__main__":
    sys.exit(main())
