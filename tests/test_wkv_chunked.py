"""The chunked torch WKV-7 (CPU prefill and training) against the step-by-step recurrence, in float64."""
import pytest
import torch

from edge_rwkv.wkv import wkv7_chunked, wkv7_reference, wkv7_torch


def inputs(B, T, H, N, seed, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    w = rnd(B, T, H, N) * 2 + (4.0 if strong_decay else 0.0)
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    gate = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    return r, w, k, v, -kk, kk * gate, rnd(B, H, N, N)


def reference64(r, w, k, v, a, b, s):
    """The recurrence written out in float64 (wkv7_reference computes in fp32)."""
    d = torch.exp(-torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * torch.sigmoid(w))
    S, ys = s.clone(), []
    for t in range(r.shape[1]):
        S = S * d[:, t, :, None, :] + (S @ a[:, t, ..., None]) * b[:, t, :, None, :] + v[:, t, ..., None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, ..., None])[..., 0])
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("B,T,H,N,chunk", [(1, 1, 1, 4, 4), (2, 5, 2, 8, 4), (1, 17, 2, 8, 16), (2, 37, 3, 8, 16),
                                           (1, 64, 1, 64, 32), (1, 130, 2, 16, 16)])
@pytest.mark.parametrize("strong", [False, True])
def test_chunked_matches_recurrence(B, T, H, N, chunk, strong):
    x = inputs(B, T, H, N, seed=T + N, strong_decay=strong)
    y_ref, s_ref = reference64(*x)
    y, s = wkv7_chunked(*x, chunk=chunk)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert (y - y_ref).abs().max() <= 1e-9 * y_ref.abs().max()
    assert (s - s_ref).abs().max() <= 1e-9 * s_ref.abs().max()


def test_chunked_gradients_match_recurrence():
    x = [t.requires_grad_(True) for t in inputs(1, 21, 2, 8, seed=3)]
    y, s = wkv7_chunked(*x, chunk=8)
    gy = torch.randn_like(y)
    gs = torch.randn_like(s)
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), x)
    y2, s2 = reference64(*x)
    grads_ref = torch.autograd.grad((y2 * gy).sum() + (s2 * gs).sum(), x)
    for g1, g2 in zip(grads, grads_ref):
        assert (g1 - g2).abs().max() <= 1e-8 * (g2.abs().max() + 1e-12)


def test_torch_path_agrees_in_fp32():
    x = [t.float() for t in inputs(1, 80, 2, 32, seed=5)]
    y1, s1 = wkv7_torch(*x)
    y2, s2 = wkv7_reference(*x)
    assert (y1 - y2).abs().max() <= 1e-4 * y2.abs().max()
    assert (s1 - s2).abs().max() <= 1e-4 * s2.abs().max()
