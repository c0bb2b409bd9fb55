"""Int4 (group-wise, format ``int4`` of quant/formats.py) GEMV for decode: out[M, N] = x[M, K] @ Wᵀ.

W is stored packed as uint8 [N, K/2] (low nibble = even k) with fp16 scales [N, K/G]. Each warp
streams ``ROWS_PER_WARP`` weight rows together with 16-byte loads (32 weights a lane, 1024 a warp per
step; each activation vector read from L1 serves all R rows, which keeps L1 traffic under the DRAM
stream), unpacks nibbles to exact fp32 integers in registers (one and/or + one fma a weight, see
``_gemv_util.unpack_s4x8``), multiplies with fp32 activations read as 16-byte vectors (L1-resident),
applies the group scale once per 32 weights, accumulates in fp32 and reduces with warp shuffles.
Rows of x: 1..16, compiled once per count. The kernel reads x as fp32; ``gemv_int4`` converts other
dtypes first (one small torch op) and writes out in fp16 (x fp16) or fp32.

Launch: on torch's current stream, zero-copy views, no allocation or host sync inside
``launch_int4`` — it can be captured in a CUDA graph. Reference: ``gemv_int4_reference``.
Numba is imported lazily; importing this module needs neither numba nor a GPU.
"""

from __future__ import annotations

from . import _gemv_util as U

WARPS_PER_BLOCK = 4
ROWS_PER_WARP = 4  # weight rows a warp streams together: each x vector loaded feeds R rows
UNROLL = 1  # kept for the benchmark's sweep; the R row loads already give R x 16 B in flight
LANE_ELEMS = 32  # weights per lane per 16-byte load
WARP_ELEMS = 32 * LANE_ELEMS


def kernel_source(M: int, rows: int = ROWS_PER_WARP) -> str:
    R = rows
    L = ["def gemv_int4_kernel(wq, sc, x, out, N, K, gshift):",
         "    lane = cuda.threadIdx.x & 31",
         f"    row0 = ((cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> 5) * {R}",
         f"    step = ((cuda.gridDim.x * cuda.blockDim.x) >> 5) * {R}",
         "    wpr = K >> 3",
         "    gpr = K >> gshift",
         "    while row0 < N:"]
    ind = " " * 8
    for r in range(R):  # rows past N re-read row N-1 and are not stored
        L.append(f"{ind}r{r} = min(row0 + {r}, N - 1)")
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L.append(f"{ind}e = lane * {LANE_ELEMS}")
    L.append(f"{ind}while e < K:")
    i2 = ind + "    "
    for r in range(R):
        L.append(f"{i2}w{r}_0, w{r}_1, w{r}_2, w{r}_3 = ld_u32x4(wq, r{r} * wpr + (e >> 3))")
    for r in range(R):
        L.append(f"{i2}s{r} = h2f(sc[r{r} * gpr + (e >> gshift)])")
    L += [f"{i2}p{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    for i in range(4):
        for r in range(R):
            L.append(f"{i2}d{r}_0, d{r}_1, d{r}_2, d{r}_3, d{r}_4, d{r}_5, d{r}_6, d{r}_7 = unpack_s4x8(w{r}_{i})")
        for m in range(M):
            L.append(f"{i2}xa0, xa1, xa2, xa3 = ld_f32x4(x, {m} * K + e + {8 * i})")
            L.append(f"{i2}xb0, xb1, xb2, xb3 = ld_f32x4(x, {m} * K + e + {8 * i + 4})")
            for r in range(R):
                L.append(f"{i2}p{r}_{m} += d{r}_0 * xa0 + d{r}_1 * xa1 + d{r}_2 * xa2 + d{r}_3 * xa3 + "
                         f"d{r}_4 * xb0 + d{r}_5 * xb1 + d{r}_6 * xb2 + d{r}_7 * xb3")
    L += [f"{i2}a{r}_{m} += p{r}_{m} * s{r}" for r in range(R) for m in range(M)]
    L.append(f"{i2}e += {WARP_ELEMS}")
    L += U.reduce_and_store_lines(M, R, ind)
    L.append(f"{ind}row0 += step")
    return "\n".join(L) + "\n"


def get_kernel(M: int):
    if not 1 <= M <= U.MAX_ROWS:
        raise ValueError(f"gemv_int4: 1..{U.MAX_ROWS} rows of x, got {M}")
    return U.build_kernel(("int4", M, ROWS_PER_WARP), kernel_source(M, ROWS_PER_WARP), "gemv_int4_kernel")


def check_shapes(N: int, K: int, group: int) -> None:
    if group not in (32, 64, 128) or K % group or K % LANE_ELEMS:
        raise ValueError(f"gemv_int4: K={K} must be a multiple of the group {group} (32/64/128)")


def grid_for(N: int) -> int:
    per_block = WARPS_PER_BLOCK * ROWS_PER_WARP
    return max(1, min((N + per_block - 1) // per_block, 65535))


def launch_int4(wq, sc, x, out, N: int, K: int, group: int, stream=0) -> None:
    """Raw launch. wq: uint32/int32 [N*K/8] (the packed bytes), sc: int16 [N*K/G] (fp16 bits),
    x: float32 [M*K] (16-byte aligned), out: float32 or float16 [M, N]."""
    M = out.shape[0]
    k = get_kernel(M)
    k[grid_for(N), 32 * WARPS_PER_BLOCK, stream](wq, sc, x, out, N, K, group.bit_length() - 1)


class PreparedInt4:
    """Numba views of one int4 weight (built once; the call then only wraps x and out)."""

    def __init__(self, qweight, scale, group: int):
        import torch

        N, half = qweight.shape
        K = 2 * half
        check_shapes(N, K, group)
        if qweight.dtype != torch.uint8 or scale.dtype != torch.float16 or not qweight.is_cuda:
            raise ValueError("gemv_int4: qweight uint8 and scale fp16 CUDA tensors expected")
        self.N, self.K, self.group = N, K, group
        self._keep = (qweight.contiguous(), scale.contiguous())
        U.check_aligned(self._keep[0], "int4 qweight")
        self.wq = U.as_numba(self._keep[0].view(-1).view(torch.int32))
        self.sc = U.as_numba(self._keep[1].view(-1).view(torch.int16))


def gemv_int4(x, prep: PreparedInt4, out=None):
    """x [M, K] CUDA (M <= 16) -> out [M, N]; out fp16 when x is fp16, else fp32 (cast to x's dtype
    by the caller for bf16). Runs on torch's current stream."""
    import torch

    M, K = x.shape
    if K != prep.K:
        raise ValueError(f"gemv_int4: x has K={K}, weight K={prep.K}")
    xf = x if (x.dtype == torch.float32 and x.is_contiguous() and x.data_ptr() % 16 == 0) \
        else x.float().contiguous()
    if out is None:
        out = torch.empty((M, prep.N), device=x.device,
                          dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
    launch_int4(prep.wq, prep.sc, U.as_numba(xf.view(-1)), U.as_numba(out), prep.N, K, prep.group,
                U.numba_stream_for_torch())
    return out


def gemv_int4_reference(x, qweight, scale, group: int):
    """fp32 reference: x.float() @ dequantize(W)ᵀ."""
    from edge_rwkv.quant.formats import dequantize_int4_torch

    return x.float() @ dequantize_int4_torch(qweight, scale, group).to(x.device).t()
