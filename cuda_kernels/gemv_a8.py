"""Int8-activation GEMVs for decode (W4A8 / W8A8): out[M, N] = x[M, K] @ Wᵀ with integer dot products.

Why: the fp32-activation kernels (gemv_int4.py, gemv_int8.py) turn every weight into an fp32
number and multiply it in fp32 — about three instructions a weight, which makes int4 decode
instruction-bound at ~30 % of the memory bandwidth. Here the activations are rounded to int8 once
per call, in blocks of 32 with one fp32 scale each (``quantize_x``: one launch, M×K values), and the
weights stay integers: ``dp4a`` multiplies four int8 (or offset-binary nibble) pairs and accumulates
in int32 in one instruction, so a 32-weight block costs ~8 dp4a + ~12 bit ops + one fp32 fma.

Numerics: exact integer sums inside each 32-block; the only approximation beyond the weight format
is the int8 rounding of x (relative error ≤ 1/254 of a block's largest |x|), as in common W4A8 /
W8A8 decode kernels. ``gemv_a8_reference`` reproduces it in torch; tests bound both the kernel vs
that reference (tight) and vs the fp64 product with unrounded x (the activation-rounding error).

Layouts (``quantize_x``), per row of x, blocks of 32 along K:
* ``xq`` int8 [M, K]. For int4 weights each 8 values k..k+7 are stored as (k, k+2, k+4, k+6,
  k+1, k+3, k+5, k+7): a packed int4 word holds the even k in its low nibbles, so ``w & 0x0F0F0F0F``
  lines up with the first int32 of x and ``(w >> 4) & 0x0F0F0F0F`` with the second.
  For int8 weights the order is natural.
* ``xs`` fp32 [M, K/32]: block scale (max |x| / 127).
* ``xz`` int32 [M, K/32]: -8 × (sum of the block's int8 x) — a nibble n holds q + 8, so starting
  the int4 accumulator there gives Σ q·x directly. Unused for int8 weights.

Launches run on torch's current stream with no allocation or host sync inside: graph-capturable.
Numba is imported lazily; importing this module needs neither numba nor a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _gemv_util as U

BLOCK = 32  # x values per scale; also the weights one lane reduces per step
WARPS_PER_BLOCK = 4  # of the x-rounding launch
MAX_ROWS = 8


# ---------------------------------------------------------------------------------------- quantize x

def quantize_x_source(pairs: bool) -> str:
    pos = "base + (k8 & 1) * 4 + (k8 >> 1)" if pairs else "k"
    return f"""
import math


def quantize_x_kernel(x, xq, xs, xz, M, K):
    # one warp per 32-value block of one row; lane = value
    lane = cuda.threadIdx.x & 31
    blk = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> 5
    nb = K >> 5
    if blk >= M * nb:
        return
    m = blk // nb
    k = (blk - m * nb) * 32 + lane
    v = float32(x[m * K + k])
    amax = warp_max(abs(v), cuda.blockIdx.x, cuda.threadIdx.x)
    inv = float32(127.0) / amax if amax > 0 else float32(0.0)
    q = int32(math.floor(v * inv + float32(0.5)))
    q = max(-127, min(127, q))
    k8 = k & 7
    base = k - k8
    xq[m * K + {pos}] = q
    s = warp_sum_i(q, cuda.blockIdx.x, cuda.threadIdx.x)
    if lane == 0:
        xs[blk] = amax / float32(127.0)
        xz[blk] = -8 * s
"""


def get_quantize_x(pairs: bool):
    return U.build_kernel(("a8-quantize-x", pairs), quantize_x_source(pairs), "quantize_x_kernel")


def launch_quantize_x(x, xq, xs, xz, M: int, K: int, pairs: bool, stream=0) -> None:
    """x: fp32 or fp16 [M*K]; xq int8 [M*K]; xs fp32 [M*K/32]; xz int32 [M*K/32]."""
    warps = M * (K // BLOCK)
    blocks = (warps + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK
    get_quantize_x(pairs)[blocks, 32 * WARPS_PER_BLOCK, stream](x, xq, xs, xz, M, K)


# ---------------------------------------------------------------------------------------- GEMVs

@dataclass(frozen=True)
class Tiling:
    """How a GEMV launch is laid out. A block of `warps` warps streams `rows` weight rows together and
    splits K between its threads (split-K inside the block: with N = 4096 rows one warp per row group
    left SMs with ~8 warps, too few loads in flight to cover the memory latency).

    pipelined: a persistent grid (`blocks_per_sm` blocks on each SM) walks the row groups and issues the
    next group's weight loads before it multiplies the current one, so every thread keeps two groups
    of 16-byte loads in flight and no block's start-up or reduction leaves the memory idle."""
    warps: int = 4
    rows: int = 4
    pipelined: bool = False
    blocks_per_sm: int = 4

    @property
    def span(self) -> int:  # weights of one row a block covers per step
        return BLOCK * 32 * self.warps


