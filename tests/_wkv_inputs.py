"""Shared WKV-7 test inputs and an independent float64 sequential reference (test helper)."""
from __future__ import annotations

import math

import torch


def make_inputs(B, T, H, N, dtype=torch.float32, device="cpu", seed=0, decay_bias=0.0):
    """Inputs shaped like the model's: kk unit-norm per head, a = -kk, b = kk·gate; w a logit."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r = rnd(B, T, H, N) * 0.5
    k = rnd(B, T, H, N) * 0.5
    v = rnd(B, T, H, N) * 0.5
    w = rnd(B, T, H, N) * 2.0 + decay_bias
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    a, b = -kk, kk * gate
    state = rnd(B, H, N, N) * 0.3
    xs = [x.to(dtype).to(device) for x in (r, w, k, v, a, b)]
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return xs + [state.to(sdtype).to(device)]


def ref64(r, w, k, v, a, b, state):
    """WKV-7 in float64, step by step (same math as edge_rwkv.wkv.wkv7_reference)."""
    S = state.double().clone()
    d = torch.exp(-math.exp(-0.5) * torch.sigmoid(w.double()))
    r, k, v, a, b = (x.double() for x in (r, k, v, a, b))
    ys = []
    for t in range(r.shape[1]):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * d[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, dim=1), S


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()
