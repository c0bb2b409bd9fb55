"""WKV-7 chunked prefill (parallel in time): Numba-CUDA kernels around tensor-core cuBLAS products.

Per head, with S_0 the state entering a chunk of L steps and γ_t = Π_{u≤t} d_u (decay within the chunk):

    x_t := S_{t-1} a_t
    S_t  = S_0 Γ_t + Σ_{s≤t} [x_s (b_s⊙γ_t/γ_s)ᵀ + v_s (k_s⊙γ_t/γ_s)ᵀ]
    y_t  = S_t r_t

Every γ ratio is split around an anchor, the chunk's middle cumulative log-decay m (per channel): with
lc_t the within-chunk cumulative log-decay, the prep forms the L×N "relative" rows

    Â_t = a_t⊙e^{lc_{t-1}-m},  R̂_t = r_t⊙e^{lc_t-m},  B̂_t = b_t⊙e^{m-lc_t},  K̂_t = k_t⊙e^{m-lc_t}

(each factor within e^{±0.31·L} whatever the decays) and two per-channel vectors D_m = e^{m} and
D_e = e^{lc_{L-1}-m}. Then, stacking rows over t:

    A = [Â;R̂]·[B̂;K̂]ᵀ = [[A_ab, A_ak], [A_rb, A_rk]]   (causal: strict lower for Â rows, lower for R̂)
    X = (I - A_ab)⁻¹,  W' = X Â,  U = X A_ak V                  (x_t = rows of (W' D_m) S_0ᵀ + U)
    Y   = Q' (S_0 D_m)ᵀ + Y0,      Q' = R̂ + A_rb W',  Y0 = A_rb U + A_rk V
    S_L = S_0 M + C,               M = D_m (W'ᵀ B̂ + I) D_e,  C = (Uᵀ B̂ + Vᵀ K̂) D_e

The anchor cancels from every result, so the backward treats m as a constant. The diagonal scalings
never get their own pass: the scan forms M and C from M' = W'ᵀ B̂, C' = Uᵀ B̂ + Vᵀ K̂ and D_m, D_e as
it loads them, and hands out the chunk states already scaled, S̃_c = S_c D_m, which is what the
output product (and the backward) need.

Work split: `prep` (Numba: decay, cumulative log-decay, the four scaled copies, V in the product
dtype) → A (one cuBLAS product) → `causal_inverse` (Numba, a block a chunk: the causal masks and X by
forward substitution in shared memory, written over A_ab) → W', U, Q', Y0, M', C' (cuBLAS) → `scan`
(Numba, the sequential S_{c+1} = S_c M_c + C_c, state rows split over blocks, tiled in shared
memory) → Y = Q' S̃_cᵀ + Y0 (cuBLAS). The backward mirrors it: the reverse scan in Numba, cuBLAS
products through torch autograd (the inverse's adjoint is Xᵀ G Xᵀ), the prep's adjoint in Numba.

Precision: the prep, the inverse and the scan accumulate in fp32 (fp64 for fp64 state). The chunk
products run on tensor cores in TF32 (fp32 range, so the anchored factors fit, 10-bit mantissa, fp32
accumulate) when the inputs are fp16/bf16: with TF32 rounding emulated, y and the state are ~4e-4 from
the fp64 recurrence (T=2100, H=4, chunks 16–64), the gradients ≤1.3e-3, the decay logit's up to 2.9e-3
at strong decays (a sum of cancelling terms; 3e-4 with IEEE backward products), inside the tests' 2e-3
(forward) / 5e-3 (gradients). fp32 inputs run at the caller's float32 matmul precision: IEEE by
default (~4e-7), TF32 where the caller allows it (training does). bf16 products were measured at
3e-3 on the forward alone and are not used.
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from ._runtime import (
    DECAY_SCALE,
    acc_dtype,
    current_stream,
    kernel_array,
    kernel_device_ok,
    numba_cuda,
)

cuda = None  # numba.cuda, bound on first kernel build (a module global so the simulator can swap it)
SUPPORTED_N = (4, 8, 16, 32, 64)
MAX_CHUNK = 64
DEFAULT_CHUNK = 64  # the first version's fastest of 16/32/64 on an H200 for T ≥ 1024; `bench_wkv.py --chunk` sweeps it
# prep output slots [B, H, nc, NSLOT, L, N]; the pairs that feed one product stay adjacent: [Â;R̂]·[B̂;K̂]ᵀ
_SLOTS = ("A", "R", "B", "K", "V")
NSLOT = len(_SLOTS)
# per-chunk, per-channel scalings [B, H, nc, 2, N]: D_m = e^{m}, D_e = e^{lc_end - m}
_SCALES = ("Dm", "De")


def _bind():
    global cuda
    cuda = numba_cuda()
    return cuda


def _np(acc):
    return np.float64 if acc.bitwidth == 64 else np.float32


@functools.lru_cache(maxsize=None)
def _loaders(acc):
    """(plain, bf16) device functions that read one input element as `acc`.

    bf16 tensors reach the kernels as their raw int16 bits (numba has no bf16 array type), decoded
    here, so bf16 inputs are read once instead of first being widened to fp32 copies.
    """
    _bind()
    from numba import int32  # noqa: PLC0415  (numba is optional: imported with the first kernel build)

    npacc = _np(acc)
    INF, NAN = npacc(np.inf), npacc(np.nan)
    # value = significand · 2^(e-134) with significand = 128 + mantissa (e ≥ 1) or the mantissa (e = 0)
    SCALE = np.array([2.0 ** (max(e, 1) - 134) for e in range(256)], dtype=npacc)

    @cuda.jit(device=True, inline=True)
    def plain(x):
        return acc(x)

    @cuda.jit(device=True, inline=True)
    def from_bf16(u):
        scale = cuda.const.array_like(SCALE)
        bits = int32(u) & 0xFFFF
        e = (bits >> 7) & 0xFF
        mant = bits & 0x7F
        if e == 255:
            mag = INF if mant == 0 else NAN
        else:
            mag = acc(mant + (128 if e > 0 else 0)) * scale[e]
        return -mag if bits & 0x8000 else mag

    return plain, from_bf16


def _operand(x: torch.Tensor) -> torch.Tensor:
    """An input as the prep kernels take it: contiguous; bf16 as its int16 bits (see `_loaders`)."""
    x = x.contiguous()
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


def _bf16_flags(*xs) -> tuple:
    return tuple(x.dtype == torch.bfloat16 for x in xs)


@functools.lru_cache(maxsize=None)
def prep_kernel(N: int, L: int, acc, bf16: tuple):
    """Per (chunk, head, batch) block, thread j: the anchored copies of a, r, b, k, V and D_m, D_e.

    `bf16` flags which of r, w, k, v, a, b arrive as bf16 bits.
    """
    _bind()
    ld_r, ld_w, ld_k, ld_v, ld_a, ld_b = (_loaders(acc)[f] for f in bf16)
    npacc = _np(acc)
    DS, ONE, ZERO = npacc(DECAY_SCALE), npacc(1.0), npacc(0.0)
    MID = (L - 1) // 2

    @cuda.jit(fastmath=False)
    def kern(r, w, k, v, a, b, P, E):
        # inputs [B, T, H, N]; P [B, H, nc, NSLOT, L, N]; E [B, H, nc, 2, N]
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
                run += -DS / (ONE + math.exp(-ld_w(w[bi, tt, h, j])))
            lcs[t] = run
        m = lcs[MID]
        prev = ZERO
        for t in range(L):
            tt = c * L + t
            lc = lcs[t]
            if tt < T:
                rv = ld_r(r[bi, tt, h, j])
                kv = ld_k(k[bi, tt, h, j])
                vv = ld_v(v[bi, tt, h, j])
                av = ld_a(a[bi, tt, h, j])
                bv = ld_b(b[bi, tt, h, j])
            else:
                rv = kv = vv = av = bv = ZERO
            eK = math.exp(m - lc)
            P[bi, h, c, 0, t, j] = av * math.exp(prev - m)
            P[bi, h, c, 1, t, j] = rv * math.exp(lc - m)
            P[bi, h, c, 2, t, j] = bv * eK
            P[bi, h, c, 3, t, j] = kv * eK
            P[bi, h, c, 4, t, j] = vv
            prev = lc
        E[bi, h, c, 0, j] = math.exp(m)
        E[bi, h, c, 1, j] = math.exp(lcs[L - 1] - m)

    return kern


@functools.lru_cache(maxsize=None)
def prep_bwd_kernel(N: int, L: int, acc, bf16: tuple):
    """Adjoint of `prep_kernel` with the anchor m held constant (it cancels from every result).

    Grads of r, w (logit), k, a, b from those of the slots and of D_e (D_m depends on m alone);
    `bf16` flags which of r, w, k, a, b arrive as bf16 bits.
    """
    _bind()
    ld_r, ld_w, ld_k, ld_a, ld_b = (_loaders(acc)[f] for f in bf16)
    npacc = _np(acc)
    DS, ONE, ZERO = npacc(DECAY_SCALE), npacc(1.0), npacc(0.0)
    MID = (L - 1) // 2

    @cuda.jit(fastmath=False)
    def kern(r, w, k, a, b, dP, dE, dr, dw, dk, da, db):
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
                run += -DS / (ONE + math.exp(-ld_w(w[bi, tt, h, j])))
            lcs[t] = run
        m = lcs[MID]
        # reverse pass: G_t = d/d lc_t ; d/d ld_t = Σ_{t'≥t} G_t'. D_e = e^{lc_end - m} feeds G_{L-1}.
        rsum = dE[bi, h, c, 1, j] * math.exp(lcs[L - 1] - m)
        carry = ZERO  # contribution to G_t from slot A at t+1 (which uses lc_t)
        for tb in range(L):
            t = L - 1 - tb
            tt = c * L + t
            if tt >= T:
                continue  # padded steps have zero inputs and zero decay
            lc = lcs[t]
            prev = lcs[t - 1] if t > 0 else ZERO
            rv = ld_r(r[bi, tt, h, j])
            kv = ld_k(k[bi, tt, h, j])
            av = ld_a(a[bi, tt, h, j])
            bv = ld_b(b[bi, tt, h, j])
            eK = math.exp(m - lc)
            ga = dP[bi, h, c, 0, t, j] * math.exp(prev - m)
            gr = dP[bi, h, c, 1, t, j] * math.exp(lc - m)
            gb = dP[bi, h, c, 2, t, j] * eK
            gk = dP[bi, h, c, 3, t, j] * eK
            rsum += rv * gr - kv * gk - bv * gb + carry
            carry = av * ga
            sg = ONE / (ONE + math.exp(-ld_w(w[bi, tt, h, j])))
            dw[bi, tt, h, j] = -rsum * DS * sg * (ONE - sg)
            dr[bi, tt, h, j] = gr
            dk[bi, tt, h, j] = gk
            da[bi, tt, h, j] = ga
            db[bi, tt, h, j] = gb

    return kern


@functools.lru_cache(maxsize=None)
def causal_inverse_kernel(L: int, acc):
    """In place on A [G, 2L, 2L] = [Â;R̂]·[B̂;K̂]ᵀ of each chunk (one block a chunk, thread j a column).

    Zeroes what the causal structure excludes (A_ak strictly lower; A_rb, A_rk lower with the
    diagonal) and overwrites the A_ab block with X = (I - tril(A_ab, -1))⁻¹, unit lower-triangular,
    by forward substitution: X[i, j] = Σ_{j≤s<i} A_ab[i, s] X[s, j]. Thread j owns column j of X, so
    the substitution needs no barrier. One L×L shared tile holds both: A_ab in its strict lower
    triangle, Xᵀ in its strict upper one (X[s, j] at [j, s], s > j); a warp's reads of either are
    free of bank conflicts.
    """
    _bind()
    npacc = _np(acc)
    ONE, ZERO = npacc(1.0), npacc(0.0)

    @cuda.jit(fastmath=False)
    def kern(A):
        g = cuda.blockIdx.x
        j = cuda.threadIdx.x
        Tsh = cuda.shared.array((L, L), acc)
        for i in range(L):
            if j < i:
                Tsh[i, j] = A[g, i, j]
        cuda.syncthreads()
        for i in range(L):
            if i < j:
                x = ZERO
            elif i == j:
                x = ONE
            else:
                x = Tsh[i, j]  # s = j: X[j, j] = 1
                for s in range(j + 1, i):
                    x += Tsh[i, s] * Tsh[j, s]
                Tsh[j, i] = x
            A[g, i, j] = x
            if j >= i:
                A[g, i, L + j] = ZERO
            if j > i:
                A[g, L + i, j] = ZERO
                A[g, L + i, L + j] = ZERO

    return kern


def _scan_layout(N: int):
    """(R, TI, TX, TY): R state rows per block, each thread a TI × (N/TX) tile, TX × TY threads."""
    R = min(16, N)
    TI = 2
    TX = min(32, N)
    return R, TI, TX, R // TI


@functools.lru_cache(maxsize=None)
def scan_kernel(N: int, acc, reverse: bool):
    """Sequential pass over chunks, rows of the state split over blocks (R rows per block).

    The chunk maps are formed on load: M_c = D_m (M'_c + I) D_e, and C_c from the given C'_c.
    forward : C_c = C'_c D_e; out[c] = S_c D_m(c) (the state entering chunk c, scaled for the output
              product); S_{c+1} = S_c M_c + C_c;  last = S_nc
    reverse : C_c = C'_c D_m; g = last_in; for c = nc-1..0: out[c] = g; g = g M_cᵀ + C_c;  last = g
              (the adjoint: C'_c D_m = dYᵀ Q' D_m is dL/dS_c from the outputs, out[c] = dL/dS_{c+1} = dL/dC_c)
    Each thread owns a TI×TJ register tile of the block's R×N rows (columns tx + q·TX, so a warp's
    shared-memory reads are one broadcast and one contiguous row), which halves the shared-memory
    traffic per multiply-add against one output a thread. M_c is staged in shared memory (padded);
    the next chunk's M and C are loaded into registers while the current one computes.
    """
    _bind()
    R, TI, TX, TY = _scan_layout(N)
    TJ = N // TX
    NT = TX * TY
    MPT = N * N // NT  # M elements each thread loads per chunk
    NP1 = N + 1  # padded row of the staged M (shared shapes must be compile-time constants)
    ONE, ZERO = _np(acc)(1.0), _np(acc)(0.0)
    CSCALE = 0 if reverse else 1  # C's columns are scaled by D_m (reverse) or D_e (forward)

    @cuda.jit(fastmath=False)
    def kern(Mp, C, E, first, out, last):
        # Mp, C, out: [B, H, nc, N, N]; E: [B, H, nc, 2, N]; first, last: [B, H, N, N]
        g = cuda.blockIdx.x
        h = cuda.blockIdx.y
        bi = cuda.blockIdx.z
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TX + tx
        nc = Mp.shape[2]
        Ssh = cuda.shared.array((R, N), acc)
        Msh = cuda.shared.array((N, NP1), acc)
        mreg = cuda.local.array(MPT, acc)
        s = cuda.local.array((TI, TJ), acc)
        cn_ = cuda.local.array((TI, TJ), acc)
        for p in range(TI):
            for q in range(TJ):
                s[p, q] = acc(first[bi, h, g * R + ty * TI + p, tx + q * TX])
                Ssh[ty * TI + p, tx + q * TX] = s[p, q]
        c0 = nc - 1 if reverse else 0
        for f in range(MPT):
            rr = (f * NT + tid) // N
            cc = (f * NT + tid) % N
            mreg[f] = E[bi, h, c0, 0, rr] * (Mp[bi, h, c0, rr, cc] + (ONE if rr == cc else ZERO)) * E[bi, h, c0, 1, cc]
        for p in range(TI):
            for q in range(TJ):
                cv = acc(C[bi, h, c0, g * R + ty * TI + p, tx + q * TX])
                cn_[p, q] = cv * E[bi, h, c0, CSCALE, tx + q * TX]
        for step in range(nc):
            c = nc - 1 - step if reverse else step
            cuda.syncthreads()  # previous compute done with Msh and Ssh
            for f in range(MPT):
                rr = (f * NT + tid) // N
                cc = (f * NT + tid) % N
                if reverse:
                    Msh[cc, rr] = mreg[f]  # transposed
                else:
                    Msh[rr, cc] = mreg[f]
            for p in range(TI):
                for q in range(TJ):
                    i = g * R + ty * TI + p
                    j = tx + q * TX
                    Ssh[ty * TI + p, j] = s[p, q]
                    if reverse:
                        out[bi, h, c, i, j] = s[p, q]
                    else:
                        out[bi, h, c, i, j] = s[p, q] * E[bi, h, c, 0, j]
                    s[p, q] = cn_[p, q]  # accumulate onto C_c
            if step + 1 < nc:  # the next chunk's M and C load while this one computes
                cn = c - 1 if reverse else c + 1
                for f in range(MPT):
                    rr = (f * NT + tid) // N
                    cc = (f * NT + tid) % N
                    mreg[f] = E[bi, h, cn, 0, rr] * (Mp[bi, h, cn, rr, cc] + (ONE if rr == cc else ZERO)) * E[bi, h, cn, 1, cc]
                for p in range(TI):
                    for q in range(TJ):
                        cv = acc(C[bi, h, cn, g * R + ty * TI + p, tx + q * TX])
                        cn_[p, q] = cv * E[bi, h, cn, CSCALE, tx + q * TX]
            cuda.syncthreads()
            for kk in range(N):
                for p in range(TI):
                    sv = Ssh[ty * TI + p, kk]
                    for q in range(TJ):
                        s[p, q] += sv * Msh[kk, tx + q * TX]
        for p in range(TI):
            for q in range(TJ):
                last[bi, h, g * R + ty * TI + p, tx + q * TX] = s[p, q]

    return kern


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
    """Run the prep kernel. Returns P [B,H,nc,NSLOT,L,N] and E [B,H,nc,2,N] (D_m, D_e) in `acc_torch`."""
    B, T, H, N = r.shape
    nc = -(-T // L)
    P = torch.empty(B, H, nc, NSLOT, L, N, device=r.device, dtype=acc_torch)
    E = torch.empty(B, H, nc, 2, N, device=r.device, dtype=acc_torch)
    xs = (r, w, k, v, a, b)
    _launch(prep_kernel(N, L, acc_dtype(acc_torch), _bf16_flags(*xs)), (nc, H, B), N, *map(_operand, xs), P, E)
    return P, E


class _Prep(torch.autograd.Function):
    """`prep` as an autograd node (its backward is the adjoint kernel)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, L, acc_torch):
        P, E = prep(r, w, k, v, a, b, L, acc_torch)
        ctx.save_for_backward(r, w, k, a, b)
        ctx.L = L
        ctx.vdtype = v.dtype
        return P, E

    @staticmethod
    def backward(ctx, dP, dE):
        r, w, k, a, b = ctx.saved_tensors
        L = ctx.L
        B, T, H, N = r.shape
        nc = dP.shape[2]
        acc_t = dP.dtype
        dP = dP.contiguous()
        dE = dE.contiguous()
        grads = [torch.empty(B, T, H, N, device=r.device, dtype=acc_t) for _ in range(5)]  # every step written
        xs = (r, w, k, a, b)
        _launch(prep_bwd_kernel(N, L, acc_dtype(acc_t), _bf16_flags(*xs)), (nc, H, B), N, *map(_operand, xs),
                dP, dE, *grads)
        dr, dw, dk, da, db = grads
        dv = dP[:, :, :, 4].reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2)
        cast = lambda g, like: g.to(like.dtype)  # noqa: E731
        return (cast(dr, r), cast(dw, w), cast(dk, k), dv.to(ctx.vdtype), cast(da, a), cast(db, b), None, None)


