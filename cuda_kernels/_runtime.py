"""Lazy Numba-CUDA access shared by the WKV-7 kernels.

Nothing here imports numba at module import time, so `edge_rwkv.cuda_kernels` imports on a machine
without numba or a GPU. Under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1, read by numba at its
import) the kernels run on CPU torch tensors through zero-copy numpy views; that is how CI checks them.
"""
from __future__ import annotations

import collections
import functools
import logging

import numpy as np
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


_VIEWS: "collections.OrderedDict" = collections.OrderedDict()
VIEW_CACHE_SIZE = 4096
_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64, torch.int8: np.int8,
              torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def kernel_array(t: torch.Tensor):
    """Numba view of a tensor for a kernel launch (zero-copy; a numpy view under the simulator).

    numba's own conversion (``as_cuda_array``) costs tens of µs a tensor — the tensor's interface
    dict, a stream object, a memory-pointer object with a finaliser — and an eager prefill chunk
    converts a few thousand tensors: at 7.2B that host time, not the GPU, set the prefill speed.
    Views are therefore cached by (address, shape, strides, dtype, device): the caching allocator
    hands the same addresses back chunk after chunk. A cached view holds no reference to its tensor
    (nothing is kept alive; an entry whose memory was freed is only ever found again through a live
    tensor at that same address, shape and dtype — which it then describes exactly). No stream
    synchronisation: every launch runs on torch's current stream (``current_stream``), ordered
    after the work that produced its inputs.
    """
    if simulator():
        return t.detach().numpy()
    key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device.index)
    v = _VIEWS.get(key)
    if v is None:
        v = _device_view(t)
        _VIEWS[key] = v
        if len(_VIEWS) > VIEW_CACHE_SIZE:
            _VIEWS.popitem(last=False)
    return v


def _device_view(t: torch.Tensor):
    np_dtype = _NP_DTYPES.get(t.dtype)
    if np_dtype is None or t.numel() == 0:
        return numba_cuda().as_cuda_array(t.detach(), sync=False)
    from numba.cuda.cudadrv import devicearray, driver  # noqa: PLC0415

    item = t.element_size()
    strides = tuple(s * item for s in t.stride())
    extent = sum((d - 1) * s for d, s in zip(t.shape, strides)) + item
    ptr = driver.MemoryPointer(numba_cuda().current_context(), driver.binding.CUdeviceptr(t.data_ptr()),
                               size=extent)  # no owner, no finaliser: a bare address
    return devicearray.DeviceNDArray(shape=tuple(t.shape), strides=strides, dtype=np.dtype(np_dtype), gpu_data=ptr)


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
