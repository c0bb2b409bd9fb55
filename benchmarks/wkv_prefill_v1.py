"""The first WKV-7 chunked prefill, kept only for the side-by-side benchmark (`bench_wkv.py --variant old`).

Runtime code never imports this file; the runtime path is edge_rwkv.cuda_kernels.wkv_prefill.

WKV-7 chunked prefill (parallel in time) with Numba-CUDA elementwise/scan kernels and cuBLAS products.

Per head, with S_0 the state entering a chunk of L steps and γ_t = Π_{u≤t} d_u (decay within the chunk):

    x_t := S_{t-1} a_t
    S_t  = S_0 Γ_t + Σ_{s≤t} [x_s (b_s⊙γ_t/γ_s)ᵀ + v_s (k_s⊙γ_t/γ_s)ᵀ]
    y_t  = S_t r_t

Stacking rows over t (X, V, ... are L×N):
    X   = Â S_0ᵀ + A_ab X + A_ak V            A_ab[t,s] = Σ_j a_tj b_sj γ_{t-1,j}/γ_sj  (s<t), A_ak alike with k
    (I - A_ab)[W | U] = [Â | A_ak V]           Â rows a_t⊙γ_{t-1}  (unit lower-triangular solve)
    Y   = (R̂ + A_rb W) S_0ᵀ + (A_rb U + A_rk V)  = Q S_0ᵀ + Y0          A_rb, A_rk: s≤t, R̂ rows r_t⊙γ_t
    S_L = S_0 (Γ_L + Wᵀ B̄) + (Uᵀ B̄ + Vᵀ K̄)      = S_0 M + C           B̄ rows b_s⊙γ_L/γ_s

Only γ ratios enter the L×L products; they are formed as (x⊙e^{lc-m})·(y⊙e^{m-lc}) with lc the
within-chunk cumulative log-decay and m the chunk's middle value (the anchor), so the factors stay
within e^{±L/2·0.61} whatever the decays. Since d ≥ exp(-e^{-1/2}) the absolute factors (≤ 1) never
overflow either.

Work split: `prep` (Numba, elementwise + per-channel cumsum) → dense products and the triangular
solve (torch/cuBLAS, batched over all chunks) → `scan` (Numba, the sequential S_{c+1} = S_c M_c + C_c
with the state rows split over blocks and tiled in shared memory) → Y = Q S_cᵀ + Y0 (cuBLAS).
The backward mirrors it: a reverse scan in Numba, cuBLAS products, and the prep's adjoint in Numba.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from edge_rwkv.cuda_kernels._runtime import (
    DECAY_SCALE,
    acc_dtype,
    current_stream,
    kernel_array,
    kernel_device_ok,
    kernel_input,
    numba_cuda,
)

cuda = None  # numba.cuda, bound on first kernel build (a module global so the simulator can swap it)
SUPPORTED_N = (4, 8, 16, 32, 64)
DEFAULT_CHUNK = 64  # fastest of 16/32/64 on an H200 for T ≥ 1024 except T=1024,H=12 (benchmarks/NOTES.md)
NSLOT = 9  # prep output slots, see _SLOTS
# slot order keeps the pairs that feed one product adjacent: [Arel;Rrel] @ [Brel;Krel]ᵀ, [Bbar;Kbar]
_SLOTS = ("Arel", "Rrel", "Brel", "Krel", "Aabs", "Rabs", "Bbar", "Kbar", "V")


def _bind():
    global cuda
    cuda = numba_cuda()
    return cuda


def _np(acc):
    return np.float64 if acc.bitwidth == 64 else np.float32


@functools.lru_cache(maxsize=None)
def prep_kernel(N: int, L: int, acc):
    """Per (chunk, head, batch) block, thread j: decay factors and scaled copies of r, k, a, b, v."""
    _bind()
    npacc = _np(acc)
    DS, ONE, ZERO = npacc(DECAY_SCALE), npacc(1.0), npacc(0.0)
    MID = (L - 1) // 2

    @cuda.jit(fastmath=False)
    def kern(r, w, k, v, a, b, P, gL):
        # inputs [B, T, H, N]; P [B, H, nc, NSLOT, L, N]; gL [B, H, nc, N]
        c = cuda.blockIdx.x
        h = cuda.blockIdx.y
        bi = cuda.blockIdx.z
        j = cuda.threadIdx.x
        T = r.shape[1]
        lcs = cuda.local.array(L, acc)
        run = ZERO
        for t in range(L):
            tt = c * L + t
            if tt < T:
                run += -DS / (ONE + math.exp(-acc(w[bi, tt, h, j])))
            lcs[t] = run
        m = lcs[MID]
        lend = lcs[L - 1]
        prev = ZERO
        for t in range(L):
            tt = c * L + t
            lc = lcs[t]
            if tt < T:
                rv = acc(r[bi, tt, h, j])
                kv = acc(k[bi, tt, h, j])
                vv = acc(v[bi, tt, h, j])
                av = acc(a[bi, tt, h, j])
                bv = acc(b[bi, tt, h, j])
            else:
                rv = kv = vv = av = bv = ZERO
            eK = math.exp(m - lc)
            eKb = math.exp(lend - lc)
            P[bi, h, c, 0, t, j] = av * math.exp(prev - m)
            P[bi, h, c, 1, t, j] = rv * math.exp(lc - m)
            P[bi, h, c, 2, t, j] = bv * eK
            P[bi, h, c, 3, t, j] = kv * eK
            P[bi, h, c, 4, t, j] = av * math.exp(prev)
            P[bi, h, c, 5, t, j] = rv * math.exp(lc)
            P[bi, h, c, 6, t, j] = bv * eKb
            P[bi, h, c, 7, t, j] = kv * eKb
            P[bi, h, c, 8, t, j] = vv
            prev = lc
        gL[bi, h, c, j] = math.exp(lend)

    return kern


@functools.lru_cache(maxsize=None)
def prep_bwd_kernel(N: int, L: int, acc):
    """Adjoint of `prep_kernel`: grads of r, w (logit), k, a, b from grads of the slots and gL."""
    _bind()
    npacc = _np(acc)
    DS, ONE, ZERO = npacc(DECAY_SCALE), npacc(1.0), npacc(0.0)
    MID = (L - 1) // 2

    @cuda.jit(fastmath=False)
    def kern(r, w, k, a, b, dP, dgL, dr, dw, dk, da, db):
        c = cuda.blockIdx.x
        h = cuda.blockIdx.y
        bi = cuda.blockIdx.z
        j = cuda.threadIdx.x
        T = r.shape[1]
        lcs = cuda.local.array(L, acc)
        run = ZERO
        for t in range(L):
            tt = c * L + t
            if tt < T:
                run += -DS / (ONE + math.exp(-acc(w[bi, tt, h, j])))
            lcs[t] = run
        m = lcs[MID]
        lend = lcs[L - 1]
        # d(loss)/d(lend): through Bbar, Kbar and gL
        gend = dgL[bi, h, c, j] * math.exp(lend)
        for t in range(L):
            tt = c * L + t
            if tt < T:
                eKb = math.exp(lend - lcs[t])
                gend += (acc(k[bi, tt, h, j]) * dP[bi, h, c, 7, t, j] + acc(b[bi, tt, h, j]) * dP[bi, h, c, 6, t, j]) * eKb
        # reverse pass: G_t = d/d lc_t ; d/d ld_t = Σ_{t'≥t} G_t'
        carry = ZERO  # contribution to G_t from slot A at t+1 (which uses lc_t)
        rsum = gend
        for tb in range(L):
            t = L - 1 - tb
            tt = c * L + t
            if tt >= T:
                continue  # padded steps have zero inputs and zero decay
            lc = lcs[t]
            prev = lcs[t - 1] if t > 0 else ZERO
            rv = acc(r[bi, tt, h, j])
            kv = acc(k[bi, tt, h, j])
            av = acc(a[bi, tt, h, j])
            bv = acc(b[bi, tt, h, j])
            eK = math.exp(m - lc)
            eKb = math.exp(lend - lc)
            gr = dP[bi, h, c, 1, t, j] * math.exp(lc - m) + dP[bi, h, c, 5, t, j] * math.exp(lc)
            ga = dP[bi, h, c, 0, t, j] * math.exp(prev - m) + dP[bi, h, c, 4, t, j] * math.exp(prev)
            gk = dP[bi, h, c, 3, t, j] * eK + dP[bi, h, c, 7, t, j] * eKb
            gb = dP[bi, h, c, 2, t, j] * eK + dP[bi, h, c, 6, t, j] * eKb
            rsum += rv * gr - kv * gk - bv * gb + carry
            carry = av * ga
            sg = ONE / (ONE + math.exp(-acc(w[bi, tt, h, j])))
            dw[bi, tt, h, j] = -rsum * DS * sg * (ONE - sg)
            dr[bi, tt, h, j] = gr
            dk[bi, tt, h, j] = gk
            da[bi, tt, h, j] = ga
            db[bi, tt, h, j] = gb

    return kern


def _scan_rows(N: int) -> int:
    return min(16, N)


@functools.lru_cache(maxsize=None)
def scan_kernel(N: int, acc, reverse: bool):
    """Sequential pass over chunks, rows of the state split over blocks (R rows per block).

    forward : out[c] = S_c (state entering chunk c);  S_{c+1} = S_c M_c + C_c;  last = S_nc
    reverse : g = last_in; for c = nc-1..0: out[c] = g; g = g M_cᵀ + C_c;  last = g
              (the adjoint: C holds dL/dS_c from the outputs, out[c] = dL/dS_{c+1} = dL/dC_c)
    One thread per (row, column) of the block's R×N tile; M_c staged in shared memory (padded).
    """
    _bind()
    R = _scan_rows(N)
    MPT = N // R  # M elements each of the R*N threads loads per chunk (per row of threads)
    NP1 = N + 1  # padded row of the staged M (shared shapes must be compile-time constants)

    @cuda.jit(fastmath=False)
    def kern(M, C, first, out, last):
        # M, C, out: [B, H, nc, N, N]; first, last: [B, H, N, N]
        g = cuda.blockIdx.x
        h = cuda.blockIdx.y
        bi = cuda.blockIdx.z
        ti = cuda.threadIdx.y  # row within block
        j = cuda.threadIdx.x
        i = g * R + ti
        nc = M.shape[2]
        Ssh = cuda.shared.array((R, N), acc)
        Msh = cuda.shared.array((N, NP1), acc)
        mreg = cuda.local.array(MPT, acc)
        s = acc(first[bi, h, i, j])
        Ssh[ti, j] = s
        c0 = nc - 1 if reverse else 0
        for q in range(MPT):
            mreg[q] = M[bi, h, c0, ti + q * R, j]
        for step in range(nc):
            c = nc - 1 - step if reverse else step
            cuda.syncthreads()  # previous compute done with Msh
            for q in range(MPT):
                if reverse:
                    Msh[j, ti + q * R] = mreg[q]  # transposed
                else:
                    Msh[ti + q * R, j] = mreg[q]
            out[bi, h, c, i, j] = s
            addv = acc(C[bi, h, c, i, j])
            if step + 1 < nc:
                cn = c - 1 if reverse else c + 1
                for q in range(MPT):
                    mreg[q] = M[bi, h, cn, ti + q * R, j]
            cuda.syncthreads()
            acc_v = addv
            for kk in range(N):
                acc_v += Ssh[ti, kk] * Msh[kk, j]
            cuda.syncthreads()
            s = acc_v
            Ssh[ti, j] = s
        last[bi, h, i, j] = s

    return kern, R


def _launch(kern, grid, block, *tensors):
    kern[grid, block, current_stream()](*[kernel_array(t) for t in tensors])


def prefill_supported(r: torch.Tensor, state: torch.Tensor) -> str | None:
    if not kernel_device_ok(r) or not kernel_device_ok(state):
        return "tensors not on a device the Numba kernels run on"
    if r.shape[-1] not in SUPPORTED_N:
        return f"head size {r.shape[-1]} not in {SUPPORTED_N}"
    if r.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {r.dtype}"
    if state.dtype not in (torch.float32, torch.float64):
        return "state must be fp32"
    return None


# ---------------------------------------------------------------- pieces


def prep(r, w, k, v, a, b, L: int, acc_torch: torch.dtype):
    """Run the prep kernel. Returns P [B,H,nc,NSLOT,L,N] and gL [B,H,nc,N] in `acc_torch`."""
    B, T, H, N = r.shape
    nc = -(-T // L)
    P = torch.empty(B, H, nc, NSLOT, L, N, device=r.device, dtype=acc_torch)
    gL = torch.empty(B, H, nc, N, device=r.device, dtype=acc_torch)
    xs = [kernel_input(x.contiguous()) for x in (r, w, k, v, a, b)]
    _launch(prep_kernel(N, L, acc_dtype(acc_torch)), (nc, H, B), N, *xs, P, gL)
    return P, gL


class _Prep(torch.autograd.Function):
    """`prep` as an autograd node (its backward is the adjoint kernel)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, L, acc_torch):
        P, gL = prep(r, w, k, v, a, b, L, acc_torch)
        ctx.save_for_backward(r, w, k, a, b)
        ctx.L = L
        ctx.shape_v = v.shape
        ctx.vdtype = v.dtype
        return P, gL

    @staticmethod
    def backward(ctx, dP, dgL):
        r, w, k, a, b = ctx.saved_tensors
        L = ctx.L
        B, T, H, N = r.shape
        nc = dP.shape[2]
        acc_t = dP.dtype
        dP = dP.contiguous()
        dgL = dgL.contiguous()
        grads = [torch.zeros(B, T, H, N, device=r.device, dtype=acc_t) for _ in range(5)]
        xs = [kernel_input(x.contiguous()) for x in (r, w, k, a, b)]
        _launch(prep_bwd_kernel(N, L, acc_dtype(acc_t)), (nc, H, B), N, *xs, dP, dgL, *grads)
        dr, dw, dk, da, db = grads
        dv = dP[:, :, :, 8].reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2)
        cast = lambda g, like: g.to(like.dtype)  # noqa: E731
        return (cast(dr, r), cast(dw, w), cast(dk, k), dv.to(ctx.vdtype), cast(da, a), cast(db, b), None, None)