def tiling_for(fmt: str, K: int) -> Tiling:
    """The layout launched for a weight (bench_gemv.py --sweep, H200, M = 1: 8 rows a block beat 4 at
    every shape; two warps a block for K ≤ 4096 — int4 16384×4096 11.5 µs vs 12.9 with 4×4 — and four
    warps for the long int4 rows, 4096×16384 11.6 µs vs 13.0 with two; the pipelined persistent grid
    was no faster anywhere)."""
    return Tiling(4, 8) if fmt == "int4" and K > 4096 else Tiling(2, 8)


ACTS = ("none", "relu2")  # output activations (relu²: the FFN key, so its output needs no extra launch)


@dataclass(frozen=True)
class _Format:
    """What differs between int4 and int8 weights inside the kernel."""
    name: str
    args: str
    row_scale: bool  # int8: one scale a row, applied at the store; int4: a scale a group, inside the loop

    def load_lines(self, dst: str, row: str, e: str, ind: str) -> list[str]:
        if self.name == "int4":
            return [f"{ind}{dst}_0, {dst}_1, {dst}_2, {dst}_3 = ld_u32x4(wq, {row} * (K >> 3) + ({e} >> 3))",
                    f"{ind}{dst}s = h2f(sc[{row} * (K >> gshift) + ({e} >> gshift)])"]
        return [f"{ind}{dst}_0, {dst}_1, {dst}_2, {dst}_3 = ld_u32x4(wq, {row} * (K >> 2) + ({e} >> 2))",
                f"{ind}{dst}_4, {dst}_5, {dst}_6, {dst}_7 = ld_u32x4(wq, {row} * (K >> 2) + ({e} >> 2) + 4)"]

    def zero_lines(self, dst: str, ind: str) -> list[str]:
        words = 4 if self.name == "int4" else 8
        L = [f"{ind}{dst}_{i} = uint32(0)" for i in range(words)]
        return L + ([f"{ind}{dst}s = float32(0.0)"] if self.name == "int4" else [])

    def multiply_lines(self, R: int, M: int, ind: str) -> list[str]:
        L = []
        if self.name == "int4":
            L += [f"{ind}z{m} = xz[sb + {m} * nb + b]" for m in range(M)]
        for r in range(R):
            if self.name == "int4":
                L += [f"{ind}lo{i}, hi{i} = nibbles_u8x4(w{r}_{i})" for i in range(4)]
            for m in range(M):
                if self.name == "int4":
                    acc = f"z{m}"
                    for i in range(4):
                        acc = f"dp4a_us(hi{i}, x{m}_{2 * i + 1}, dp4a_us(lo{i}, x{m}_{2 * i}, {acc}))"
                    L.append(f"{ind}a{r}_{m} += float32({acc}) * (xs{m} * w{r}s)")
                else:
                    acc = "0"
                    for i in range(8):
                        acc = f"dp4a_ss(w{r}_{i}, x{m}_{i}, {acc})"
                    L.append(f"{ind}a{r}_{m} += float32({acc}) * xs{m}")
        return L


FORMATS = {"int4": _Format("int4", "wq, sc, xq, xs, xz, out, N, K, gshift, rpx", row_scale=False),
           "int8": _Format("int8", "wq, sc, xq, xs, out, N, K, rpx", row_scale=True)}


def _x_lines(M: int, ind: str) -> list[str]:
    # stacked weights (rpx < N): rows [g·rpx, (g+1)·rpx) read their own M rows of x
    L = [f"{ind}xg = row0 // rpx", f"{ind}xb = xg * ({M} * K)", f"{ind}sb = xg * ({M} * nb)", f"{ind}b = e >> 5"]
    for m in range(M):
        L.append(f"{ind}x{m}_0, x{m}_1, x{m}_2, x{m}_3 = ld_u32x4_l1(xq, (xb + {m} * K + e) >> 2)")
        L.append(f"{ind}x{m}_4, x{m}_5, x{m}_6, x{m}_7 = ld_u32x4_l1(xq, ((xb + {m} * K + e) >> 2) + 4)")
        L.append(f"{ind}xs{m} = xs[sb + {m} * nb + b]")
    return L


