"""Where a prefill chunk's time goes: wall time vs GPU kernel time, top CPU and GPU ops (torch.profiler).

    python3 benchmarks/profile_prefill.py [--preset 1.5b] [--bits 16|8|4] [--chunks 4]

Random official-shape weights (quantized as `edge-rwkv bench` does for --bits 8 / 4), the chunk
runtime.runner.prefill_chunk_for picks. A wall time well above the summed kernel time means the chunk is
bound by the host (Python and launch overhead), not the GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from edge_rwkv.api import load
from edge_rwkv.bench.weights import bench_weights, quantized_model
from edge_rwkv.synthetic import PRESETS



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.5b")
    ap.add_argument("--bits", type=int, choices=(16, 8, 4), default=4)
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    L, D = PRESETS[a.preset]
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(bench_weights(L, D, 0, dev, torch.float16), f"{tmp}/m.pth")
        m = (load(f"{tmp}/m.pth", device="cuda", dtype="float16") if a.bits == 16
             else quantized_model(f"{tmp}/m.pth", a.bits, dev, torch.float16)[0])
    net = m.net
    chunk = m.runner.chunk
    toks = torch.randint(0, 65536, (chunk * a.chunks,)).tolist()
    with torch.inference_mode():
        m.runner.prefill(toks[:2 * chunk], m.new_state(1))  # warm-up: kernels compiled, allocator primed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.runner.prefill(toks, m.new_state(1))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / a.chunks
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            m.runner.prefill(toks, m.new_state(1))
            torch.cuda.synchronize()
    gpu = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n## {a.preset} {'fp16' if a.bits == 16 else f'int{a.bits}'}: chunk {chunk}, wall {wall * 1e3:.1f} ms/chunk "
          f"({chunk / wall:.0f} tok/s), GPU kernels {gpu / a.chunks / 1e3:.1f} ms/chunk")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    try:
        print(ka.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))
    except Exception:  # noqa: BLE001  (older torch: the CUDA name)
        print(ka.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
