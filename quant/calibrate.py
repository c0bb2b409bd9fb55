"""Calibration: choose the stored values of a quantized weight, given W [out, K] (fp32) and, for the
activation-aware methods, calibration activations X [n, K] (the inputs this layer sees).

Every method returns a ``QuantizedWeight`` in the plain stored format of quant/formats.py:

* ``rtn``   round to nearest with absmax scales (the reference quantizer).
* ``awq``   per-input-channel scale search: s = mean|x|^α (normalised), α on a grid in [0, 1];
            the stored weight is Q(W·diag(s)) and the format's optional fp16 ``input_scale`` [K]
            holds 1/s, so y = (x ⊙ input_scale) @ dequant(Q(W·diag(s)))ᵀ. We keep the scale
            explicit rather than folding it into a preceding op: in RWKV-7 the preceding token-shift
            mix vectors feed several projections (r, k, v, gates) at once, so a per-projection
            scale can be folded there only in some cases. α = 0 (s = 1) is RTN and then no
            input_scale is stored. Optionally (``clip=True``) a per-group clip ratio is searched too.
* ``gptq``  Hessian-based: H = XᵀX + damp·mean(diag H)·I, columns quantized left to right with the
            quantization error spread over the remaining columns through the Cholesky factor of
            H⁻¹ (lazy block updates); group scales (int4) are taken from the error-updated weights
            at each group start; int8 keeps per-row absmax scales.

``output_mse(W, qw, X)`` = mean ‖XWᵀ − X·W_effᵀ‖² is the quantity the methods reduce.
"""

from __future__ import annotations

import torch

from edge_rwkv.errors import CheckpointError

from .formats import (SCALE_FLOOR, QuantizedWeight, QuantSpec, dequantize_int4_torch, int4_absmax_scale_torch,
                      pack_int4_torch, quantize_int4_torch, quantize_int8_torch, quantize_rtn)

METHODS = ("rtn", "awq", "gptq")


def output_mse(w: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    w, x = w.float(), x.float()
    return float(((x @ w.t() - x @ qw.dequantize(torch.float32).t()) ** 2).mean())


def quantize_weight(w: torch.Tensor, spec: QuantSpec, method: str = "rtn", x: torch.Tensor | None = None,
                    **kw) -> QuantizedWeight:
    """Dispatch to ``rtn`` / ``awq`` / ``gptq`` (the latter two need calibration activations x)."""
    if method == "rtn":
        return quantize_rtn(w, spec)
    if x is None:
        raise CheckpointError(f"calibration method {method!r} needs calibration activations")
    if method == "awq":
        return awq(w, x, spec, **kw)
    if method == "gptq":
        return gptq(w, x, spec, **kw)
    raise CheckpointError(f"unknown calibration method {method!r} (known: {', '.join(METHODS)})")


def _plain(spec: QuantSpec) -> QuantSpec:
    return QuantSpec(spec.format, spec.group, spec.version, False)


def _quantize_scaled(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None):
    """RTN of w; for int4 optionally with per-group clipped scales (clip ratio [out, K/g])."""
    if spec.format == "int8":
        return quantize_int8_torch(w)
    scale = None
    if clip is not None:
        scale = torch.clamp_min(int4_absmax_scale_torch(w, spec.group).float() * clip, SCALE_FLOOR).half()
    return quantize_int4_torch(w, spec.group, scale)


def _clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid) -> torch.Tensor:
    """Per-group clip ratio minimising the group's output error contribution (int4)."""
    out, k = w.shape
    g = spec.group
    xw = (x.float() ** 2).mean(0).reshape(1, k // g, g)  # diagonal approximation of XᵀX
    wg = w.reshape(out, k // g, g)
    best = torch.full((out, k // g), float("inf"), device=w.device)
    best_r = torch.ones((out, k // g), device=w.device)
    for r in grid:
        clip = torch.full((out, k // g), float(r), device=w.device)
        q, s = _quantize_scaled(w, spec, clip)
        err = ((dequantize_int4_torch(q, s, g).reshape(out, k // g, g) - wg) ** 2 * xw).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, clip, best_r)
    return best_r


def awq(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, grid: int = 20, clip: bool = False,
        clip_grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> QuantizedWeight:
    """Activation-aware scaling (see module docstring). Returns the best of the α grid."""
    w, x = w.float(), x.float()
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise CheckpointError(f"calibration activations must be [n, {w.shape[1]}], got {tuple(x.shape)}")
    plain = _plain(spec)
    act = x.abs().mean(0).clamp_min(1e-8)
    ref = x @ w.t()
    best, best_qw = None, None
    for i in range(grid + 1):
        alpha = i / grid
        s = act ** alpha
        s = s / (s.max() * s.min()).sqrt()
        inv = (1.0 / s).half()
        if not torch.isfinite(inv).all() or (inv == 0).any():
            continue
        s_exact = 1.0 / inv.float()  # so that dequant(Q(W·s)) ⊙ inv is the intended weight
        ws = w * s_exact[None, :]
        cl = _clip_search(ws, x * inv.float()[None, :], plain, clip_grid) if (clip and spec.format == "int4") else None
        q, sc = _quantize_scaled(ws, plain, cl)
        qw = QuantizedWeight(QuantSpec(spec.format, spec.group, spec.version, alpha > 0), tuple(w.shape),
                             q, sc, inv if alpha > 0 else None)
        err = float(((ref - x @ qw.dequantize(torch.float32).t()) ** 2).mean())
        if best is None or err < best:
            best, best_qw = err, qw
    return best_qw


def gptq(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, damp: float = 0.01, block: int = 128) -> QuantizedWeight:
    """GPTQ with lazy block updates (see module docstring); plain stored format."""
    w = w.float().clone()
    x = x.float()
    out, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise CheckpointError(f"calibration activations must be [n, {k}], got {tuple(x.shape)}")
    plain = _plain(spec)
    plain.check_shape((out, k))
    g = spec.group or k
    if spec.format == "int4":
        block = max(g, (block // g) * g)  # groups never straddle a block
    h = (x.t() @ x).double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    qmin, qmax = plain.qmin, plain.qmax
    q = torch.zeros((out, k), dtype=torch.int8, device=w.device)
    if spec.format == "int8":
        scale = torch.clamp_min(w.abs().amax(1) / 127.0, SCALE_FLOOR).half()
        scales = scale
    else:
        scales = torch.empty((out, k // g), dtype=torch.float16, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if spec.format == "int4" and col % g == 0:
                amax = w1[:, i:i + g].abs().amax(1)
                scales[:, col // g] = torch.clamp_min(amax / 7.0, SCALE_FLOOR).half()
            s = (scale if spec.format == "int8" else scales[:, col // g]).float()
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc / s), qmin, qmax)
            q[:, col] = qc.to(torch.int8)
            e = (wc - qc * s) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if spec.format == "int8":
        return QuantizedWeight(plain, (out, k), q, scales)
    return QuantizedWeight(plain, (out, k), pack_int4_torch(q), scales)
