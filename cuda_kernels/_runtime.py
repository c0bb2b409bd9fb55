"""Lazy Numba-CUDA access shared by the WKV-7 kernels.

Nothing here imports numba at module import time, so `edge_rwkv.cuda_kernels` imports on a machine
without numba or a GPU. Under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1, read by numba at its
import) the kernels run on CPU torch tensors through zero-copy numpy views; that is how CI checks them.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("edge_rwkv.cuda_kernels")

DECAY_SCALE = 0.6065306597126334  # exp(-0.5), the x070 decay range (same as edge_rwkv.wkv.DECAY_SCALE)


@functools.lru_cache(maxsize=None)
def numba_cuda():
    """The `numba.cuda` module, or None when numba / numba-cuda cannot be imported."""
    try:
        from numba import config  # noqa: PLC0415
        from numba import cuda  # noqa: PLC0415

        # one block per (batch, head) is this workload's natural grid; small grids are expected
        config.CUDA_LOW_OCCUPANCY_WARNINGS = False
    except Exception as exc:  # pragma: no cover - depends on the install
        log.info("numba.cuda unavailable: %s", exc)
        return None
    return cuda


def simulator() -> bool:
    """True when numba runs its CUDA simulator (kernels then take CPU tensors)."""
    cuda = numba_cuda()
    if cuda is None:
        return False
    from numba import config  # noqa: PLC0415

    return bool(config.ENABLE_CUDASIM)


@functools.lru_cache(maxsize=None)
def _gpu_ok() -> bool:
    cuda = numba_cuda()
    if cuda is None or simulator():
        return False
    try:
        return bool(cuda.is_available()) and torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def cuda_available() -> bool:
    """True when the Numba-CUDA kernels can run on torch CUDA tensors here."""
    return _gpu_ok()


def kernel_device_ok(t: torch.Tensor) -> bool:
    """Whether tensor `t` lives where the kernels can run: CUDA, or CPU under the simulator."""
    if simulator():
        return t.device.type == "cpu"
    return t.device.type == "cuda" and _gpu_ok()


def kernel_array(t: torch.Tensor):
    """Zero-copy Numba view of a tensor.

    Not cached: a view keeps its tensor alive, and a cache of views kept every transient prefill
    intermediate (and the batch-256 decode state of a finished benchmark) allocated — gigabytes.
    Launch cost only matters eagerly; the decode step runs as a CUDA graph.
    """
    if simulator():
        return t.detach().numpy()
    return numba_cuda().as_cuda_array(t.detach())


_STREAMS: dict = {}


def current_stream():
    """Numba handle of torch's current CUDA stream (0 under the simulator)."""
    if simulator():
        return 0
    ptr = torch.cuda.current_stream().cuda_stream
    s = _STREAMS.get(ptr)
    if s is None:
        s = numba_cuda().external_stream(ptr)
        _STREAMS[ptr] = s
    return s


def threads_per_row(N: int) -> int:
    """Threads sharing one row of an N×N head state in the per-(row, head) WKV kernels."""
    return min(16, N)


def kernel_input(t: torch.Tensor) -> torch.Tensor:
    """Input as a dtype the kernels read directly (bf16 has no array-interface form: widen to fp32)."""
    if t.dtype == torch.bfloat16:
        return t.float()
    return t


def acc_dtype(state_dtype: torch.dtype):
    """Accumulation type of the kernels: fp64 only for fp64 state (simulator gradchecks), else fp32."""
    from numba import float32, float64  # noqa: PLC0415

    return float64 if state_dtype == torch.float64 else float32


_warned: set = set()


def fallback_once(what: str, reason: str) -> None:
    """Log once that `what` runs the torch reference, and why."""
    if (what, reason) not in _warned:
        _warned.add((what, reason))
        log.warning("%s: using the torch reference (%s)", what, reason)