@functools.lru_cache(maxsize=None)
def _masks(L: int, dtype: torch.dtype, device_str: str):
    """Mask of the 2L×2L product [Â;R̂]·[B̂;K̂]ᵀ: strict lower for the Â rows, lower for the R̂ rows.

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


class _CausalInverse(torch.autograd.Function):
    """`causal_inverse_kernel` as an autograd node (in place on the product A)."""

    @staticmethod
    def forward(ctx, A, L):
        _launch(causal_inverse_kernel(L, acc_dtype(A.dtype)), A.shape[0], L, A)
        ctx.mark_dirty(A)
        ctx.save_for_backward(A)
        ctx.L = L
        return A

    @staticmethod
    def backward(ctx, grad):
        (A,) = ctx.saved_tensors
        L = ctx.L
        Xt = A[:, :L, :L].transpose(1, 2)
        dA = grad * _masks(L, grad.dtype, str(grad.device))
        # X = (I - A_ab)⁻¹ ⇒ dX = X dA_ab X, so the adjoint is Xᵀ G Xᵀ on the strictly lower part
        dA[:, :L, :L] = torch.bmm(torch.bmm(Xt, grad[:, :L, :L]), Xt).tril_(-1)
        return dA, None


@contextlib.contextmanager
def product_precision(x: torch.Tensor):
    """cuBLAS fp32 products in TF32 (tensor cores) for half-precision inputs; else the caller's setting.

    fp32 inputs run at torch's float32 matmul precision as the caller left it ("highest", IEEE, by
    default; training allows TF32). Switched through torch's float32 matmul precision, which keeps its
    legacy and new TF32 flags consistent (setting only `matmul.fp32_precision` leaves them mixed, and
    cuBLAS calls then raise), and restored on exit. CPU tensors (the simulator) are left alone. See the
    module docstring for the measured error.
    """
    previous = torch.get_float32_matmul_precision() if x.device.type == "cuda" else None
    if previous != "highest" or x.dtype not in (torch.float16, torch.bfloat16):
        yield
        return
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def chunk_algebra(P: torch.Tensor):
    """Dense per-chunk products. Returns Q', Y0 [G,L,N] and M', C' [G,N,N] (G = B·H·nc).

    Differentiable by torch autograd (used again, recomputed, in the backward).
    """
    parts = _chunk_inverse_products(P)
    return (*_output_maps(*parts), *_state_maps(*parts))


def _chunk_inverse_products(P: torch.Tensor):
    """A (masked, X over A_ab), W' = X Â, U = X A_ak V, A_rk V and the operand views the maps need."""
    B, H, nc, _, L, N = P.shape
    G = B * H * nc
    Pv = P.reshape(G, NSLOT, L, N)
    AR = Pv[:, 0:2].reshape(G, 2 * L, N)
    BK = Pv[:, 2:4].reshape(G, 2 * L, N)
    Ah, Rh, Bh, Kh, V = Pv.unbind(1)
    A = _CausalInverse.apply(torch.bmm(AR, BK.transpose(1, 2)), L)
    X, Arb = A[:, :L, :L], A[:, L:, :L]
    AkV = torch.bmm(A[:, :, L:], V)  # [A_ak V; A_rk V]
    W = torch.bmm(X, Ah)
    U = torch.bmm(X, AkV[:, :L])
    return Arb, AkV[:, L:], W, U, Rh, Bh, Kh, V


