"""Int8 (per-output-channel, format ``int8`` of quant/formats.py) GEMV for decode:
out[M, N] = x[M, K] @ Wᵀ with W int8 [N, K] and fp16 row scales [N].

Each warp streams ``ROWS_PER_WARP`` weight rows together with 16-byte loads (16 weights a lane,
512 a warp per step; each activation vector read from L1 serves all R rows), turns bytes into exact fp32 integers in registers (one ``prmt`` + one
add a weight, see ``_gemv_util.unpack_s8x4``), multiplies with fp32 activations read as 16-byte
vectors (L1-resident), accumulates in fp32, reduces with warp shuffles and applies the row scale
once. Rows of x: 1..16, compiled once per count. The kernel reads x as fp32; ``gemv_int8``
converts other dtypes first and writes out in fp16 (x fp16) or fp32.

Launch: on torch's current stream, zero-copy views, no allocation or host sync inside
``launch_int8`` — it can be captured in a CUDA graph. Reference: ``gemv_int8_reference``.
Numba is imported lazily; importing this module needs neither numba nor a GPU.
"""

from __future__ import annotations

from . import _gemv_util as U

WARPS_PER_BLOCK = 4
ROWS_PER_WARP = 4  # weight rows a warp streams together: each x vector loaded feeds R rows
UNROLL = 1
LANE_ELEMS = 16
WARP_ELEMS = 32 * LANE_ELEMS


def kernel_source(M: int, rows: int = ROWS_PER_WARP) -> str:
    R = rows
    L = ["def gemv_int8_kernel(wq, sc, x, out, N, K):",
         "    lane = cuda.threadIdx.x & 31",
         f"    row0 = ((cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) >> 5) * {R}",
         f"    step = ((cuda.gridDim.x * cuda.blockDim.x) >> 5) * {R}",
         "    wpr = K >> 2",
         "    while row0 < N:"]
    ind = " " * 8
    for r in range(R):
        L.append(f"{ind}r{r} = min(row0 + {r}, N - 1)")
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L.append(f"{ind}e = lane * {LANE_ELEMS}")
    L.append(f"{ind}while e < K:")
    i2 = ind + "    "
    for r in range(R):
        L.append(f"{i2}w{r}_0, w{r}_1, w{r}_2, w{r}_3 = ld_u32x4(wq, r{r} * wpr + (e >> 2))")
    for i in range(4):
        for r in range(R):
            L.append(f"{i2}d{r}_0, d{r}_1, d{r}_2, d{r}_3 = unpack_s8x4(w{r}_{i})")
        for m in range(M):
            L.append(f"{i2}xa0, xa1, xa2, xa3 = ld_f32x4(x, {m} * K + e + {4 * i})")
            for r in range(R):
                L.append(f"{i2}a{r}_{m} += d{r}_0 * xa0 + d{r}_1 * xa1 + d{r}_2 * xa2 + d{r}_3 * xa3")
    L.append(f"{i2}e += {WARP_ELEMS}")
    for r in range(R):
        L.append(f"{ind}rs{r} = h2f(sc[r{r}])")
    L += U.reduce_and_store_lines(M, R, ind, scaled=True)
    L.append(f"{ind}row0 += step")
    return "\n".join(L) + "\n"


def get_kernel(M: int):
    if not 1 <= M <= U.MAX_ROWS:
        raise ValueError(f"gemv_int8: 1..{U.MAX_ROWS} rows of x, got {M}")
    return U.build_kernel(("int8", M, ROWS_PER_WARP), kernel_source(M, ROWS_PER_WARP), "gemv_int8_kernel")


def check_shapes(N: int, K: int) -> None:
    if K % LANE_ELEMS:
        raise ValueError(f"gemv_int8: K={K} must be a multiple of {LANE_ELEMS}")


def grid_for(N: int) -> int:
    per_block = WARPS_PER_BLOCK * ROWS_PER_WARP
    return max(1, min((N + per_block - 1) // per_block, 65535))


def launch_int8(wq, sc, x, out, N: int, K: int, stream=0) -> None:
    """Raw launch. wq: uint32/int32 [N*K/4] (the int8 bytes), sc: int16 [N] (fp16 bits),
    x: float32 [M*K] (16-byte aligned), out: float32 or float16 [M, N]."""
    M = out.shape[0]
    k = get_kernel(M)
    k[grid_for(N), 32 * WARPS_PER_BLOCK, stream](wq, sc, x, out, N, K)


class PreparedInt8:
    """Numba views of one int8 weight (built once; the call then only wraps x and out)."""

    def __init__(self, qweight, scale):
        import torch

        N, K = qweight.shape
        check_shapes(N, K)
        if qweight.dtype != torch.int8 or scale.dtype != torch.float16 or not qweight.is_cuda:
            raise ValueError("gemv_int8: qweight int8 and scale fp16 CUDA tensors expected")
        self.N, self.K = N, K
        self._keep = (qweight.contiguous(), scale.contiguous())
        U.check_aligned(self._keep[0], "int8 qweight")
        self.wq = U.as_numba(self._keep[0].view(-1).view(torch.int32))
        self.sc = U.as_numba(self._keep[1].view(-1).view(torch.int16))


def gemv_int8(x, prep: PreparedInt8, out=None):
    """x [M, K] CUDA (M <= 16) -> out [M, N]; out fp16 when x is fp16, else fp32."""
    import torch

    M, K = x.shape
    if K != prep.K:
        raise ValueError(f"gemv_int8: x has K={K}, weight K={prep.K}")
    xf = x if (x.dtype == torch.float32 and x.is_contiguous() and x.data_ptr() % 16 == 0) \
        else x.float().contiguous()
    if out is None:
        out = torch.empty((M, prep.N), device=x.device,
                          dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
    launch_int8(prep.wq, prep.sc, U.as_numba(xf.view(-1)), U.as_numba(out), prep.N, K,
                U.numba_stream_for_torch())
    return out


def gemv_int8_reference(x, qweight, scale):
    """fp32 reference: x.float() @ dequantize(W)ᵀ."""
    from edge_rwkv.quant.formats import dequantize_int8_torch

    return x.float() @ dequantize_int8_torch(qweight, scale).to(x.device).t()
