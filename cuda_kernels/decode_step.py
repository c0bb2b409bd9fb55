"""Fused Numba-CUDA kernels of one RWKV-7 decode step (T=1): the small-vector work around the matmuls.

Per layer the step needs only three of these launches (plus the matmuls):

* `norm_mix`     x' = x + dx; h = LayerNorm(x') (x' held in registers, a block of up to 256 threads
                 per row); for each of M mix vectors: out[m] = h + (prev − h)·mix[m];
                 prev = h. The time-mix prologue (M=6: r k v w a g), the channel-mix prologue (M=1)
                 and, with a zero mix, the final norm before the head. At small batches a row is
                 split over several blocks: each reads the whole row for the statistics (from L2)
                 and writes only its slice — one block a row left a 4096-wide row to one SM, 11 µs a
                 launch on an H200. x' goes to a second buffer, since other blocks still read x.
* `time_mix_wkv` everything between the r/k/v/LoRA products and the output projection: decay, the a
                 gate, kk normalisation, the k and v corrections (v_first), the WKV state update in
                 place, group norm, the r·k bonus and the output gate. One block per (row, head),
                 the head's N×N state held in registers, per-head reductions in shared memory.

They launch on torch's current stream and allocate nothing, so a torch CUDA graph captures them.
Math in fp32 (fp64 for fp64 inputs under the simulator). The model-level reference is
`edge_rwkv.model.RWKV7.forward` with T=1; tests compare against it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._runtime import DECAY_SCALE, current_stream, kernel_array, numba_cuda, simulator

LN_EPS = 1e-5  # edge_rwkv.model.LN_EPS
GROUP_NORM_EPS = 64e-5  # edge_rwkv.model.GROUP_NORM_EPS
KK_EPS = 1e-12  # F.normalize's floor on the norm
# per batch row. 256: a block of 256 launches whatever the register count (≤ 255 a thread); with
# 1024 threads the loads-first norm_mix needed > 64 registers and failed to launch at width 4096.
# The simulator (one Python thread per CUDA thread) uses 32.
NORM_MAX_THREADS = 256
NORM_ELEMS = 4  # elements of x a thread holds in registers (fewer threads: cheaper block reductions)
FULL_MASK = 0xFFFFFFFF


def _norm_threads(C: int) -> int:
    """Threads per row: enough that each holds at most NORM_ELEMS elements (one block per row)."""
    if simulator():
        return 32
    nt = 32
    while nt * NORM_ELEMS < C and nt < NORM_MAX_THREADS:
        nt *= 2
    return nt


def _block_sum_fn(NT: int, ZERO):
    """Device function `block_sum(buf, v, t)`: the sum of v over the block's NT threads, in all of them.

    On a GPU: warp shuffles, one shared slot per warp, two barriers (a shared-memory tree took
    2·log2(NT) barriers and dominated the small kernels). The simulator has no shuffles, and blocks
    of fewer than 32 threads cannot use full-warp ones: a shared-memory tree (NT a power of two)."""
    global cuda  # a module global: the simulator swaps it for its own per-thread module
    cuda = numba_cuda()
    if simulator() or NT % 32:
        @cuda.jit(device=True)
        def block_sum(buf, v, t):
            buf[t] = v
            cuda.syncthreads()
            s = NT // 2
            while s > 0:
                if t < s:
                    buf[t] += buf[t + s]
                cuda.syncthreads()
                s //= 2
            total = buf[0]
            cuda.syncthreads()
            return total

        return block_sum

    NW = NT // 32

    @cuda.jit(device=True)
    def block_sum(buf, v, t):
        v += cuda.shfl_xor_sync(FULL_MASK, v, 16)
        v += cuda.shfl_xor_sync(FULL_MASK, v, 8)
        v += cuda.shfl_xor_sync(FULL_MASK, v, 4)
        v += cuda.shfl_xor_sync(FULL_MASK, v, 2)
        v += cuda.shfl_xor_sync(FULL_MASK, v, 1)
        if (t & 31) == 0:
            buf[t >> 5] = v
        cuda.syncthreads()
        total = ZERO
        for w in range(NW):
            total += buf[w]
        cuda.syncthreads()  # buf is reused by the next call
        return total

    return block_sum


def _round_lines(val: str, row: str, col: str, C: str, pairs: bool, ind: str) -> list[str]:
    """Round `val` (one value a lane; the warp holds 32 consecutive columns, col % 32 == lane) into the
    int8 activation layout of cuda_kernels/gemv_a8.py (xq / xs / xz of row `row`), as its quantize_x
    does, so the GEMV that reads it needs no rounding launch of its own. Every lane of the warp must
    reach these lines."""
    pos = "qk - (qk & 7) + (qk & 1) * 4 + ((qk & 7) >> 1)" if pairs else "qk"
    return [f"{ind}qv = float32({val})",
            f"{ind}amax = warp_max(abs(qv), qblk, t)",
            f"{ind}qinv = float32(127.0) / amax if amax > 0 else float32(0.0)",
            f"{ind}qi = int32(math.floor(qv * qinv + float32(0.5)))",
            f"{ind}qi = max(-127, min(127, qi))",
            f"{ind}qk = {col}",
            f"{ind}xq[{row} * {C} + {pos}] = qi",
            f"{ind}qs = warp_sum_i(qi, qblk, t)",
            f"{ind}if (t & 31) == 0:",
            f"{ind}    xs[({row} * {C} + qk) >> 5] = amax / float32(127.0)",
            f"{ind}    xz[({row} * {C} + qk) >> 5] = -8 * qs"]


def _norm_mix_source(NT: int, EPT: int, M: int, EPB: int, QM: int = 0, pairs: bool = False) -> str:
    """The norm_mix kernel, generated so that every global load is issued before any is used: each
    thread's elements are named scalars (not a local array, whose stores the compiler must order
    before later loads), and loads are unconditional at clamped indices (a load inside an `if` whose
    body also uses it costs one round trip per element: ~0.45 µs each on an H200).
    QM > 0: the first QM mixes are also rounded to int8 for the GEMVs that read them (xq/xs/xz rows
    m·B + b, see _round_lines; C a multiple of 32 so a warp's columns are one rounding block)."""
    L = ["def norm_mix_kern(x, xout, dx, add, lnw, lnb, prev, live, mix, out, xq, xs, xz):",
         # x [B,C] acc, read; xout [B,C] = x + dx (dx added when add != 0); prev [B,C] in/out (rows with
         # live[b] == 0 keep theirs); mix [M,C]; out [M,B,C]. Block (b, sl) writes elements
         # e = sl·EPB + j (j < EPB) of each thread: column t + e·NT.
         "    b = cuda.blockIdx.x",
         "    sl = cuda.blockIdx.y",
         "    qblk = b * cuda.gridDim.y + sl",
         "    keep = live[b] == 0",
         "    t = cuda.threadIdx.x",
         "    C = x.shape[1]",
         "    last = C - 1",
         f"    buf = cuda.shared.array({NT}, acc)"]
    for e in range(EPT):  # the whole row, for the statistics
        L += [f"    xa = acc(x[b, min(t + {e * NT}, last)])", f"    xd = acc(dx[b, min(t + {e * NT}, last)])",
              f"    x{e} = xa + xd if add != 0 else xa"]
    for j in range(EPB):  # the block's own columns: the value again (from L1) and the parameters
        L += [f"    e{j} = sl * {EPB} + {j}",
              f"    c{j} = t + e{j} * {NT}",
              f"    own{j} = c{j} < C and e{j} < {EPT}",
              f"    i{j} = min(c{j}, last)",
              f"    xa = acc(x[b, i{j}])", f"    xd = acc(dx[b, i{j}])",
              f"    v{j} = xa + xd if add != 0 else xa",
              f"    w{j} = acc(lnw[i{j}])",
              f"    o{j} = acc(lnb[i{j}])",
              f"    p{j} = acc(prev[b, i{j}])"]
        L += [f"    m{j}_{m} = acc(mix[{m}, i{j}])" for m in range(M)]
    for e in range(EPT):
        L.append(f"    if t + {e * NT} > last:")
        L.append(f"        x{e} = ZERO")
    L.append("    mean = block_sum(buf, " + " + ".join(f"x{e}" for e in range(EPT)) + ", t) / C")
    L.append("    s = ZERO")
    for e in range(EPT):
        L += [f"    if t + {e * NT} <= last:", f"        d = x{e} - mean", "        s += d * d"]
    L.append("    inv = 1 / math.sqrt(block_sum(buf, s, t) / C + EPS)")
    for j in range(EPB):
        L += [f"    if own{j}:",
              f"        xout[b, c{j}] = v{j}",
              f"        h = (v{j} - mean) * inv * w{j} + o{j}",
              f"        xx = p{j} - h",
              "        if not keep:",
              f"            prev[b, c{j}] = h"]
        L += [f"        out[{m}, b, c{j}] = h + xx * m{j}_{m}" for m in range(QM, M)]
        for m in range(QM):
            L += [f"        y = h + xx * m{j}_{m}", f"        out[{m}, b, c{j}] = y"]
            L += _round_lines("y", f"({m} * out.shape[1] + b)", f"c{j}", "C", pairs, " " * 8)
    return "\n".join(L) + "\n"


def _round_helpers() -> dict:
    """warp_max / warp_sum_i (shuffles on a GPU, a per-warp barrier under the simulator) and the types."""
    from numba import int32

    from ._gemv_util import helpers

    h = helpers()
    return dict(warp_max=h["warp_max"], warp_sum_i=h["warp_sum_i"], int32=int32)


@functools.lru_cache(maxsize=None)
def norm_mix_kernel(acc_name: str, NT: int, EPT: int, M: int, EPB: int, QM: int = 0, pairs: bool = False):
    """Kernel for NT threads per row, each holding EPT elements of x (C ≤ NT·EPT) in registers, and M mixes;
    a block writes EPB of each thread's elements (ceil(EPT / EPB) blocks a row); the first QM mixes
    are also rounded to int8 (int4 pairs order when `pairs`)."""
    global cuda
    cuda = numba_cuda()
    from numba import float32, float64

    acc = float64 if acc_name == "float64" else float32
    npacc = np.float64 if acc_name == "float64" else np.float32
    ns = dict(cuda=cuda, math=math, acc=acc, float32=float32, ZERO=npacc(0.0), EPS=npacc(LN_EPS),
              block_sum=_block_sum_fn(NT, npacc(0.0)), **_round_helpers())
    src = _norm_mix_source(NT, EPT, M, EPB, QM, pairs)
    exec(compile(src, f"<norm_mix {NT} {EPT} {M} {EPB} {QM} {pairs}>", "exec"), ns)
    return cuda.jit(fastmath=False)(ns["norm_mix_kern"])


THREADS_PER_ROW = 8  # threads sharing a state row in time_mix_wkv


def time_mix_threads_per_row(N: int) -> int:
    """8 threads a state row (a 512-thread block a head at N=64): fastest at every measured batch on
    an H200 (benchmarks/bench_time_mix.py: B=1 6.0 µs vs 6.9 µs with 16; B=256, H=64 403 µs vs 857 µs
    with 16 — 1024-thread blocks ran ~30 waves of barrier-bound blocks; 4 and 2 slower again)."""
    return min(THREADS_PER_ROW, N)


_TIME_MIX_VECTOR = """
    tc = min(t, N - 1)
    c = base + tc
    rj = acc(r[bi, c])
    kj = acc(k[bi, c])
    vj = acc(v[bi, c])
    wl = acc(w0[c]) + acc(lora[1, bi, c])
    al = acc(a0[c]) + acc(lora[2, bi, c])
    vl = acc(v0[c]) + acc(lora[0, bi, c])
    vf = acc(v_first[bi, c])
    kkj = acc(k_k[c])
    kaj = acc(k_a[c])
    rkj = acc(r_k[h, tc])
    lnwj = acc(lnw[c])
    lnbj = acc(lnb[c])
    gj = acc(g[bi, c])
    ag = ONE / (ONE + math.exp(-al))
    kk = kj * kkj if t < N else ZERO
    if first == 0:
        vj = vj + (vf - vj) * (ONE / (ONE + math.exp(-vl)))
    if t < N:
        if first != 0:
            v_first[bi, c] = vj
        sd[t] = math.exp(-DS / (ONE + math.exp(-wl)))
        sv[t] = vj
        sr[t] = rj
    nrm = math.sqrt(block_sum(buf, kk * kk, t))  # kk is zero at t >= N
    if nrm < KEPS:
        nrm = KEPS
    kk = kk / nrm
    kj = kj * (ONE + (ag - ONE) * kaj)
    rk = ZERO
    if t < N:
        sk[t] = kj
        sa[t] = -kk
        sb[t] = kk * ag
        rk = rj * kj * rkj
    bonus = block_sum(buf, rk, t)  # its barrier also orders the shared writes above before the state pass
"""

_TIME_MIX_OUTPUT = """
    cuda.syncthreads()
    red[i, p] = y
    cuda.syncthreads()
    y = ZERO
    if t < N:
        for q in range(TPR):
            y += red[t, q]
    mean = block_sum(buf, y, t) / N
    dev = y - mean if t < N else ZERO
    var = block_sum(buf, dev * dev, t) / N
    if t < N:
        o = (y - mean) / math.sqrt(var + GEPS) * lnwj + lnbj + bonus * sv[t]
        o = o * gj
        out[bi, c] = o
"""


def _time_mix_source(N: int, TPR: int, rounded: bool = False, pairs: bool = False) -> str:
    """time_mix_wkv with the thread's share of its state row in named scalars (CPT = N / TPR of them):
    loaded first so their latency overlaps the vector work, and — unlike a local array, whose stores
    the compiler must order before later global loads — all in flight at once.
    rounded: the output is also rounded to int8 for the output GEMV (N a multiple of 32: the threads
    t < N are whole warps, each holding one rounding block of a head)."""
    Q = range(N // TPR)
    L = ["def time_mix_kern(r, k, v, lora, g, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, first, v_first, state, live, out,"
         " xq, xs, xz):",
         "    qblk = cuda.blockIdx.x",
         # r,k,v,g [B,C]; lora [3,B,C] = (v, w, a) LoRA outputs; v_first [B,C] acc (written when first);
         # state [B,H,N,N] acc in place for rows with live[b] != 0; out [B,C] = (GroupNorm(y) + bonus)·g
         "    H = state.shape[1]",
         "    bh = cuda.blockIdx.x",
         "    bi = bh // H",
         "    keep = live[bi] == 0",
         "    h = bh - bi * H",
         "    t = cuda.threadIdx.x",
         "    base = h * N"]
    L += [f"    s{n} = cuda.shared.array(N, acc)" for n in ("r", "d", "k", "v", "a", "b")]
    L += ["    buf = cuda.shared.array(NT, acc)",
          "    red = cuda.shared.array((N, TPR), acc)",
          # state pass: row i of the head's N×N state, TPR threads a row, columns p + q·TPR
          "    i = t // TPR",
          "    p = t - i * TPR"]
    L += [f"    s{q} = state[bi, h, i, p + {q * TPR}]" for q in Q]
    L += _TIME_MIX_VECTOR.strip("\n").split("\n")
    L.append("    x = " + " + ".join(f"s{q} * sa[p + {q * TPR}]" for q in Q))
    L += ["    red[i, p] = x", "    cuda.syncthreads()", "    x = ZERO", "    for q in range(TPR):",
          "        x += red[i, q]", "    vi = sv[i]"]
    L += [f"    n{q} = s{q} * sd[p + {q * TPR}] + x * sb[p + {q * TPR}] + vi * sk[p + {q * TPR}]" for q in Q]
    L.append("    y = " + " + ".join(f"n{q} * sr[p + {q * TPR}]" for q in Q))
    L.append("    if not keep:")
    L += [f"        state[bi, h, i, p + {q * TPR}] = n{q}" for q in Q]
    L += _TIME_MIX_OUTPUT.strip("\n").split("\n")
    if rounded:
        L += _round_lines("o", "bi", "c", "(H * N)", pairs, " " * 8)
    return "\n".join(L) + "\n"


@functools.lru_cache(maxsize=None)
def time_mix_wkv_kernel(N: int, acc_name: str, TPR: int, rounded: bool = False, pairs: bool = False):
    global cuda
    cuda = numba_cuda()
    from numba import float32, float64

    acc = float64 if acc_name == "float64" else float32
    npacc = np.float64 if acc_name == "float64" else np.float32
    NT = N * TPR
    ZERO = npacc(0.0)
    ns = dict(cuda=cuda, math=math, acc=acc, float32=float32, N=N, TPR=TPR, NT=NT, ZERO=ZERO, ONE=npacc(1.0),
              DS=npacc(DECAY_SCALE), GEPS=npacc(GROUP_NORM_EPS), KEPS=npacc(KK_EPS),
              block_sum=_block_sum_fn(NT, ZERO), **_round_helpers())  # threads at or above N contribute zeros
    src = _time_mix_source(N, TPR, rounded, pairs)
    exec(compile(src, f"<time_mix_wkv {N} {TPR} {rounded} {pairs}>", "exec"), ns)
    return cuda.jit(fastmath=False)(ns["time_mix_kern"]), NT


def _acc_name(t: torch.Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


ROW_BLOCKS_TARGET = 128  # blocks a norm_mix launch aims for at small batches (an H200 has 132 SMs)


def norm_mix_split(B: int, EPT: int) -> int:
    """Elements of each thread one block writes: all of them (one block a row) once B rows fill the
    GPU, else few enough that B · blocks-per-row reaches ROW_BLOCKS_TARGET."""
    per_row = max(1, min(EPT, ROW_BLOCKS_TARGET // max(B, 1)))
    return -(-EPT // per_row)


def _rounded_arrays(rx, rows: int, C: int) -> tuple[list, bool]:
    """The kernel arrays of a gemv_a8.RoundedX that takes `rows` rows of C values (placeholders when rx is
    None: the kernel variant without rounding never touches them)."""
    if rx is None:
        return [_placeholder(torch.int8), _placeholder(torch.float32), _placeholder(torch.int32)], False
    if rx.rows != rows or rx.K != C or C % 32:
        raise ValueError(f"rounded x buffers hold [{rx.rows}, {rx.K}], the kernel writes [{rows}, {C}] "
                         "(C a multiple of 32)")
    return [kernel_array(t) for t in (rx.xq, rx.xs, rx.xz)], rx.pairs


_PLACEHOLDERS: dict = {}


def _placeholder(dtype: torch.dtype):
    """A one-element array on the kernels' device for unused arguments (cached: no allocation while
    a CUDA graph is being captured after the first use)."""
    dev = "cpu" if simulator() else "cuda"
    key = (dtype, dev, None if dev == "cpu" else torch.cuda.current_device())
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=dev)
    return kernel_array(_PLACEHOLDERS[key])


def norm_mix(x, xout, dx, lnw, lnb, prev, live, mix, out, add: bool, rounded=None, rounded_mixes: int = 0) -> None:
    """xout = x + dx (x when not add); h = LN(xout); out[m] = h + (prev − h)·mix[m]; prev = h where
    live[b]. xout must not be x (blocks of one row read all of x while others write their slices).
    rounded: a gemv_a8.RoundedX of rounded_mixes·B rows that also receives out[:rounded_mixes] rounded
    to int8 (rows m·B + b), for the GEMVs that read those mixes."""
    B, C = x.shape
    nt = _norm_threads(C)
    ept = -(-C // nt)
    epb = norm_mix_split(B, ept)
    qm = rounded_mixes if rounded is not None else 0
    rarrays, pairs = _rounded_arrays(rounded, qm * B, C)
    kern = norm_mix_kernel(_acc_name(x), nt, ept, mix.shape[0], epb, qm, pairs)
    arrays = [kernel_array(t) for t in (x, xout, dx)] + [np.int32(1 if add else 0)] + \
             [kernel_array(t) for t in (lnw, lnb, prev, live, mix, out)] + rarrays
    kern[(B, -(-ept // epb)), nt, current_stream()](*arrays)


def time_mix_wkv(r, k, v, lora, g, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, first: bool, v_first, state, live,
                 out, threads_per_row: int | None = None, rounded=None) -> None:
    """In place: state advanced one token where live[b], out = the gated, normalised WKV output.
    `threads_per_row` overrides time_mix_threads_per_row (tests compare both layouts).
    rounded: a gemv_a8.RoundedX of B rows that also receives out rounded to int8 (head size a
    multiple of 32)."""
    B, H, N = state.shape[0], state.shape[1], state.shape[-1]
    tpr = threads_per_row or time_mix_threads_per_row(N)
    if rounded is not None and N % 32:
        raise ValueError(f"time_mix_wkv rounds its output for head sizes that are multiples of 32, not {N}")
    rarrays, pairs = _rounded_arrays(rounded, B, H * N)
    kern, nthreads = time_mix_wkv_kernel(N, _acc_name(state), tpr, rounded is not None, pairs)
    arrays = [kernel_array(t) for t in (r, k, v, lora, g, w0, a0, v0, k_k, k_a, r_k, lnw, lnb)] + \
             [np.int32(1 if first else 0)] + [kernel_array(t) for t in (v_first, state, live, out)] + rarrays
    kern[B * H, nthreads, current_stream()](*arrays)
