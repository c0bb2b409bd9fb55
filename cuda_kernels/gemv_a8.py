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

from . import _gemv_util as U

BLOCK = 32  # x values per scale; also the weights one lane reduces per step
WARPS_PER_BLOCK = 4
ROWS_PER_BLOCK = 4  # weight rows a block streams together (each x load feeds all of them)
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

def _rows_prologue(R: int, M: int, name: str, args: str) -> tuple[list[str], str]:
    # A block of WARPS_PER_BLOCK warps shares R rows and splits K between its threads (split-K
    # inside the block): with N = 4096 rows one warp per row group left SMs with ~8 warps, too few
    # loads in flight to cover the memory latency.
    L = [f"def {name}({args}):",
         "    lane = cuda.threadIdx.x & 31",
         "    warp = cuda.threadIdx.x >> 5",
         "    t = cuda.threadIdx.x",
         f"    red = cuda.shared.array({WARPS_PER_BLOCK * R * M}, float32)",
         f"    row0 = cuda.blockIdx.x * {R}",
         "    nb = K >> 5",
         "    while row0 < N:",
         # stacked weights (rpx < N): rows [g·rpx, (g+1)·rpx) read their own M rows of x
         "        xg = row0 // rpx",
         f"        xb = xg * ({M} * K)",
         f"        sb = xg * ({M} * nb)"]
    ind = " " * 8
    for r in range(R):  # rows past N re-read row N-1 and are not stored
        L.append(f"{ind}r{r} = min(row0 + {r}, N - 1)")
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L.append(f"{ind}e = t * {BLOCK}")
    L.append(f"{ind}while e < K:")
    return L, ind


ACTS = ("none", "relu2")  # output activations (relu²: the FFN key, so its output needs no extra launch)


def _block_reduce_store(R: int, M: int, ind: str, row_scale: bool, act: str) -> list[str]:
    """Warp sums → shared memory → R·M threads add the warps' partials, activate and store."""
    L = U.block_reduce_lines(R, M, WARPS_PER_BLOCK, ind, "N")
    if row_scale:
        L.append(f"{ind}        v = v * h2f(sc[row])")
    if act == "relu2":
        L.append(f"{ind}        v = max(v, float32(0.0))")
        L.append(f"{ind}        v = v * v")
    L.append(f"{ind}        out[xg * {M} * rpx + (t % {M}) * rpx + row - xg * rpx] = v")
    L.append(f"{ind}cuda.syncthreads()")
    L.append(f"{ind}row0 += cuda.gridDim.x * {R}")
    return L


def _load_x(M: int, i2: str) -> list[str]:
    L = [f"{i2}b = e >> 5"]
    for m in range(M):
        L.append(f"{i2}x{m}_0, x{m}_1, x{m}_2, x{m}_3 = ld_u32x4_l1(xq, (xb + {m} * K + e) >> 2)")
        L.append(f"{i2}x{m}_4, x{m}_5, x{m}_6, x{m}_7 = ld_u32x4_l1(xq, ((xb + {m} * K + e) >> 2) + 4)")
        L.append(f"{i2}xs{m} = xs[sb + {m} * nb + b]")
    return L


def int4_source(M: int, R: int = ROWS_PER_BLOCK, act: str = "none") -> str:
    L, ind = _rows_prologue(R, M, "gemv_int4_a8_kernel", "wq, sc, xq, xs, xz, out, N, K, gshift, rpx")
    i2 = ind + "    "
    L.append(f"{i2}gpr = K >> gshift")
    for r in range(R):
        L.append(f"{i2}w{r}_0, w{r}_1, w{r}_2, w{r}_3 = ld_u32x4(wq, r{r} * (K >> 3) + (e >> 3))")
    for r in range(R):
        L.append(f"{i2}s{r} = h2f(sc[r{r} * gpr + (e >> gshift)])")
    L += _load_x(M, i2)
    for m in range(M):
        L.append(f"{i2}z{m} = xz[sb + {m} * nb + b]")
    for r in range(R):
        for i in range(4):
            L.append(f"{i2}lo{i}, hi{i} = nibbles_u8x4(w{r}_{i})")
        for m in range(M):
            acc = f"z{m}"
            for i in range(4):
                acc = f"dp4a_us(hi{i}, x{m}_{2 * i + 1}, dp4a_us(lo{i}, x{m}_{2 * i}, {acc}))"
            L.append(f"{i2}a{r}_{m} += float32({acc}) * (xs{m} * s{r})")
    L.append(f"{i2}e += {BLOCK * 32 * WARPS_PER_BLOCK}")
    L += _block_reduce_store(R, M, ind, row_scale=False, act=act)
    return "\n".join(L) + "\n"


def int8_source(M: int, R: int = ROWS_PER_BLOCK, act: str = "none") -> str:
    L, ind = _rows_prologue(R, M, "gemv_int8_a8_kernel", "wq, sc, xq, xs, out, N, K, rpx")
    i2 = ind + "    "
    for r in range(R):
        L.append(f"{i2}w{r}_0, w{r}_1, w{r}_2, w{r}_3 = ld_u32x4(wq, r{r} * (K >> 2) + (e >> 2))")
        L.append(f"{i2}w{r}_4, w{r}_5, w{r}_6, w{r}_7 = ld_u32x4(wq, r{r} * (K >> 2) + (e >> 2) + 4)")
    L += _load_x(M, i2)
    for r in range(R):
        for m in range(M):
            acc = "0"
            for i in range(8):
                acc = f"dp4a_ss(w{r}_{i}, x{m}_{i}, {acc})"
            L.append(f"{i2}a{r}_{m} += float32({acc}) * xs{m}")
    L.append(f"{i2}e += {BLOCK * 32 * WARPS_PER_BLOCK}")
    L += _block_reduce_store(R, M, ind, row_scale=True, act=act)
    return "\n".join(L) + "\n"


