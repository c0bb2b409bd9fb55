"""WKV-7 single-token decode (T=1) as a Numba-CUDA kernel; state updated in place.

One thread block per (batch, head). The N×N state is split so that TPR threads share a row
(value index i) and each owns N/TPR columns (key index j) with j = lane + q·TPR, so a warp's loads
of the state are contiguous. Row sums (S·a and S·r) are reduced through shared memory.

The call allocates nothing (when `out` is given), never synchronizes the host and launches on
torch's current stream, so it can be captured in a torch CUDA graph.
Reference: `edge_rwkv.wkv.wkv7_reference` with T=1.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from edge_rwkv.wkv import wkv7_reference

from ._runtime import (
    DECAY_SCALE,
    acc_dtype,
    current_stream,
    fallback_once,
    kernel_array,
    kernel_device_ok,
    kernel_input,
    numba_cuda,
    threads_per_row,
)

SUPPORTED_N = (4, 8, 16, 32, 64)
cuda = None  # numba.cuda, bound on first kernel build


@functools.lru_cache(maxsize=None)
def decode_kernel(N: int, acc):
    """Compiled-on-first-use decode kernel for head size N and accumulation type `acc`."""
    global cuda  # a module global (not a closure cell) so the simulator can swap it
    cuda = numba_cuda()
    TPR = threads_per_row(N)
    CPT = N // TPR
    npacc = np.float64 if acc.bitwidth == 64 else np.float32
    DS = npacc(DECAY_SCALE)
    ONE = npacc(1.0)
    ZERO = npacc(0.0)

    @cuda.jit(fastmath=False)
    def kern(r, w, k, v, a, b, state, y):
        # r..b, y: [B, H, N]; state: [B, H, N, N]
        H = state.shape[1]
        bh = cuda.blockIdx.x
        bi = bh // H
        h = bh - bi * H
        tid = cuda.threadIdx.x
        i = tid // TPR
        p = tid - i * TPR
        red = cuda.shared.array((2, N, TPR), acc)
        s = cuda.local.array(CPT, acc)
        sa = ZERO
        for q in range(CPT):
            j = p + q * TPR
            s[q] = state[bi, h, i, j]
            sa += s[q] * acc(a[bi, h, j])
        red[0, i, p] = sa
        cuda.syncthreads()
        sa = ZERO
        for q in range(TPR):
            sa += red[0, i, q]
        vi = acc(v[bi, h, i])
        yy = ZERO
        for q in range(CPT):
            j = p + q * TPR
            d = math.exp(-DS / (ONE + math.exp(-acc(w[bi, h, j]))))
            sn = s[q] * d + sa * acc(b[bi, h, j]) + vi * acc(k[bi, h, j])
            state[bi, h, i, j] = sn
            yy += sn * acc(r[bi, h, j])
        red[1, i, p] = yy
        cuda.syncthreads()
        if p == 0:
            yy = ZERO
            for q in range(TPR):
                yy += red[1, i, q]
            y[bi, h, i] = yy

    return kern, N * TPR


_LAUNCH: dict = {}


def _launcher(kern, arrays, dtypes, grid, block, stream):
    """Launch configuration of the kernel specialized to these argument types (skips re-typing)."""
    key = (id(kern), dtypes, grid, block, id(stream) if not isinstance(stream, int) else stream)
    cfg = _LAUNCH.get(key)
    if cfg is None:
        spec = kern if isinstance(stream, int) else kern.specialize(*arrays)
        cfg = spec[grid, block, stream]
        _LAUNCH[key] = cfg
    return cfg


def decode_supported(r: torch.Tensor, state: torch.Tensor) -> str | None:
    """None when the kernel handles these inputs, else the reason it does not."""
    if not kernel_device_ok(r) or not kernel_device_ok(state):
        return "tensors not on a device the Numba kernels run on"
    if r.shape[-1] not in SUPPORTED_N:
        return f"head size {r.shape[-1]} not in {SUPPORTED_N}"
    if r.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {r.dtype}"
    if state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
        return "state must be contiguous fp32"
    return None


def wkv7_decode(r, w, k, v, a, b, state, out=None):
    """One WKV-7 step. r..b: [B, H, N] or [B, 1, H, N]; state [B, H, N, N] fp32, updated in place.

    Returns y fp32 with the input's shape (written into `out` when given).
    Unsupported inputs (e.g. CPU tensors, N not in SUPPORTED_N) run the torch reference, logged once.
    """
    B, H, N = state.shape[0], state.shape[1], state.shape[-1]
    reason = decode_supported(r, state)
    if reason is not None:
        fallback_once("wkv7_decode", reason)
        xs = [x.reshape(B, 1, H, N) for x in (r, w, k, v, a, b)]
        y, s_new = wkv7_reference(*xs, state)
        state.copy_(s_new)
        y = y.reshape(r.shape)
        if out is not None:
            out.copy_(y)
            return out
        return y
    xs = [kernel_input(x.reshape(B, H, N)) for x in (r, w, k, v, a, b)]
    if out is None:
        out = torch.empty(r.shape, device=r.device, dtype=state.dtype)
    kern, nthreads = decode_kernel(N, acc_dtype(state.dtype))
    arrays = [kernel_array(x) for x in xs] + [kernel_array(state), kernel_array(out.view(B, H, N))]
    dtypes = tuple((x.dtype, x.is_contiguous()) for x in xs) + (state.dtype, out.is_contiguous())
    _launcher(kern, arrays, dtypes, B * H, nthreads, current_stream())(*arrays)
    return out
