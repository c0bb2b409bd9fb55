"""WKV-7 recurrence in plain torch: the reference every kernel is checked against, and the CPU path.

Per head, the state S is N×N (rows index values, columns index keys):

    S_t = S_{t-1} · diag(d_t) + (S_{t-1} · a_t) b_tᵀ + v_t k_tᵀ,    y_t = S_t r_t
    d_t = exp(-0.606531 · sigmoid(w_t))       (0.606531 = e^-0.5, the x070 decay range)

`w` is the decay logit (w0 + LoRA output) so kernels can fuse the decay; `a = -kk`, `b = kk·a_gate`.
"""
from __future__ import annotations

import math

import torch

DECAY_SCALE = math.exp(-0.5)  # 0.6065306597...


def decay_from_logit(w: torch.Tensor) -> torch.Tensor:
    """Per-channel multiplicative decay in (exp(-e^-0.5), 1), always computed in fp32."""
    return torch.exp(-DECAY_SCALE * torch.sigmoid(w.float()))


def wkv7_reference(r, w, k, v, a, b, state):
    """Sequential WKV-7 over T steps.

    r, w, k, v, a, b: [B, T, H, N] (any float dtype; math in fp32).
    state: [B, H, N, N] fp32, not modified.
    Returns (y [B, T, H, N] fp32, new_state [B, H, N, N] fp32).
    """
    B, T, H, N = r.shape
    if state.shape != (B, H, N, N):
        raise ValueError(f"state shape {tuple(state.shape)} does not match inputs (B={B}, H={H}, N={N})")
    S = state.float().clone()
    d = decay_from_logit(w)
    r, k, v, a, b = (x.float() for x in (r, k, v, a, b))
    y = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
    for t in range(T):
        sa = S @ a[:, t, :, :, None]  # [B,H,N,1]
        S = S * d[:, t, :, None, :] + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = (S @ r[:, t, :, :, None])[..., 0]
    return y, S
