"""Where one fused decode step spends its GPU time: per-kernel durations from torch.profiler (CUPTI).

    python3 benchmarks/profile_decode.py [--presets 0.1b,1.5b] [--batch 1] [--bits 16|8|4]

Runs the fused step (edge_rwkv.runtime.fused.FusedStep) eagerly a few times under the profiler on random
official-shape fp16 weights (quantized as `edge-rwkv bench` does for --bits 8 / 4) and prints, per
preset, the kernels by total GPU time per step, then the
graph-replayed step time (CUDA events, median of 50) for comparison with the sum of kernel times.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from edge_rwkv.api import load
from edge_rwkv.bench.timing import Timer
from edge_rwkv.bench.weights import bench_weights, quantized_model
from edge_rwkv.runtime.fused import FusedStep
from edge_rwkv.synthetic import PRESETS


def profile(preset: str, batch: int, bits: int = 16, steps: int = 5) -> None:
    L, D = PRESETS[preset]
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(bench_weights(L, D, 0, dev, torch.float16), f"{tmp}/m.pth")
        if bits == 16:
            m = load(f"{tmp}/m.pth", device="cuda", dtype="float16")
        else:
            m, _ = quantized_model(f"{tmp}/m.pth", bits, dev, torch.float16)
    net = m.net
    st = m.new_state(batch)
    live = torch.ones(batch, dtype=torch.int32, device=dev)
    tok = torch.randint(0, 65536, (batch, 1), device=dev)
    with torch.inference_mode():
        f = FusedStep(net, batch, m.runner.packed())
        for _ in range(3):
            f(tok, st, live)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                f(tok, st, live)
            torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name[:60]
            t, n = rows.get(name, (0.0, 0))
            rows[name] = (t + e.device_time, n + 1)
    total = sum(t for t, _ in rows.values()) / steps
    print(f"\n## {preset} B={batch} {'fp16' if bits == 16 else f'int{bits}'}: kernels per step {sum(n for _, n in rows.values()) / steps:.0f}, "
          f"summed kernel time {total:.1f} µs/step")
    print("| kernel | µs/step | launches/step | µs/launch |\n|---|---|---|---|")
    for name, (t, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"| {name} | {t / steps:.1f} | {n / steps:.0f} | {t / n:.2f} |")
    g = m.runner.decode_graph(batch, m.new_state(batch), tok, live)
    step_s = Timer(dev).each(g.step, reps=50, warmup=10)
    print(f"graph-replayed step: {step_s * 1e6:.1f} µs (median of 50)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="0.1b,1.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bits", type=int, choices=(16, 8, 4), default=16)
    a = ap.parse_args()
    for p in a.presets.split(","):
        profile(p, a.batch, a.bits)


if __name__ == "__main__":
    main()