@functools.lru_cache(maxsize=None)
def _masks(L: int, dtype: torch.dtype, device_str: str):
    """Mask for the 2L×2L product [Arel;Rrel]·[Brel;Krel]ᵀ: strict lower for A rows, lower for R rows.

    Cached, so built as an ordinary tensor even when first asked for under inference mode: autograd
    may save it later.
    """
    with torch.inference_mode(False):
        idx = torch.arange(L)
        strict = (idx[:, None] > idx[None, :]).to(dtype)
        incl = (idx[:, None] >= idx[None, :]).to(dtype)
        top = torch.cat([strict, strict], 1)
        bot = torch.cat([incl, incl], 1)
        return torch.cat([top, bot], 0).to(device_str)


def chunk_algebra(P: torch.Tensor, gL: torch.Tensor):
    """Dense per-chunk products (torch / cuBLAS). Returns Q, Y0 [G,L,N] and M, C [G,N,N] (G = B·H·nc).

    Differentiable by torch autograd (used again, recomputed, in the backward).
    """
    B, H, nc, _, L, N = P.shape
    G = B * H * nc
    Pv = P.reshape(G, NSLOT, L, N)
    AR = Pv[:, 0:2].reshape(G, 2 * L, N)
    BK = Pv[:, 2:4].reshape(G, 2 * L, N)
    Aabs, Rabs = Pv[:, 4], Pv[:, 5]
    BKbar = Pv[:, 6:8].reshape(G, 2 * L, N)
    V = Pv[:, 8]
    A = torch.bmm(AR, BK.transpose(1, 2)) * _masks(L, P.dtype, str(P.device))
    Aab, Aak = A[:, :L, :L], A[:, :L, L:]
    Arb_k = A[:, L:, :]  # [A_rb | A_rk]
    rhs = torch.cat([Aabs, torch.bmm(Aak, V)], dim=2)  # [G, L, 2N]
    WU = torch.linalg.solve_triangular(-Aab, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :N], WU[..., N:]
    # [A_rb | A_rk] @ [[W, U], [0, V]] = [A_rb W | A_rb U + A_rk V]
    QY = torch.bmm(Arb_k, torch.cat([WU, torch.cat([torch.zeros_like(V), V], dim=2)], dim=1))
    Q = QY[..., :N] + Rabs
    Y0 = QY[..., N:]
    # M = Γ_L + Wᵀ B̄ ; C = [U;V]ᵀ [B̄;K̄]
    M = torch.bmm(W.transpose(1, 2), Pv[:, 6]) + torch.diag_embed(gL.reshape(G, N))
    C = torch.bmm(torch.cat([U, V], dim=1).transpose(1, 2), BKbar)
    return Q, Y0, M, C


