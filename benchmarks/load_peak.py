"""Peak memory of `edge_rwkv.load` against the weights it loads, measured on this machine's CPU.

    python benchmarks/load_peak.py [--layers 4] [--embd 1024] [--vocab 65536] [--dtype float16]

Writes a random model of that shape, then loads it in a fresh process and prints one table: bytes of
weights, the process's peak resident memory during the load above its baseline (VmHWM − RSS after the
imports and the tokenizer), what stays as anonymous memory and as file pages mapped from the model, and
the tokenizer's own resident memory. The load keeps the file's
dtype, so no conversion copy is expected: `edge-rwkv plan` models the load peak on the device as the
weights plus one embedding-sized table (the ln0-folded table is built while the stored one still exists)
plus small chunk transients; this measures the same thing on the CPU, where the "device" is host memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import torch
import edge_rwkv
from edge_rwkv.api import load

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

from edge_rwkv.tokenizer import default_tokenizer
torch.zeros(1)  # allocator and thread pools up before the baseline
start = status()
default_tokenizer()  # cached: load() reuses it, so the baseline below excludes it
base = status()
m = load(sys.argv[1], dtype=sys.argv[2])
after = status()
print(json.dumps({"start": start, "base": base, "after": after}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args(argv)

    import torch

    from edge_rwkv.api import parse_dtype
    from edge_rwkv.artifact import make_metadata, write_artifact
    from edge_rwkv.checkpoint import derive_config
    from edge_rwkv.synthetic import random_checkpoint

    dt = parse_dtype(a.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        sd = random_checkpoint(a.layers, a.embd, 64, a.vocab, seed=0, dtype=dt)
        weights = sum(t.numel() * t.element_size() for t in sd.values())
        emb = sd["emb.weight"].numel() * sd["emb.weight"].element_size()
        write_artifact(path, sd, make_metadata(derive_config(sd), str(dt).replace("torch.", "")))
        del sd
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), a.dtype], capture_output=True, text=True,
                             check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    start, base, after = r["start"], r["base"], r["after"]
    peak = after["VmHWM"] - base["VmRSS"]
    tokenizer = base["RssAnon"] - start["RssAnon"]
    gib = 1 << 30
    print(f"model: {a.layers} layers × {a.embd}, vocab {a.vocab}, {a.dtype}; torch {torch.__version__}")
    print(f"{'weights':>10s} {'embedding':>10s} {'load peak':>10s} {'peak/weights':>13s} "
          f"{'anon after':>11s} {'file after':>11s}")
    print(f"{weights / gib:>9.3f}G {emb / gib:>9.3f}G {peak / gib:>9.3f}G {peak / weights:>13.2f} "
          f"{(after['RssAnon'] - base['RssAnon']) / gib:>10.3f}G {(after['RssFile'] - base['RssFile']) / gib:>10.3f}G")
    print(f"(GiB; load peak = VmHWM during the load − RSS before it; the tokenizer, loaded before, holds "
          f"{tokenizer / gib:.3f} GiB of its own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
