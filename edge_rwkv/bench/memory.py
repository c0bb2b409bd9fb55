"""Memory for benchmarks: the peak while a block runs (CUDA: the allocator's reserved bytes; CPU: heap bytes in
use, sampled), and the bytes of weights a model holds and a decode step reads."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

import torch

from ..quant.formats import Int8Rows


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _mallinfo2():
    """glibc's mallinfo2 (bytes of heap in use, caches excluded), or None where it does not exist."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = MallInfo2

    def in_use() -> int:
        mi = fn()
        return int(mi.uordblks + mi.hblkhd)
    return in_use


_HEAP_IN_USE = _mallinfo2() if sys.platform.startswith("linux") else None


def _host_bytes() -> int | None:
    return _HEAP_IN_USE() if _HEAP_IN_USE else _rss_bytes()


class PeakMemory:
    """Peak memory while the block runs. CUDA: max_memory_reserved, cached blocks released first
    (absolute: what the process holds on the device, CUDA-graph memory pools included — a replayed
    prefill chunk's activations live in its graph's pool and are not "allocated" tensors).
    CPU: RSS growth."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.peak: int | None = None
        self.base: int | None = None  # CUDA: bytes allocated when the block began (weights, state, ...)
        self.kind = ("cuda max_memory_reserved (cache emptied first; graph pools included)" if dev.type == "cuda"
                     else "host heap growth (mallinfo2)" if _HEAP_IN_USE else "RSS growth")

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = int(torch.cuda.memory_allocated(self.dev))
            return self
        self._base = _host_bytes()
        self._max = self._base or 0
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                r = _host_bytes()
                if r is not None and r > self._max:
                    self._max = r
                self._stop.wait(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        if self._base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak = int(torch.cuda.max_memory_reserved(self.dev))
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            r = _host_bytes() or 0
            self.peak = max(self._max, r) - self._base
        return False


def object_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Int8Rows):
        return object_bytes(obj.q, seen) + object_bytes(obj.scale, seen)
    if isinstance(obj, (tuple, list)):
        return sum(object_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):  # nn.Module keeps its tensors in _parameters / _buffers
        return sum(object_bytes(o, seen) for o in obj.values())
    # our objects and torch modules only: kernel handles (Numba device arrays) hold cyclic graphs
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith(("edge_rwkv", "torch")):
        return sum(object_bytes(v, seen) for v in vars(obj).values())
    return 0


def embedding_row_bytes(emb) -> int:
    """Bytes one token's embedding lookup reads (a dense row, or an int8 row and its scale)."""
    return emb.row_bytes if isinstance(emb, Int8Rows) else emb.shape[1] * emb.element_size()


def weight_bytes_per_step(net) -> int:
    """Bytes of weights one decode step reads: every layer tensor, the head, one embedding row."""
    seen: set = set()
    total = sum(object_bytes(layer, seen) for layer in net.layers)
    total += object_bytes(net.head, seen) + object_bytes(net.ln_out, seen)
    return total + embedding_row_bytes(net.emb)


def weights_resident_bytes(net) -> int:
    """Bytes of all the model's weights, the whole embedding table included."""
    seen: set = set()
    return sum(object_bytes(part, seen) for part in (net.layers, net.head, net.ln_out, net.emb))
