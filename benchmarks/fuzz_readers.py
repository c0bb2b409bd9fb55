"""Mutation fuzzing of every file reader (state, int8 state, artifact, safetensors, .pth): one table.

    python benchmarks/fuzz_readers.py --count 15000            # mutations per reader
    python benchmarks/fuzz_readers.py --readers state pth --count 2000 --seed 3 --json out.json

A defect is any outcome but a one-line refusal naming the file or a faithful read (see edge_rwkv/fuzz.py);
the process runs under an address-space limit, so a reader that tries to allocate without bound shows
up as a MemoryError defect instead of taking the machine down.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings

from edge_rwkv import fuzz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000, help="mutations per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readers", nargs="+", default=list(fuzz.READERS), choices=fuzz.READERS)
    ap.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit of this process")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    limit = int(a.memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")  # torch warns about the pickle protocol of mutated files
    t0 = time.monotonic()
    reports = fuzz.run(a.readers, a.count, a.seed)
    print(fuzz.format_reports(reports))
    print(f"{time.monotonic() - t0:.0f} s, seed {a.seed}, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seed": a.seed, "count": a.count, "reports": [r.as_dict() for r in reports]}, f, indent=1)
    return 1 if any(r.defects for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
