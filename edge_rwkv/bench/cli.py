"""`edge-rwkv bench`: its arguments, and the command's registration (cli.EXTRA_COMMANDS names this module)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..extras import require
from ..synthetic import PRESETS
from .options import FLOAT_PRECISIONS, QUANT_BITS, BenchOptions
from .run import run_bench
from .table import format_table, write_outputs


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _prec_list(s: str) -> list[str]:
    out = list(dict.fromkeys(x.strip().lower() for x in s.split(",") if x.strip()))  # in order, each once
    bad = [x for x in out if x not in FLOAT_PRECISIONS and x not in QUANT_BITS]
    if not out or bad:
        what = f"unknown precision {bad[0]!r}; " if bad else ""
        raise argparse.ArgumentTypeError(f"{what}precisions must be among fp32,fp16,bf16,int8,int4; got {s!r}")
    return out


def add_bench_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", nargs="?", default=None, help="model file (default: random weights of --preset)")
    s.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random-weight shape (default: tiny)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--precisions", type=_prec_list, default=None,
                   help="decode B=1 rows; default fp16,int8,int4 (fp32,int8,int4 on cpu). The first float one is the "
                        "base precision (the peer's comparison, the default of the next two)")
    s.add_argument("--batch-precisions", type=_prec_list, default=None,
                   help="batched decode rows for these precisions (default: the base precision)")
    s.add_argument("--memory-precisions", type=_prec_list, default=None,
                   help="prefill + peak memory rows at --memory-ctx for these precisions (default: the base precision)")
    s.add_argument("--batch", type=_int_list, default=[1, 8, 64, 256])
    s.add_argument("--prefill", type=_int_list, default=[1024, 8192, 32768])
    s.add_argument("--memory-ctx", type=_int_list, default=[8192, 32768, 131072])
    s.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="also run the rwkv pip package")
    s.add_argument("--chunk", type=int, default=None, help="prefill chunk, both runtimes (default: ours for the model, runtime.runner.prefill_chunk_for)")
    s.add_argument("--steps", type=int, default=None, help="timed decode steps (default 100 on cuda, 30 on cpu)")
    s.add_argument("--item-limit", type=float, default=60.0, help="skip a prefill length estimated to take longer (s)")
    s.add_argument("--e2e-tokens", type=int, default=256,
                   help="Model.stream rows (greedy, top_p 0.8): tokens after a 120-token prompt (0: none; default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, metavar="OUT.json")
    s.add_argument("--plot", default=None, metavar="OUT.png")
    s.add_argument("--log-dir", default=None, help="where the peer's logs go (default: a temp dir)")
    s.add_argument("--quality", action="store_true", help="also compare logits (quantized vs float, ours vs peer)")


def options_from_args(a) -> BenchOptions:
    """BenchOptions from parsed arguments; InputError for a bad one. Defaults differ on a CPU (fp32, fewer steps)."""
    cpu = str(a.device).startswith("cpu")
    if a.model and not Path(a.model).is_file():
        raise InputError(f"{a.model}: no such model file")
    chunk = a.chunk  # None: runtime.runner.prefill_chunk_for(model), decided once the model is loaded
    if chunk is not None and chunk < 1:
        raise InputError("--chunk must be positive")
    if a.e2e_tokens < 0:
        raise InputError("--e2e-tokens must be ≥ 0")
    return BenchOptions(
        model=a.model, preset=a.preset, device=a.device,
        precisions=a.precisions or (["fp32", "int8", "int4"] if cpu else ["fp16", "int8", "int4"]),
        batch_precisions=a.batch_precisions, memory_precisions=a.memory_precisions, batch=a.batch, prefill=a.prefill,
        memory_ctx=a.memory_ctx, peer=a.peer, chunk=chunk, quality=a.quality,
        decode_steps=a.steps or (30 if cpu else 100), warmup=5 if cpu else 20, peer_warmup=10 if cpu else 60,
        item_limit_s=a.item_limit, seed=a.seed, log_dir=a.log_dir, e2e_tokens=a.e2e_tokens)


def cmd_bench(a) -> int:
    """Measure, print the table, write JSON / plot where asked."""
    if a.plot:  # before the measurements, not after them
        require("matplotlib", "bench --plot")
    o = options_from_args(a)
    t0 = time.perf_counter()
    log = lambda s: print(f"[bench {time.perf_counter() - t0:6.1f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    res = run_bench(o, log=log)
    print(format_table(res), flush=True)
    write_outputs([res], a.json, a.plot, log=log)
    return 0


def register(sub) -> None:
    s = sub.add_parser("bench", help="speed and memory table: ours vs the rwkv package, same weights",
                       description="Decode / batched decode / prefill throughput, peak memory vs context length and "
                                   "achieved bandwidth, for our runtime and the official rwkv package on the same weights.")
    add_bench_args(s)
    s.set_defaults(func=cmd_bench)
