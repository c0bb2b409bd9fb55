"""Timers for benchmarks, each the median of many runs: CUDA events on a GPU, `time.perf_counter` on a CPU;
calls captured in one CUDA graph (launch gaps removed); and the device copy bandwidth, the bound a
memory-bound step is measured against."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a CPU has none)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Median seconds of `fn()` calls: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def each(self, fn, reps: int, warmup: int = 0, inner: int = 1) -> float:
        for _ in range(warmup):
            fn()
        sync(self.dev)
        times = []
        for _ in range(reps):
            if self.dev.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(inner):
                    fn()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)


def copy_bandwidth(dev: torch.device, nbytes: int | None = None) -> float:
    """GB/s of a large device copy (bytes read + bytes written), median of repeats."""
    if nbytes is None:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = Timer(dev).each(lambda: dst.copy_(src), reps=10 if dev.type == "cuda" else 5, warmup=2)
    src = dst = None  # free the buffers now (the lambda above refers to the names)
    return 2 * n * 4 / t / 1e9


def graph_time(fns: Sequence[Callable[[], object]], calls: int = 64, reps: int = 7) -> float:
    """Median seconds per call of `calls` calls captured in one CUDA graph and replayed `reps` times.

    The calls cycle over `fns` (e.g. one per copy of a weight, so the L2 cannot hold them), each at
    least twice. Three calls run on a side stream before the capture (kernels compiled, memory allocated)."""
    calls = max(calls, 2 * len(fns))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return Timer(torch.device("cuda")).each(g.replay, reps=reps, warmup=2) / calls