def _reduce_store_lines(R: int, M: int, warps: int, ind: str, fmt: _Format, act: str) -> list[str]:
    """Warp sums → shared memory → R·M threads add the warps' partials, activate and store."""
    L = [f"{ind}xg = row0 // rpx"] + U.block_reduce_lines(R, M, warps, ind, "N")
    if fmt.row_scale:
        L.append(f"{ind}        v = v * h2f(sc[row])")
    if act == "relu2":
        L.append(f"{ind}        v = max(v, float32(0.0))")
        L.append(f"{ind}        v = v * v")
    L.append(f"{ind}        out[xg * {M} * rpx + (t % {M}) * rpx + row - xg * rpx] = v")
    L.append(f"{ind}cuda.syncthreads()")
    return L


def _prologue(fmt: _Format, tiling: Tiling, M: int) -> list[str]:
    R, W = tiling.rows, tiling.warps
    return [f"def gemv_a8_kernel({fmt.args}):",
            "    lane = cuda.threadIdx.x & 31",
            "    warp = cuda.threadIdx.x >> 5",
            "    t = cuda.threadIdx.x",
            f"    red = cuda.shared.array({W * R * M}, float32)",
            f"    row0 = cuda.blockIdx.x * {R}",
            "    nb = K >> 5"]


def _rows_lines(R: int, base: str, dst: str, ind: str) -> list[str]:
    return [f"{ind}{dst}{r} = min({base} + {r}, N - 1)" for r in range(R)]  # rows past N re-read N-1, not stored


def _simple_source(fmt: _Format, tiling: Tiling, M: int, act: str) -> str:
    """One row group per block (the grid covers N); loads and multiplies alternate within a block."""
    R = tiling.rows
    L = _prologue(fmt, tiling, M) + ["    while row0 < N:"]
    ind, i2 = " " * 8, " " * 12
    L += _rows_lines(R, "row0", "r", ind)
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L += [f"{ind}e = t * {BLOCK}", f"{ind}while e < K:"]
    for r in range(R):
        L += fmt.load_lines(f"w{r}", f"r{r}", "e", i2)
    L += _x_lines(M, i2) + fmt.multiply_lines(R, M, i2)
    L.append(f"{i2}e += {tiling.span}")
    L += _reduce_store_lines(R, M, tiling.warps, ind, fmt, act)
    L.append(f"{ind}row0 += cuda.gridDim.x * {R}")
    return "\n".join(L) + "\n"