def _state_maps(Arb, ArkV, W, U, Rh, Bh, Kh, V):
    """M' = W'ᵀ B̂ and C' = Uᵀ B̂ + Vᵀ K̂ [G,N,N] (what the scan needs)."""
    M = torch.bmm(W.transpose(1, 2), Bh)
    C = torch.baddbmm(torch.bmm(V.transpose(1, 2), Kh), U.transpose(1, 2), Bh)
    return M, C


def _output_maps(Arb, ArkV, W, U, Rh, Bh, Kh, V):
    """Q' = R̂ + A_rb W' and Y0 = A_rb U + A_rk V [G,L,N] (what the outputs need besides the states)."""
    return torch.baddbmm(Rh, Arb, W), torch.baddbmm(ArkV, Arb, U)


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """A second CUDA stream for `device` (the scan runs on it beside the output products); None off CUDA."""
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


def scan(Mp: torch.Tensor, C: torch.Tensor, E: torch.Tensor, first: torch.Tensor, reverse: bool = False):
    """Numba chunk scan; Mp, C [B,H,nc,N,N], E [B,H,nc,2,N], first [B,H,N,N] → (out [B,H,nc,N,N], last)."""
    B, H, nc, N, _ = Mp.shape
    kern = scan_kernel(N, acc_dtype(first.dtype), reverse)
    R, _, TX, TY = _scan_layout(N)
    out = torch.empty_like(Mp)
    last = torch.empty_like(first)
    _launch(kern, (N // R, H, B), (TX, TY), Mp.contiguous(), C.contiguous(), E.contiguous(), first.contiguous(),
            out, last)
    return out, last


def outputs(Q, Y0, states, B, H, T):
    """y [B,T,H,N] from Y = Q' S̃_cᵀ + Y0."""
    G, L, N = Q.shape
    Y = torch.baddbmm(Y0, Q, states.reshape(G, N, N).transpose(1, 2))
    nc = G // (B * H)
    return Y.reshape(B, H, nc * L, N)[:, :, :T].transpose(1, 2).contiguous()


def chunk_len_for(T: int, requested: int | None) -> int:
    if requested is None:
        return DEFAULT_CHUNK
    L = int(requested)
    if not 1 <= L <= MAX_CHUNK:
        raise ValueError(f"WKV chunk length {requested} outside 1..{MAX_CHUNK} (the causal inverse holds an L×L "
                         "tile in shared memory, one thread a column)")
    return L


@torch.no_grad()
def prefill_forward(r, w, k, v, a, b, state, chunk_len: int | None = None):
    """Forward pass. Returns (y [B,T,H,N], new_state [B,H,N,N], scaled chunk states S̃ [B,H,nc,N,N])."""
    B, T, H, N = r.shape
    L = chunk_len_for(T, chunk_len)
    acc_t = state.dtype
    with product_precision(r):
        P, E = prep(r, w, k, v, a, b, L, acc_t)
        nc = P.shape[2]
        parts = _chunk_inverse_products(P)
        M, C = _state_maps(*parts)
        first = state.to(acc_t)
        side = _side_stream(r.device)
        if side is None:
            states, last = scan(M.view(B, H, nc, N, N), C.view(B, H, nc, N, N), E, first)
            Q, Y0 = _output_maps(*parts)
        else:
            # the sequential scan (few blocks, latency-bound) runs beside the output products
            # (memory-bound); every tensor it touches stays referenced here until the join
            main = torch.cuda.current_stream(r.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                states, last = scan(M.view(B, H, nc, N, N), C.view(B, H, nc, N, N), E, first)
            Q, Y0 = _output_maps(*parts)
            main.wait_stream(side)
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
    with product_precision(saved[0]):
        return _prefill_backward(saved, states, L, dy, dlast)


def _prefill_backward(saved, states, L, dy, dlast):
    r, w, k, v, a, b, state = saved
    B, T, H, N = r.shape
    acc_t = states.dtype
    nc = states.shape[2]
    G = B * H * nc
    with torch.enable_grad():
        ins = [x.detach().requires_grad_(True) for x in (r, w, k, v, a, b)]
        P, E = _Prep.apply(*ins, L, acc_t)
        Q, Y0, Mp, Cp = chunk_algebra(P)
        De = E[:, :, :, 1].reshape(G, 1, N)
        # M = D_m M̃ with M̃ = (M' + I) D_e; D_m (the anchor's) is held constant
        Mt = (Mp + torch.eye(N, device=r.device, dtype=acc_t)) * De
        C = Cp * De
    dY = torch.empty(B, H, nc * L, N, device=r.device, dtype=acc_t)
    dY[:, :, T:] = 0
    if dy is None:
        dY[:, :, :T] = 0
    else:
        dY[:, :, :T] = dy.transpose(1, 2)
    dY = dY.view(G, L, N)
    St = states.view(G, N, N)  # S̃_c = S_c D_m
    dQ = torch.bmm(dY, St)
    dS_direct = torch.bmm(dY.transpose(1, 2), Q.detach())  # dL/dS_c through y = dYᵀ Q' D_m (D_m: in the scan)
    if dlast is None:
        dlast = torch.zeros(B, H, N, N, device=r.device, dtype=acc_t)
    dC, dfirst = scan(Mp.detach().view(B, H, nc, N, N), dS_direct.view(B, H, nc, N, N), E.detach(),
                      dlast.to(acc_t), reverse=True)
    dC = dC.view(G, N, N)
    dMt = torch.bmm(St.transpose(1, 2), dC)  # D_m dM = D_m S_cᵀ dC = S̃ᵀ dC
    grads = torch.autograd.grad([Q, Y0, Mt, C], ins, [dQ, dY, dMt, dC])
    return (*grads, dfirst.to(state.dtype))
