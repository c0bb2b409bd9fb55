"""The engine benchmark for a GPU run: `edge-rwkv bench` over several presets, one table each.

    python3 benchmarks/bench_engine.py [--presets 0.1b,1.5b,7.2b] [--device cuda] [--deadline 330]
                                       [--big-fp16-only] [any `edge-rwkv bench` option]

Runs our runtime and the rwkv pip package on the same random official-layout weights per preset
(see edge_rwkv/bench/). Prints each preset's table as soon as it is done (so a run cut short keeps
what it measured), then all tables again; writes bench_engine.json, bench_engine.png and the peer's
logs under $OUT (or --out). A preset is skipped when less than its estimated time is left.

7.2b also measures batched decode and prefill / peak memory of the int4 model (BIG_QUANT, unless
--batch-precisions / --memory-precisions are given): what the engine issue asks of a 4.5 GB device.
--big-fp16-only keeps 7.2b to the base precision.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from edge_rwkv.bench.cli import add_bench_args, options_from_args
from edge_rwkv.bench.options import base_precision
from edge_rwkv.bench.run import run_bench
from edge_rwkv.bench.table import format_table, write_outputs

# rough seconds one preset takes on an H200 (weights, both runtimes, the peer's nvcc build once)
ESTIMATE_S = {"tiny": 30, "0.1b": 90, "1.5b": 120, "7.2b": 240}
BIG_QUANT = "int4"  # 7.2b: batched decode and peak memory rows of the base precision and this, unless given
# 7.2b without --big-fp16-only: per quantized precision (int8, int4) ~60 s to read the 14 GB checkpoint,
# quantize it on the GPU, write and load the artifact; int4 ~120 s more of batched decode and prefill up
# to 128K tokens (its prefill dequantizes every matrix per chunk)
BIG_QUANT_EXTRA_S = 240


def estimate_s(preset: str, big_fp16_only: bool) -> float:
    extra = BIG_QUANT_EXTRA_S if preset == "7.2b" and not big_fp16_only else 0
    return ESTIMATE_S.get(preset, 120) + extra


def preset_options(a, preset: str):
    """BenchOptions for one preset: 7.2b adds the int4 rows, or keeps to the base precision (--big-fp16-only)."""
    a.preset = preset
    o = options_from_args(a)
    if preset != "7.2b":
        return o
    base = base_precision(o.precisions, "cuda" if str(o.device).startswith("cuda") else "cpu")
    if a.big_fp16_only:
        o.precisions, o.batch_precisions, o.memory_precisions = [base], None, None
        return o
    o.batch_precisions = o.batch_precisions or [base, BIG_QUANT]
    o.memory_precisions = o.memory_precisions or [base, BIG_QUANT]
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(ap)
    ap.add_argument("--presets", default="0.1b,1.5b,7.2b")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--big-fp16-only", action="store_true", help="7.2b: base precision only, no quantized rows")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for JSON / PNG / logs (default $OUT)")
    argv = sys.argv[1:] if argv is None else argv
    if "--device" not in argv:
        argv = [*argv, "--device", "cuda"]
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        a.log_dir = a.log_dir or str(out / "logs")
    log = lambda s: print(f"[bench_engine {time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    results, tables = [], []
    for preset in [p.strip() for p in a.presets.split(",") if p.strip()]:
        left = (a.deadline - (time.perf_counter() - t0)) if a.deadline else None
        need = estimate_s(preset, a.big_fp16_only)
        if left is not None and left < need:
            log(f"{preset}: skipped, {left:.0f} s left (needs ~{need:.0f} s)")
            tables.append(f"## {preset}: skipped (time budget)")
            continue
        o = preset_options(a, preset)
        log(f"=== {preset} ===")
        try:
            res = run_bench(o, log=log)
        except Exception as e:  # noqa: BLE001  (keep the other presets' results)
            import traceback

            traceback.print_exc()
            tables.append(f"## {preset}: failed: {type(e).__name__}: {e}")
            continue
        results.append(res)
        table = format_table(res)
        tables.append(f"## {preset}\n{table}")
        print(f"\n## {preset}\n{table}\n", flush=True)
        if out:  # after each preset, so a run cut short keeps what it measured
            write_outputs(results, str(out / "bench_engine.json"), None, log=log)
    if out and results:
        try:
            write_outputs(results, None, str(out / "bench_engine.png"), log=log)
        except Exception as e:  # noqa: BLE001
            log(f"plot failed: {e!r}")
    print("\n\n".join(tables))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
