"""The peer, the official `rwkv` package (strategy "cuda fp16" / "cpu fp32"), on the weights ours reads.

It reads its configuration from RWKV_* environment variables when imported, so it runs in a process of its
own: `python -m edge_rwkv.bench.peer CONFIG.json` (run_peer writes the file and starts it). The worker
writes its figures to the JSON file the config names after each measurement, so a run cut short keeps
what it measured. On CUDA run_peer first tries its nvcc-built op (RWKV_CUDA_ON=1) and, if that build
fails, runs again without it — the result says which.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from ..extras import install_hint
from .memory import PeakMemory
from .options import E2E_PROMPT, BenchOptions
from .timing import Timer, sync
from .weights import random_tokens


def peer_worker(cfg_path: str) -> int:
    """Runs in its own process: the rwkv package reads RWKV_* variables at import."""
    cfg = json.loads(Path(cfg_path).read_text())
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "1" if cfg["cuda_op"] else "0"
    dev = torch.device(cfg["device"])
    import rwkv
    from rwkv.model import RWKV

    res: dict = {"version": getattr(rwkv, "__version__", None), "strategy": cfg["strategy"],
                 "cuda_op": os.environ.get("RWKV_CUDA_ON") == "1"}
    try:
        res["version"] = version("rwkv")
    except Exception:  # noqa: BLE001
        pass
    out_path = Path(cfg["out"])

    def dump():
        out_path.write_text(json.dumps(res))

    t0 = time.perf_counter()
    m = RWKV(model=cfg["base"], strategy=cfg["strategy"])
    res["load_s"] = time.perf_counter() - t0
    timer = Timer(dev)
    with torch.no_grad():
        # decode, batch 1
        _, state = m.forward(random_tokens(8, cfg["seed"]), None)
        tok = random_tokens(1, cfg["seed"] + 1)
        box = [state]

        def step():
            _, box[0] = m.forward(tok, box[0])

        res["decode_s"] = timer.each(step, reps=cfg["steps"], warmup=cfg["warmup"])
        dump()
        if cfg["e2e_tokens"] >= 2:
            res["e2e_top_p_tok_s"] = _peer_generate_rate(m, dev, cfg["e2e_tokens"])
        dump()
        # chunked prefill at each length
        res["prefill"] = {}
        last_rate = None
        for n in cfg["lengths"]:
            if last_rate and n / last_rate > cfg["item_limit_s"]:
                res["prefill"][str(n)] = {"skipped": f"skipped (est. {n / last_rate:.0f} s)"}
                continue
            toks = random_tokens(n, cfg["seed"] + n)
            times, peak, base = [], None, None
            for r in range(cfg["reps"].get(str(n), 1)):
                with PeakMemory(dev) as pm:
                    sync(dev)
                    t0 = time.perf_counter()
                    st = None
                    for s in range(0, n, cfg["chunk"]):
                        _, st = m.forward(toks[s:s + cfg["chunk"]], st)
                    sync(dev)
                    times.append(time.perf_counter() - t0)
                if r == 0:
                    peak, base = pm.peak, pm.base
            t = statistics.median(times)
            last_rate = n / t
            res["prefill"][str(n)] = {"s": t, "peak_bytes": peak, "resident_bytes": base}
            dump()
        if cfg.get("quality_tokens"):
            logits, _ = m.forward(cfg["quality_tokens"], None, full_output=True)
            torch.save(logits.float().cpu(), cfg["out"] + ".logits.pt")
            res["quality_logits"] = cfg["out"] + ".logits.pt"
    dump()
    return 0


def _peer_generate_rate(m, dev, n: int) -> float | None:
    """The peer's end-to-end rate: its `PIPELINE.generate` (what its users run), top_p 0.8, n tokens
    after an E2E_PROMPT-token prompt, the prompt's time subtracted as for ours."""
    try:
        from rwkv.utils import PIPELINE, PIPELINE_ARGS
    except ImportError:
        return None
    pipe = PIPELINE(m, "rwkv_vocab_v20230424")
    ctx = pipe.decode(random_tokens(E2E_PROMPT, 3))

    def run(k: int) -> float:
        args = PIPELINE_ARGS(temperature=1.0, top_p=0.8, token_ban=[0], token_stop=[])
        sync(dev)
        t0 = time.perf_counter()
        pipe.generate(ctx, token_count=k, args=args)
        sync(dev)
        return time.perf_counter() - t0

    run(8)
    full = statistics.median(run(n) for _ in range(2))
    first = statistics.median(run(1) for _ in range(2))
    return (n - 1) / (full - first)


def run_peer(path: str, dev: torch.device, o: BenchOptions, lengths: list[int], reps: dict, workdir: Path,
             quality_tokens: list[int] | None, log) -> dict:
    """Run the rwkv package in a subprocess; on CUDA try its nvcc-built op, then without it."""
    try:
        if importlib.util.find_spec("rwkv") is None:
            return {"error": f"rwkv package not installed ({install_hint('rwkv')})"}
    except (ImportError, ValueError):
        return {"error": "rwkv package not importable"}
    base = str(Path(path).with_suffix(""))
    strategy = "cuda fp16" if dev.type == "cuda" else "cpu fp32"
    attempts = [True, False] if dev.type == "cuda" else [False]
    notes = []
    for cuda_op in attempts:
        out = workdir / f"peer_{int(cuda_op)}.json"
        cfg = dict(base=base, strategy=strategy, device=str(dev), cuda_op=cuda_op, seed=o.seed, steps=o.decode_steps,
                   e2e_tokens=o.e2e_tokens,
                   warmup=o.peer_warmup, lengths=lengths, reps={str(k): v for k, v in reps.items()}, chunk=o.chunk,
                   item_limit_s=o.item_limit_s, out=str(out), quality_tokens=quality_tokens)
        cfg_path = workdir / f"peer_{int(cuda_op)}.cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        tag = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in (Path(o.model).stem if o.model else o.preset))
        log_path = Path(o.log_dir or workdir) / f"peer_{tag}_{'cudaop' if cuda_op else 'torch'}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"peer: rwkv package, strategy {strategy!r}, RWKV_CUDA_ON={int(cuda_op)} (log {log_path})")
        with open(log_path, "w") as lf:
            proc = subprocess.run([sys.executable, "-m", "edge_rwkv.bench.peer", str(cfg_path)],
                                  stdout=lf, stderr=subprocess.STDOUT, env=dict(os.environ))
        res = json.loads(out.read_text()) if out.exists() else {}
        if proc.returncode == 0:
            if cuda_op and not res.get("cuda_op"):
                notes.append("its CUDA kernels failed to build; ran without them (RWKV_CUDA_ON=0)")
            res["note"] = "; ".join(notes)
            return res
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        if cuda_op and "decode_s" not in res:
            notes.append(f"RWKV_CUDA_ON=1 failed ({tail[0][:120]}); ran with RWKV_CUDA_ON=0")
            continue
        res["error"] = f"peer exited {proc.returncode}: {tail[0][:160]}"
        res["note"] = "; ".join(notes)
        return res
    return {"error": "; ".join(notes) or "peer failed"}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m edge_rwkv.bench.peer CONFIG.json (written by run_peer)")
    sys.exit(peer_worker(sys.argv[1]))
