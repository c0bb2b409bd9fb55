"""State-tuning throughput and memory: tokens/s per process and peak GPU memory against the weights.

Random weights in the official shapes (the bench's bench_weights): 0.1b and 1.5b with fp16
frozen weights, 7.2b from an int4 artifact (tuned, as `edge-rwkv tune` does, on its dequantized bf16
copy). Each step is what `edge-rwkv tune` runs: --micro-batch sequences of --ctx tokens per rank,
every token a target, forward + backward to the initial state with layer-by-layer recomputation,
all-reduce, Adam. Peak = torch.cuda.max_memory_allocated over the timed steps (weights included),
against the bytes the frozen weights occupy.

    python3 benchmarks/bench_tune.py --presets 0.1b,1.5b,7.2b --json tune.json
    torchrun --nproc-per-node 2 benchmarks/bench_tune.py --presets 1.5b     # per-GPU and aggregate rows
    python3 benchmarks/bench_tune.py --device cpu --presets tiny --ctx 64 --steps 2   # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from edge_rwkv.checkpoint import Checkpoint, derive_config, load_checkpoint
from edge_rwkv.cli import main as cli_main
from edge_rwkv.devices import preset_config
from edge_rwkv.tune import Ranks, Sample, TuneOptions, build_tuning_net, dense_tensors, train_step

from edge_rwkv.bench.weights import bench_weights  # drawn on the GPU: seconds for any size

TARGET = {"1.5b": (20_000, 1.30)}  # tok/s per GPU at least, peak / weights at most (H200, ctx 1024)


def base_checkpoint(preset: str, device: torch.device, int4: bool, workdir: Path) -> tuple[Checkpoint, str]:
    """Random weights of the preset's shape: fp16 in memory, or (int4) written and quantized by
    `edge-rwkv quantize --bits 4` (layers and head int4 g128, embedding int8, round to nearest) and read
    back as `edge-rwkv tune` reads an artifact."""
    cfg = preset_config(preset)
    sd = bench_weights(cfg.n_layer, cfg.n_embd, seed=0, device=device, dtype=torch.float16)
    if not int4:
        return Checkpoint(f"<random {preset}>", sd, derive_config(sd), {"dtype": "float16"}), "fp16"
    src, dst = workdir / f"{preset}.safetensors", workdir / f"{preset}-int4.safetensors"
    save_file(sd, str(src))
    del sd
    if cli_main(["quantize", str(src), "-o", str(dst), "--bits", "4", "--quantize-head", "--quantize-embedding",
                 "--device", str(device)]) != 0:
        raise SystemExit(f"{preset}: edge-rwkv quantize failed")
    src.unlink()
    return load_checkpoint(dst), "int4 → bf16 copy"


def tuning_net(preset: str, device: torch.device, int4: bool, workdir: Path):
    """(net, tunable, base description, weights dtype, bytes the frozen weights occupy)."""
    ckpt, base = base_checkpoint(preset, device, int4, workdir)
    dtype = torch.float32 if device.type == "cpu" else torch.float16 if base == "fp16" else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    net, tunable = build_tuning_net(ckpt.config, dense_tensors(ckpt, device, dtype), dtype, device, "state")
    del ckpt
    weights = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else sum(
        t.numel() * t.element_size() for t in _tensors(net))
    return net, tunable, base, dtype, weights


def measure(preset: str, built, micro_batch: int, a, ranks: Ranks, device: torch.device) -> dict:
    """One row: `a.steps` timed steps (after `a.warmup`) of `micro_batch` sequences of a.ctx tokens per rank."""
    net, tunable, base, dtype, weights = built
    g = torch.Generator().manual_seed(ranks.rank)
    batch = [Sample(torch.randint(0, net.head.out_features, (a.ctx + 1,), generator=g),
                    torch.ones(a.ctx, dtype=torch.bool)) for _ in range(micro_batch * ranks.world)]
    opts = TuneOptions(steps=a.steps, ctx=a.ctx, batch=len(batch), micro_batch=micro_batch, log=False)
    opt = torch.optim.Adam(tunable.params(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        train_step(net, tunable, batch, opts, ranks, device)
        opt.step()

    for _ in range(a.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    if a.profile and ranks.is_main:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            step()
            sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(f"{preset} micro-batch {micro_batch}: one step, by {key}\n"
              + prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
    tok_s = a.steps * micro_batch * a.ctx / dt
    agg = torch.tensor([tok_s, float(peak), dt], dtype=torch.float64, device=device)
    if ranks.world > 1:
        mx = agg.clone()
        dist.all_reduce(agg)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        peak, dt = int(mx[1]), float(mx[2])
    row = {"preset": preset, "base": base, "weights_dtype": str(dtype).replace("torch.", ""), "ctx": a.ctx,
           "micro_batch": micro_batch, "ranks": ranks.world, "steps": a.steps, "seconds": dt,
           "tok_s_per_rank": float(agg[0]) / ranks.world, "tok_s_total": float(agg[0]),
           "weights_bytes": weights, "peak_bytes": peak, "peak_over_weights": peak / weights if peak else None}
    if preset in TARGET and device.type == "cuda":
        want_tok, want_mem = TARGET[preset]
        row["target"] = {"tok_s_per_gpu": want_tok, "peak_over_weights": want_mem,
                         "met": row["tok_s_per_rank"] >= want_tok and row["peak_over_weights"] <= want_mem}
    return row


def _tensors(net):
    for v in vars(net).values():
        if isinstance(v, torch.Tensor):
            yield v
    for layer in net.layers:
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor):
                yield v
            elif hasattr(v, "weight"):
                yield v.weight
    yield net.head.weight


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    head = ("| preset | base | ranks | ctx×micro-batch | tok/s per GPU | tok/s total | weights GB | peak GB | "
            "peak/weights | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.get("target")
        tgt = "" if not t else (f"≥{t['tok_s_per_gpu']:,} tok/s, ≤{t['peak_over_weights']:.2f}×: "
                                + ("met" if t["met"] else "missed"))
        ratio = f"{r['peak_over_weights']:.2f}×" if r["peak_over_weights"] else "n/a"
        lines.append(f"| {r['preset']} | {r['base']} ({r['weights_dtype']}) | {r['ranks']} | {r['ctx']}×{r['micro_batch']} "
                     f"| {r['tok_s_per_rank']:,.0f} | {r['tok_s_total']:,.0f} | {r['weights_bytes'] / 1e9:.2f} "
                     f"| {r['peak_bytes'] / 1e9:.2f} | {ratio} | {tgt} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="0.1b,1.5b,7.2b")
    ap.add_argument("--int4", default="7.2b", help="presets tuned from an int4 artifact (default 7.2b); the rest fp16")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--micro-batch", default="1", help="sequences per rank per step; a list (1,2,4) gives a row each")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    ap.add_argument("--profile", action="store_true", help="also print the top kernels of one step per row (rank 0)")
    ap.add_argument("--plot", help="write a bar chart of tok/s per GPU here (PNG, rank 0)")
    a = ap.parse_args()
    ranks = Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    device = torch.device(a.device)
    if ranks.world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=600))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for preset in a.presets.split(","):
        with tempfile.TemporaryDirectory(prefix="bench_tune_") as workdir:  # the int4 artifact, while it loads
            built = tuning_net(preset, device, preset in a.int4.split(","), Path(workdir))
        for mb in (int(x) for x in a.micro_batch.split(",")):
            try:
                rows.append(measure(preset, built, mb, a, ranks, device))
            except torch.OutOfMemoryError as e:  # a rank out of memory ends a multi-rank run (no collective)
                if ranks.is_main:
                    print(f"{preset} micro-batch {mb}: out of memory ({str(e).splitlines()[0][:120]})", flush=True)
                torch.cuda.empty_cache()
                continue
            if ranks.is_main:
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if ranks.is_main:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\nstate tuning, {dev}, {ranks.world} rank(s), torch {torch.__version__}\n" + table(rows), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"device": dev, "ranks": ranks.world, "rows": rows}, f, indent=1)
        if a.plot and rows:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar([f"{r['preset']} ×{r['micro_batch']}" for r in rows], [r["tok_s_per_rank"] for r in rows])
            ax.set_ylabel("tok/s per GPU")
            ax.set_title(f"state tuning, ctx {a.ctx}, {dev}")
            fig.tight_layout()
            fig.savefig(a.plot)
    if ranks.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