def _pipelined_source(fmt: _Format, tiling: Tiling, M: int, act: str) -> str:
    """Persistent blocks walk (row group, K span) steps; step j+1's weights are loaded before step j's
    products, so the loads of the next group are in flight during the reduction of this one."""
    R = tiling.rows
    L = _prologue(fmt, tiling, M)
    ind, i2 = " " * 4, " " * 8
    L += [f"{ind}spans = (K + {tiling.span - 1}) // {tiling.span}",
          f"{ind}rstep = cuda.gridDim.x * {R}",
          f"{ind}ch = 0",
          f"{ind}e = t * {BLOCK}"]
    for r in range(R):
        L += fmt.zero_lines(f"w{r}", ind)
    L += _rows_lines(R, "row0", "r", ind)
    L.append(f"{ind}if row0 < N and e < K:")
    for r in range(R):
        L += fmt.load_lines(f"w{r}", f"r{r}", "e", i2)
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L.append(f"{ind}while row0 < N:")
    # the next step (uniform over the block, so the reduction below is reached by every thread)
    L += [f"{i2}nch = ch + 1", f"{i2}nrow0 = row0", f"{i2}if nch == spans:", f"{i2}    nch = 0",
          f"{i2}    nrow0 = row0 + rstep", f"{i2}ne = nch * {tiling.span} + t * {BLOCK}"]
    for r in range(R):
        L += fmt.zero_lines(f"n{r}", i2)
    L += _rows_lines(R, "nrow0", "q", i2)
    L.append(f"{i2}if nrow0 < N and ne < K:")
    for r in range(R):
        L += fmt.load_lines(f"n{r}", f"q{r}", "ne", i2 + "    ")
    L.append(f"{i2}if e < K:")
    L += _x_lines(M, i2 + "    ") + fmt.multiply_lines(R, M, i2 + "    ")
    L.append(f"{i2}if nch == 0:")
    L += _reduce_store_lines(R, M, tiling.warps, i2 + "    ", fmt, act)
    L += [f"{i2}    a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    words = 4 if fmt.name == "int4" else 8
    for r in range(R):
        L += [f"{i2}w{r}_{i} = n{r}_{i}" for i in range(words)]
        if fmt.name == "int4":
            L.append(f"{i2}w{r}s = n{r}s")
    L += [f"{i2}row0 = nrow0", f"{i2}ch = nch", f"{i2}e = ne"]
    return "\n".join(L) + "\n"


def kernel_source(fmt: str, M: int, tiling: Tiling | None = None, act: str = "none") -> str:
    tiling = tiling or Tiling()
    gen = _pipelined_source if tiling.pipelined else _simple_source
    return gen(FORMATS[fmt], tiling, M, act)


def int4_source(M: int, tiling: Tiling | None = None, act: str = "none") -> str:
    return kernel_source("int4", M, tiling, act)


def int8_source(M: int, tiling: Tiling | None = None, act: str = "none") -> str:
    return kernel_source("int8", M, tiling, act)


def get_kernel(fmt: str, M: int, tiling: Tiling | None = None, act: str = "none"):
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv_a8: 1..{MAX_ROWS} rows of x, got {M}")
    if act not in ACTS:
        raise ValueError(f"gemv_a8: activation {act!r} not one of {ACTS}")
    tiling = tiling or Tiling()
    return U.build_kernel((f"{fmt}-a8", M, tiling, act), kernel_source(fmt, M, tiling, act), "gemv_a8_kernel")


def grid_for(N: int, tiling: Tiling) -> int:
    groups = (N + tiling.rows - 1) // tiling.rows
    if tiling.pipelined:
        groups = min(groups, U.sm_count() * tiling.blocks_per_sm)
    return max(1, min(groups, 65535))


def launch_int4_a8(wq, sc, xq, xs, xz, out, M: int, N: int, K: int, group: int, groups: int = 1,
                   stream=0, act: str = "none", tiling: Tiling | None = None) -> None:
    """wq int32 [N*K/8] (packed nibbles), sc int16 [N*K/G] (fp16 bits), xq int32 view [groups*M*K/4]
    (pairs layout), xs fp32, xz int32 [groups*M*K/32], out fp32/fp16 flat [groups, M, N/groups]:
    weight rows [g·N/groups, (g+1)·N/groups) take x rows [g·M, (g+1)·M)."""
    tiling = tiling or tiling_for("int4", K)
    get_kernel("int4", M, tiling, act)[grid_for(N, tiling), 32 * tiling.warps, stream](
        wq, sc, xq, xs, xz, out, N, K, group.bit_length() - 1, N // groups)


def launch_int8_a8(wq, sc, xq, xs, out, M: int, N: int, K: int, groups: int = 1, stream=0,
                   act: str = "none", tiling: Tiling | None = None) -> None:
    """wq int32 [N*K/4] (int8 bytes), sc int16 [N] (fp16 bits), xq int32 view [groups*M*K/4]
    (natural layout), xs fp32 [groups*M*K/32], out fp32/fp16 flat [groups, M, N/groups]."""
    tiling = tiling or tiling_for("int8", K)
    get_kernel("int8", M, tiling, act)[grid_for(N, tiling), 32 * tiling.warps, stream](
        wq, sc, xq, xs, out, N, K, N // groups)


def check_shapes(K: int, group: int | None = None) -> None:
    if K % BLOCK or (group is not None and (group not in (32, 64, 128) or K % group)):
        raise ValueError(f"gemv_a8: K={K} must be a multiple of 32 (and of the int4 group {group})")


# ---------------------------------------------------------------------------------------- torch API

@dataclass(frozen=True)
class RoundedX:
    """x rounded to int8 in blocks of 32 (the layouts above): ``rows`` rows of ``K`` values, in the
    int4 pairs order when ``pairs``. Filled by ``round_x`` or, in the fused decode step, by the kernel
    that produces x (norm_mix, time_mix_wkv), which saves a launch per product."""
    xq: object  # int8 [rows·K]
    xs: object  # fp32 [rows·K/32]
    xz: object  # int32 [rows·K/32]
    rows: int
    K: int
    pairs: bool

    @classmethod
    def empty(cls, rows: int, K: int, pairs: bool, device) -> "RoundedX":
        import torch

        check_shapes(K)
        nb = rows * K // BLOCK
        return cls(torch.empty(rows * K, device=device, dtype=torch.int8),
                   torch.empty(nb, device=device, dtype=torch.float32),
                   torch.empty(nb, device=device, dtype=torch.int32), rows, K, pairs)


def pairs_for(prep) -> bool:
    """Whether a prepared weight reads x in the int4 pairs order."""
    return hasattr(prep, "group")


def round_x(x, rx: RoundedX) -> RoundedX:
    """One launch: x [rows, K] (fp16 or fp32, contiguous) rounded into ``rx``."""
    if tuple(x.shape) != (rx.rows, rx.K):
        raise ValueError(f"round_x: x is {tuple(x.shape)}, buffers hold [{rx.rows}, {rx.K}]")
    stream = U.numba_stream_for_torch()
    launch_quantize_x(U.as_numba(x.view(-1)), U.as_numba(rx.xq), U.as_numba(rx.xs), U.as_numba(rx.xz),
                      rx.rows, rx.K, rx.pairs, stream)
    return rx


def gemv_a8_rounded(rx: RoundedX, prep, out, groups: int = 1, act: str = "none", tiling: Tiling | None = None):
    """out [groups, rows/groups, N/groups] (or [rows, N]) = rounded x @ Wᵀ, one launch (see ``gemv_a8``)."""
    Mx, K = rx.rows, rx.K
    M = Mx // groups
    int4 = pairs_for(prep)
    tiling = tiling or tiling_for("int4" if int4 else "int8", K)
    if K != prep.K:
        raise ValueError(f"gemv_a8: x has K={K}, weight K={prep.K}")
    if rx.pairs != int4:
        raise ValueError("gemv_a8: x was rounded in the other weight format's order")
    if Mx % groups or prep.N % groups or (groups > 1 and (prep.N // groups) % tiling.rows):
        raise ValueError(f"gemv_a8: {groups} groups must split x rows ({Mx}) and weight rows ({prep.N}) "
                         f"into whole blocks of {tiling.rows}")
    check_shapes(K, prep.group if int4 else None)
    if not out.is_contiguous() or out.numel() != M * prep.N:
        raise ValueError("gemv_a8: out must be contiguous with M·N elements")
    import torch

    stream = U.numba_stream_for_torch()
    xq32, xs, out1 = U.as_numba(rx.xq.view(torch.int32)), U.as_numba(rx.xs), U.as_numba(out.view(-1))
    if int4:
        launch_int4_a8(prep.wq, prep.sc, xq32, xs, U.as_numba(rx.xz), out1, M, prep.N, K, prep.group,
                       groups, stream, act, tiling)
    else:
        launch_int8_a8(prep.wq, prep.sc, xq32, xs, out1, M, prep.N, K, groups, stream, act, tiling)
    return out


def gemv_a8(x, prep, out=None, groups: int = 1, act: str = "none", tiling: Tiling | None = None):
    """x [M, K] CUDA (M <= MAX_ROWS; fp32 or fp16) -> out [M, N] (fp16 for fp16 x, else fp32);
    act="relu2" stores relu(y)² instead of y. Two launches: ``round_x`` then ``gemv_a8_rounded``.

    prep: a PreparedInt4 / PreparedInt8 of gemv_int4 / gemv_int8 (the same weight views).
    groups > 1: the weight is `groups` matrices stacked along N, each with its own M/groups rows of x
    (e.g. Wr, Wk, Wv and the r, k, v inputs: one rounding launch, one GEMV); out [groups, M/groups, N/groups]."""
    import torch

    Mx, K = x.shape
    M = Mx // groups
    if x.dtype not in (torch.float16, torch.float32) or not x.is_contiguous():
        x = x.float().contiguous()
    if out is None:
        shape = (M, prep.N) if groups == 1 else (groups, M, prep.N // groups)
        out = torch.empty(shape, device=x.device, dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
    rx = round_x(x, RoundedX.empty(Mx, K, pairs_for(prep), x.device))
    return gemv_a8_rounded(rx, prep, out, groups, act, tiling)


def quantize_x_reference(x, pairs: bool):
    """torch reference of ``quantize_x``: (q int8 [M, K] in natural order, scale [M, K/32], zsum)."""
    import torch

    M, K = x.shape
    blocks = x.float().reshape(M, K // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(blocks * inv + 0.5).clamp(-127, 127)
    return q.reshape(M, K).to(torch.int8), (amax / 127.0).reshape(M, -1), (-8 * q.sum(-1)).to(torch.int32)


def gemv_a8_reference(x, w_dequantized):
    """What the kernels compute: x rounded to int8 in blocks of 32, times the dequantized weight (fp64)."""
    q, s, _ = quantize_x_reference(x, False)
    M, K = x.shape
    xr = (q.double().reshape(M, -1, BLOCK) * s.double().unsqueeze(-1)).reshape(M, K)
    return xr @ w_dequantized.double().t()