def scan(M: torch.Tensor, C: torch.Tensor, first: torch.Tensor, reverse: bool = False):
    """Numba chunk scan; M, C [B,H,nc,N,N], first [B,H,N,N]. Returns (out [B,H,nc,N,N], last [B,H,N,N])."""
    B, H, nc, N, _ = M.shape
    kern, R = scan_kernel(N, acc_dtype(first.dtype), reverse)
    out = torch.empty_like(M)
    last = torch.empty_like(first)
    _launch(kern, (N // R, H, B), (N, R), M.contiguous(), C.contiguous(), first.contiguous(), out, last)
    return out, last


def outputs(Q, Y0, states, B, H, T):
    """y [B,T,H,N] from Y = Q S_cᵀ + Y0."""
    G, L, N = Q.shape
    Y = torch.baddbmm(Y0, Q, states.reshape(G, N, N).transpose(1, 2))
    nc = G // (B * H)
    return Y.reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2).contiguous()


def chunk_len_for(T: int, requested: int | None) -> int:
    if requested is not None:
        return int(requested)
    return DEFAULT_CHUNK


@torch.no_grad()
def prefill_forward(r, w, k, v, a, b, state, chunk_len: int | None = None):
    """Forward pass. Returns (y [B,T,H,N], new_state [B,H,N,N], chunk states [B,H,nc,N,N])."""
    B, T, H, N = r.shape
    L = chunk_len_for(T, chunk_len)
    acc_t = state.dtype
    P, gL = prep(r, w, k, v, a, b, L, acc_t)
    Q, Y0, M, C = chunk_algebra(P, gL)
    nc = P.shape[2]
    states, last = scan(M.view(B, H, nc, N, N), C.view(B, H, nc, N, N), state.to(acc_t))
    y = outputs(Q, Y0, states, B, H, T)
    return y, last, states


def wkv7_prefill(r, w, k, v, a, b, state, chunk_len: int | None = None):
    """Chunked WKV-7 over a sequence: (y [B,T,H,N] fp32, new_state [B,H,N,N] fp32); `state` unchanged.

    Inputs must be on a device the kernels run on (see `prefill_supported`); `wkv7` picks this
    or the torch reference by capability.
    """
    reason = prefill_supported(r, state)
    if reason is not None:
        raise ValueError(f"wkv7_prefill: {reason}")
    y, last, _ = prefill_forward(r, w, k, v, a, b, state, chunk_len)
    return y, last


def prefill_backward(saved, states, L, dy, dlast):
    """Grads of (r, w, k, v, a, b, state) given grads of y and of the final state."""
    r, w, k, v, a, b, state = saved
    B, T, H, N = r.shape
    acc_t = states.dtype
    nc = states.shape[2]
    G = B * H * nc
    with torch.enable_grad():
        ins = [x.detach().requires_grad_(True) for x in (r, w, k, v, a, b)]
        P, gL = _Prep.apply(*ins, L, acc_t)
        Q, Y0, M, C = chunk_algebra(P, gL)
    dY = torch.zeros(B, H, nc * L, N, device=r.device, dtype=acc_t)
    if dy is not None:
        dY[:, :, :T] = dy.to(acc_t).transpose(1, 2)
    dY = dY.view(G, L, N)
    S = states.view(G, N, N)
    dQ = torch.bmm(dY, S)
    dS_direct = torch.bmm(dY.transpose(1, 2), Q.detach())  # dL/dS_c through y
    if dlast is None:
        dlast = torch.zeros(B, H, N, N, device=r.device, dtype=acc_t)
    Mv = M.detach().view(B, H, nc, N, N)
    dC, dfirst = scan(Mv, dS_direct.view(B, H, nc, N, N), dlast.to(acc_t), reverse=True)
    dM = torch.bmm(S.transpose(1, 2), dC.view(G, N, N))
    grads = torch.autograd.grad([Q, Y0, M, C], ins, [dQ, dY, dM, dC.view(G, N, N)])
    return (*grads, dfirst.to(state.dtype))


class WKV7FunctionV1(torch.autograd.Function):
    """Autograd wrapper of this version (forward + exact backward), for the fwd+bwd benchmark rows."""

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
