"""Int8 / int4 weights to fp16 in one pass, for the many-row products (prefill, batched decode).

Above a few activation rows a quantized product runs as "dequantize a slab of rows to fp16, then a
cuBLAS GEMM over it" (quant/linear.py). Done with torch ops, the dequantization widens through
int16 and fp32 intermediates — a dozen passes over the slab and ~6× its size in scratch. Here one
thread turns 8 weights into 8 fp16 values with a single 16-byte store: the slab is written once, no
intermediate exists, and the result equals the torch reference
(``quant.formats.dequantize_int{4,8}_torch`` to fp16) bit for bit: the same fp32 products
(q·scale, then ·input_scale where the format has one) rounded once to nearest-even fp16.

Formats (quant/formats.py): int4 packed uint8 [N, K/2] (low nibble = even k, two's complement) with
fp16 scales [N, K/G]; int8 [N, K] with fp16 row scales [N]; optional fp16 input_scale [K].
Launches run on torch's current stream with no allocation or host sync: graph-capturable.
Numba is imported lazily; importing this module needs neither numba nor a GPU.
"""
from __future__ import annotations

from . import _gemv_util as U

THREADS = 256
MAX_BLOCKS = 132 * 16  # grid-stride beyond this: a few waves of the largest GPUs

_INPUT_SCALE = "\n".join(f"            d{j} *= h2f(insc[k + {j}])" for j in range(8))

INT4_SOURCE = f"""
def dequant_int4_kernel(wq, sc, insc, out, w0, w1, wpr, gpr, gshift, has_insc):
    # thread i: packed word i of [w0, w1) (8 weights of row i // wpr) -> out words 4(i-w0).. (8 fp16)
    i = w0 + cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while i < w1:
        row = i // wpr
        k = (i - row * wpr) * 8
        s = h2f(sc[row * gpr + (k >> gshift)])
        d0, d1, d2, d3, d4, d5, d6, d7 = unpack_s4x8(wq[i])
        d0 *= s; d1 *= s; d2 *= s; d3 *= s; d4 *= s; d5 *= s; d6 *= s; d7 *= s
        if has_insc:
{_INPUT_SCALE}
        st_f16x8(out, (i - w0) * 4, d0, d1, d2, d3, d4, d5, d6, d7)
        i += cuda.gridDim.x * cuda.blockDim.x
"""

INT8_SOURCE = f"""
def dequant_int8_kernel(wq, sc, insc, out, w0, w1, wpr, has_insc):
    # thread i: 8-weight group i of [w0, w1) (int8 words 2i, 2i+1 of row i // wpr) -> out words 4(i-w0)..
    i = w0 + cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while i < w1:
        row = i // wpr
        k = (i - row * wpr) * 8
        s = h2f(sc[row])
        d0, d1, d2, d3 = unpack_s8x4(wq[2 * i])
        d4, d5, d6, d7 = unpack_s8x4(wq[2 * i + 1])
        d0 *= s; d1 *= s; d2 *= s; d3 *= s; d4 *= s; d5 *= s; d6 *= s; d7 *= s
        if has_insc:
{_INPUT_SCALE}
        st_f16x8(out, (i - w0) * 4, d0, d1, d2, d3, d4, d5, d6, d7)
        i += cuda.gridDim.x * cuda.blockDim.x
"""


def supported(fmt: str, K: int, group: int = 0) -> bool:
    """Whether the kernels take a weight of this format, inner length (8 weights a thread) and int4
    group (32, 64 or 128: a power of two the 8 weights never straddle)."""
    if fmt == "int4":
        return K % 8 == 0 and group in (32, 64, 128) and K % group == 0
    return fmt == "int8" and K % 8 == 0


class Dequantizer:
    """One stored weight with its Numba views made once; ``rows(r0, r1, out)`` then costs one output
    view and one launch (prefill dequantizes every matrix once per chunk, slab by slab)."""

    def __init__(self, fmt: str, qweight, scale, input_scale=None, group: int = 0):
        import torch

        from ._runtime import kernel_array

        N = qweight.shape[0]
        K = qweight.shape[1] * (2 if fmt == "int4" else 1)
        if not supported(fmt, K, group):
            raise ValueError(f"dequantize_fp16: format {fmt!r} with K={K} (a multiple of 8) and group {group} "
                             "(int4: 32, 64 or 128, dividing K) not supported")
        self.fmt, self.N, self.K, self.group = fmt, N, K, group
        q, s = qweight.contiguous(), scale.contiguous()
        # fp16 read as int16 bits (h2f); without an input scale the argument is an unread placeholder
        isc = (input_scale if input_scale is not None else s.reshape(-1)[:1]).contiguous()
        self._keep = (q, s, isc)
        self.has_insc = input_scale is not None
        self.wq = kernel_array(q.view(-1).view(torch.int32))
        self.sc = kernel_array(s.view(-1).view(torch.int16))
        self.insc = kernel_array(isc.view(-1).view(torch.int16))

    def rows(self, r0: int = 0, r1: int | None = None, out=None):
        """Rows [r0, r1) as fp16 [r1-r0, K], written into ``out`` (contiguous fp16 of at least that
        many elements, viewed to the shape) or a new tensor."""
        import torch

        from ._runtime import current_stream, kernel_array

        r1 = self.N if r1 is None else r1
        n, K = r1 - r0, self.K
        if not 0 <= r0 <= r1 <= self.N:
            raise ValueError(f"dequantize_fp16: rows [{r0}, {r1}) outside [0, {self.N})")
        q = self._keep[0]
        if out is None:
            out = torch.empty((n, K), dtype=torch.float16, device=q.device)
        else:
            if out.dtype != torch.float16 or not out.is_contiguous() or out.numel() < n * K:
                raise ValueError("dequantize_fp16: out must be a contiguous fp16 tensor of n·K elements")
            out = out.view(-1)[:n * K].view(n, K)
        if n == 0:
            return out
        U.check_aligned(out, "dequantize_fp16 output")
        o = kernel_array(out.view(-1).view(torch.int32))
        wpr = K // 8
        w0, w1 = r0 * wpr, r1 * wpr
        grid = max(1, min((w1 - w0 + THREADS - 1) // THREADS, MAX_BLOCKS))
        if self.fmt == "int4":
            k = U.build_kernel(("dequant-int4",), INT4_SOURCE, "dequant_int4_kernel")
            k[grid, THREADS, current_stream()](self.wq, self.sc, self.insc, o, w0, w1, wpr, K // self.group,
                                               self.group.bit_length() - 1, self.has_insc)
        else:
            k = U.build_kernel(("dequant-int8",), INT8_SOURCE, "dequant_int8_kernel")
            k[grid, THREADS, current_stream()](self.wq, self.sc, self.insc, o, w0, w1, wpr, self.has_insc)
        return out


def dequantize_fp16(fmt: str, qweight, scale, input_scale=None, group: int = 0, rows: slice | None = None,
                    out=None):
    """Rows ``rows`` (default all) of a stored int4 / int8 weight as fp16 [n, K] (see Dequantizer.rows)."""
    r0, r1, _ = (rows or slice(None)).indices(qweight.shape[0])
    return Dequantizer(fmt, qweight, scale, input_scale, group).rows(r0, r1, out)