def get_kernel(fmt: str, M: int, R: int = ROWS_PER_BLOCK, act: str = "none"):
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv_a8: 1..{MAX_ROWS} rows of x, got {M}")
    if act not in ACTS:
        raise ValueError(f"gemv_a8: activation {act!r} not one of {ACTS}")
    if fmt == "int4":
        return U.build_kernel(("int4-a8", M, R, act), int4_source(M, R, act), "gemv_int4_a8_kernel")
    return U.build_kernel(("int8-a8", M, R, act), int8_source(M, R, act), "gemv_int8_a8_kernel")


def grid_for(N: int, R: int = ROWS_PER_BLOCK) -> int:
    return max(1, min((N + R - 1) // R, 65535))


def launch_int4_a8(wq, sc, xq, xs, xz, out, M: int, N: int, K: int, group: int, groups: int = 1,
                   stream=0, act: str = "none") -> None:
    """wq int32 [N*K/8] (packed nibbles), sc int16 [N*K/G] (fp16 bits), xq int32 view [groups*M*K/4]
    (pairs layout), xs fp32, xz int32 [groups*M*K/32], out fp32/fp16 flat [groups, M, N/groups]:
    weight rows [g·N/groups, (g+1)·N/groups) take x rows [g·M, (g+1)·M)."""
    get_kernel("int4", M, act=act)[grid_for(N), 32 * WARPS_PER_BLOCK, stream](
        wq, sc, xq, xs, xz, out, N, K, group.bit_length() - 1, N // groups)


def launch_int8_a8(wq, sc, xq, xs, out, M: int, N: int, K: int, groups: int = 1, stream=0,
                   act: str = "none") -> None:
    """wq int32 [N*K/4] (int8 bytes), sc int16 [N] (fp16 bits), xq int32 view [groups*M*K/4]
    (natural layout), xs fp32 [groups*M*K/32], out fp32/fp16 flat [groups, M, N/groups]."""
    get_kernel("int8", M, act=act)[grid_for(N), 32 * WARPS_PER_BLOCK, stream](wq, sc, xq, xs, out, N, K,
                                                                              N // groups)


def check_shapes(K: int, group: int | None = None) -> None:
    if K % BLOCK or (group is not None and (group not in (32, 64, 128) or K % group)):
        raise ValueError(f"gemv_a8: K={K} must be a multiple of 32 (and of the int4 group {group})")


# ---------------------------------------------------------------------------------------- torch API

def gemv_a8(x, prep, out=None, groups: int = 1, act: str = "none"):
    """x [M, K] CUDA (M <= MAX_ROWS; fp32 or fp16) -> out [M, N] (fp16 for fp16 x, else fp32);
    act="relu2" stores relu(y)² instead of y.

    prep: a PreparedInt4 / PreparedInt8 of gemv_int4 / gemv_int8 (the same weight views).
    groups > 1: the weight is `groups` matrices stacked along N, each with its own M/groups rows of x
    (e.g. Wr, Wk, Wv and the r, k, v inputs: one rounding launch, one GEMV); out [groups, M/groups, N/groups]."""
    import torch

    Mx, K = x.shape
    M = Mx // groups
    int4 = hasattr(prep, "group")
    if K != prep.K:
        raise ValueError(f"gemv_a8: x has K={K}, weight K={prep.K}")
    if Mx % groups or prep.N % groups or (prep.N // groups) % ROWS_PER_BLOCK:
        raise ValueError(f"gemv_a8: {groups} groups must split x rows ({Mx}) and weight rows ({prep.N}) "
                         f"into whole blocks of {ROWS_PER_BLOCK}")
    check_shapes(K, prep.group if int4 else None)
    if x.dtype not in (torch.float16, torch.float32) or not x.is_contiguous():
        x = x.float().contiguous()
    xq = torch.empty(Mx * K, device=x.device, dtype=torch.int8)
    xs = torch.empty(Mx * K // BLOCK, device=x.device, dtype=torch.float32)
    xz = torch.empty(Mx * K // BLOCK, device=x.device, dtype=torch.int32)
    if out is None:
        shape = (M, prep.N) if groups == 1 else (groups, M, prep.N // groups)
        out = torch.empty(shape, device=x.device, dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
    if not out.is_contiguous() or out.numel() != M * prep.N:
        raise ValueError("gemv_a8: out must be contiguous with M·N elements")
    stream = U.numba_stream_for_torch()
    launch_quantize_x(U.as_numba(x.view(-1)), U.as_numba(xq), U.as_numba(xs), U.as_numba(xz), Mx, K, int4, stream)
    xq32, out1 = U.as_numba(xq.view(torch.int32)), U.as_numba(out.view(-1))
    if int4:
        launch_int4_a8(prep.wq, prep.sc, xq32, U.as_numba(xs), U.as_numba(xz), out1, M, prep.N, K, prep.group,
                       groups, stream, act)
    else:
        launch_int8_a8(prep.wq, prep.sc, xq32, U.as_numba(xs), out1, M, prep.N, K, groups, stream, act)
    return out


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
