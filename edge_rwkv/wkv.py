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


def wkv7_chunked(r, w, k, v, a, b, state, chunk: int = 16):
    """The same recurrence, parallel within chunks of `chunk` steps (matrix products), sequential across.

    Per head, with S₀ entering a chunk and γ_t = Π_{u≤t} d_u inside it, every in-chunk quantity is a
    product of L×N matrices; x_t = S_{t-1}a_t comes from one unit-lower-triangular solve:
        (I − A_ab) X = Â S₀ᵀ + A_ak V        →  X = W S₀ᵀ + U
        Y   = (R̂ + A_rb W) S₀ᵀ + A_rb U + A_rk V
        S_L = S₀ (Γ_L + Wᵀ B̄) + Uᵀ B̄ + Vᵀ K̄
    with A_xy[t,s] = Σ_j x_tj y_sj γ_•t,j/γ_sj (strictly lower for a·, lower for r·). The γ ratios are
    formed around the chunk's middle cumulative log-decay so no factor exceeds e^{0.31·L}.
    Differentiable with torch autograd; used for CPU prefill and training.
    """
    B, T, H, N = r.shape
    if state.shape != (B, H, N, N):
        raise ValueError(f"state shape {tuple(state.shape)} does not match inputs (B={B}, H={H}, N={N})")
    L = chunk
    acc = torch.float64 if r.dtype == torch.float64 else torch.float32  # fp64 in, fp64 math (tests)
    nc = -(-T // L)
    pad = nc * L - T

    def blocks(x):  # [B,T,H,N] → [B,H,nc,L,N], zero-padded (padding leaves the state unchanged)
        x = torch.nn.functional.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)

    r_, k_, v_, a_, b_ = (blocks(x) for x in (r, k, v, a, b))
    logd = blocks(-DECAY_SCALE * torch.sigmoid(w.to(acc)))
    lc = torch.cumsum(logd, dim=-2)
    lc_prev = lc - logd
    mid = lc[..., (L - 1) // 2:(L - 1) // 2 + 1, :]
    end = lc[..., -1:, :]
    to_mid = torch.exp(mid - lc)
    a_rel, r_rel = a_ * torch.exp(lc_prev - mid), r_ * torch.exp(lc - mid)
    b_rel, k_rel = b_ * to_mid, k_ * to_mid
    to_end = torch.exp(end - lc)
    b_bar, k_bar = b_ * to_end, k_ * to_end
    a_hat, r_hat = a_ * torch.exp(lc_prev), r_ * torch.exp(lc)

    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    A_ab = torch.tril(a_rel @ tr(b_rel), -1)
    A_ak = torch.tril(a_rel @ tr(k_rel), -1)
    A_rb = torch.tril(r_rel @ tr(b_rel))
    A_rk = torch.tril(r_rel @ tr(k_rel))
    eye = torch.eye(L, dtype=A_ab.dtype, device=A_ab.device)
    WU = torch.linalg.solve_triangular(eye - A_ab, torch.cat([a_hat, A_ak @ v_], -1), upper=False,
                                       unitriangular=True)
    W_, U_ = WU[..., :N], WU[..., N:]
    Q = r_hat + A_rb @ W_
    Y0 = A_rb @ U_ + A_rk @ v_
    M = torch.diag_embed(torch.exp(end[..., 0, :])) + tr(W_) @ b_bar
    C = tr(U_) @ b_bar + tr(v_) @ k_bar

    S = state.to(acc)
    ys = []
    for c in range(nc):
        ys.append(Q[:, :, c] @ tr(S) + Y0[:, :, c])
        S = S @ M[:, :, c] + C[:, :, c]
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return y, S


def wkv7_torch(r, w, k, v, a, b, state, chunk: int = 16):
    """CPU/torch path: step by step for short inputs, chunked for long ones."""
    if r.shape[1] >= 2 * chunk:
        return wkv7_chunked(r, w, k, v, a, b, state, chunk)
    return wkv7_reference(r, w, k, v, a, b, state)
