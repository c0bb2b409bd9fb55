"""Public WKV-7 sequence op: `wkv7` (kernel or reference by capability) and its autograd Function."""
from __future__ import annotations

import torch

from edge_rwkv.wkv import wkv7_reference

from ._runtime import fallback_once
from .wkv_prefill import chunk_len_for, prefill_backward, prefill_forward, prefill_supported


class WKV7Function(torch.autograd.Function):
    """Chunked Numba/cuBLAS WKV-7 with an exact backward (per-chunk states kept, the rest recomputed).

    apply(r, w, k, v, a, b, state, chunk_len) -> (y [B,T,H,N], new_state [B,H,N,N]).
    Gradients flow to r, w (the decay logit), k, v, a, b and the initial state.
    """

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, state, chunk_len=None):
        L = chunk_len_for(r.shape[1], chunk_len)
        y, last, states = prefill_forward(r, w, k, v, a, b, state, L)
        ctx.save_for_backward(r, w, k, v, a, b, state, states)
        ctx.L = L
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        r, w, k, v, a, b, state, states = ctx.saved_tensors
        grads = prefill_backward((r, w, k, v, a, b, state), states, ctx.L, dy, dlast)
        return (*grads, None)


def wkv7(r, w, k, v, a, b, state, chunk_len=None):
    """WKV-7 over [B,T,H,N] inputs from `state` [B,H,N,N]; returns (y fp32, new_state fp32).

    Runs the Numba-CUDA kernels when the tensors are on a CUDA device they support (dtype, head
    size), else `edge_rwkv.wkv.wkv7_reference` (logged once, with the reason). Differentiable.
    """
    reason = prefill_supported(r, state)
    if reason is None:
        return WKV7Function.apply(r, w, k, v, a, b, state, chunk_len)
    fallback_once("wkv7", reason)
    return wkv7_reference(r, w, k, v, a, b, state)
