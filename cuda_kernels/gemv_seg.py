"""Segmented fp16 GEMV for the decode step: several small products, one launch.

A decode step multiplies a few activation rows (M ≤ MAX_ROWS) by many small matrices: in a layer
r, k, v and four LoRA down-projections all read the same token-shifted inputs, then four LoRA
up-projections, the output and the two FFN matrices. Launched one by one through cuBLAS each costs
a few µs of fixed latency for ~1 MB of weights. Here the weight rows of several matrices live in
one fp16 buffer and a table of segments says, for each, where its rows and its input are and
which activation its output takes; one launch computes them all.

Segment table ``tab`` int32 [S, 9], one row per segment, rows in increasing order:
    row_start, row_end   rows [row_start, row_end) of the concatenated product
    K                    inner length (multiple of 8)
    w_off                first weight element (fp16 index; rows of K elements, row-major)
    x_off, x_stride      first input element of activation row 0 / distance between rows
    out_off, out_stride  where the segment's output row 0 starts in the flat ``out`` / between rows
    act                  0 none, 1 tanh, 2 sigmoid, 3 relu²
Each segment's rows and offsets must be multiples of ROWS_PER_BLOCK and 8 (16-byte loads).

A block of WARPS_PER_BLOCK warps takes ROWS_PER_BLOCK rows of one segment and splits K between
its threads (16-byte loads: 8 weights a thread a step); fp32 accumulation, warp shuffles + shared
memory to reduce, activation at the store. Runs on torch's current stream with no allocation:
graph-capturable. Reference: ``seg_gemv_reference``.
"""
from __future__ import annotations

from typing import NamedTuple

from . import _gemv_util as U

WARPS_PER_BLOCK = 4
ROWS_PER_BLOCK = 8  # rows a block streams together: 8 × 16 B in flight a thread, one reduction per 8 rows
MAX_ROWS = 4
ACTS = {"none": 0, "tanh": 1, "sigmoid": 2, "relu2": 3}


def kernel_source(M: int, R: int = ROWS_PER_BLOCK, W: int = WARPS_PER_BLOCK) -> str:
    L = ["import math",
         "",
         "def seg_gemv_kernel(w, x, out, tab, nseg, nrows):",
         "    lane = cuda.threadIdx.x & 31",
         "    warp = cuda.threadIdx.x >> 5",
         "    t = cuda.threadIdx.x",
         f"    red = cuda.shared.array({W * R * M}, float32)",
         f"    row0 = cuda.blockIdx.x * {R}",
         "    while row0 < nrows:",
         "        sg = 0",
         "        while sg < nseg - 1 and row0 >= tab[sg, 1]:",
         "            sg += 1",
         "        rs = tab[sg, 0]",
         "        re = tab[sg, 1]",
         "        K = tab[sg, 2]",
         "        wb = tab[sg, 3] >> 1",
         "        xb = tab[sg, 4] >> 1",
         "        xst = tab[sg, 5] >> 1"]
    ind = " " * 8
    for r in range(R):  # rows past the segment's end re-read its last row and are not stored
        L.append(f"{ind}o{r} = (min(row0 + {r}, re - 1) - rs) * (K >> 1) + wb")
    L += [f"{ind}a{r}_{m} = float32(0.0)" for r in range(R) for m in range(M)]
    L.append(f"{ind}e = t * 8")
    L.append(f"{ind}while e < K:")
    i2 = ind + "    "
    for r in range(R):
        L.append(f"{i2}w{r}_0, w{r}_1, w{r}_2, w{r}_3 = ld_u32x4(w, o{r} + (e >> 1))")
    for m in range(M):
        L.append(f"{i2}u0, u1, u2, u3 = ld_u32x4_l1(x, xb + {m} * xst + (e >> 1))")
        for j in range(4):
            L.append(f"{i2}x{j}a, x{j}b = h2x2f(u{j})")
        for r in range(R):
            terms = []
            for j in range(4):
                L.append(f"{i2}p{j}a, p{j}b = h2x2f(w{r}_{j})")
                terms += [f"p{j}a * x{j}a", f"p{j}b * x{j}b"]
            L.append(f"{i2}a{r}_{m} += " + " + ".join(terms))
    L.append(f"{i2}e += {8 * 32 * W}")
    L += U.block_reduce_lines(R, M, W, ind, "re")
    L += [f"{ind}        act = tab[sg, 8]",
          f"{ind}        if act == 1:",
          f"{ind}            v = math.tanh(v)",
          f"{ind}        elif act == 2:",
          f"{ind}            v = float32(1.0) / (float32(1.0) + math.exp(-v))",
          f"{ind}        elif act == 3:",
          f"{ind}            v = max(v, float32(0.0))",
          f"{ind}            v = v * v",
          f"{ind}        out[tab[sg, 6] + (t % {M}) * tab[sg, 7] + row - rs] = v",
          f"{ind}cuda.syncthreads()",
          f"{ind}row0 += cuda.gridDim.x * {R}"]
    return "\n".join(L) + "\n"


def get_kernel(M: int, R: int = ROWS_PER_BLOCK, W: int = WARPS_PER_BLOCK):
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"seg_gemv: 1..{MAX_ROWS} activation rows, got {M}")
    if ROWS_PER_BLOCK % R:
        raise ValueError(f"seg_gemv: {R} rows a block must divide the segments' row multiple {ROWS_PER_BLOCK}")
    return U.build_kernel(("seg-f16", M, R, W), kernel_source(M, R, W), "seg_gemv_kernel")


def launch(w, x, out, tab, nrows: int, M: int, stream=0, rows: int = ROWS_PER_BLOCK,
           warps: int = WARPS_PER_BLOCK) -> None:
    """w int32 view of the fp16 weights, x int32 view of the fp16 activations, out flat (fp16/fp32),
    tab int32 [S, 9]; nrows = the last segment's row_end; M activation rows; `rows` weight rows a
    block of `warps` warps streams together (a divisor of ROWS_PER_BLOCK)."""
    blocks = max(1, min((nrows + rows - 1) // rows, 65535))
    get_kernel(M, rows, warps)[blocks, 32 * warps, stream](w, x, out, tab, tab.shape[0], nrows)


class SegTable(NamedTuple):
    """A built table: the int32 [S, 9] tensor, its total rows, and the launch layout for its K."""
    table: object
    nrows: int
    rows: int
    warps: int


def layout_for(max_k: int) -> tuple[int, int]:
    """(rows a block, warps a block) by the table's longest K (bench_gemv.py --sweep seg, H200, B = 1,
    a 7.2B layer: the LoRA-ups, K ≤ 480, 4.7 µs with one warp a 4-row block vs 7.2 with 4 warps a
    8-row block, whose threads mostly idle at such K; the LoRA-downs, K = 4096, 4.7 µs with 8 warps a
    4-row block vs 5.6)."""
    return (4, 1) if max_k <= 512 else (4, 8)


class Segment:
    """One product of the table: `weight` [rows, K] (a row-major view into the weight buffer) applied
    to activation rows at x_off + m·x_stride of the flat input; output row m at out_off + m·out_stride
    of the flat output (out_stride defaults to rows: a contiguous [M, rows] block)."""

    __slots__ = ("weight", "x_off", "x_stride", "out_off", "out_stride", "act")

    def __init__(self, weight, x_off: int, x_stride: int, out_off: int, act: str = "none",
                 out_stride: int | None = None):
        self.weight, self.x_off, self.x_stride, self.out_off, self.act = weight, x_off, x_stride, out_off, act
        self.out_stride = weight.shape[0] if out_stride is None else out_stride


def build_table(buffer, segments: list[Segment]) -> SegTable:
    """The table over `buffer` (the fp16 tensor every segment's weight is a view of)."""
    import torch

    rows, r0 = [], 0
    base = buffer.data_ptr()
    for s in segments:
        n, K = s.weight.shape
        off = (s.weight.data_ptr() - base) // 2
        if s.weight.stride() != (K, 1) or (s.weight.data_ptr() - base) % 2 or not 0 <= off <= buffer.numel() - n * K:
            raise ValueError("seg_gemv: each segment's weight must be a row-major view into the buffer")
        if n % ROWS_PER_BLOCK or K % 8 or off % 8 or s.x_off % 8 or s.x_stride % 8:
            raise ValueError(f"seg_gemv: rows ({n}) must be a multiple of {ROWS_PER_BLOCK}; K ({K}), weight and "
                             "input offsets multiples of 8")
        rows.append([r0, r0 + n, K, off, s.x_off, s.x_stride, s.out_off, s.out_stride, ACTS[s.act]])
        r0 += n
    layout = layout_for(max(r[2] for r in rows))
    return SegTable(torch.tensor(rows, dtype=torch.int32, device=buffer.device), r0, *layout)


def seg_gemv(buffer, table: SegTable, x, out, M: int) -> None:
    """out[out_off + m·out_stride + i] = act(Σ_k W_s[i, k] · x[x_off + m·x_stride + k]) for every
    segment s and activation row m < M. buffer, x: fp16 tensors (16-byte aligned); out contiguous
    fp16 or fp32 (any shape: addressed flat)."""
    import torch

    from ._runtime import current_stream, kernel_array

    if buffer.dtype != torch.float16 or x.dtype != torch.float16:
        raise ValueError("seg_gemv: fp16 weights and activations expected")
    U.check_aligned(buffer, "seg_gemv weights")
    U.check_aligned(x, "seg_gemv activations")
    launch(kernel_array(buffer.view(-1).view(torch.int32)), kernel_array(x.reshape(-1).view(torch.int32)),
           kernel_array(out.view(-1)), kernel_array(table.table), table.nrows, M, current_stream(), table.rows,
           table.warps)


def seg_gemv_reference(segments: list[Segment], x, out_size: int, M: int):
    """fp64 reference of the whole table: the flat output [out_size]."""
    import torch

    xf = x.reshape(-1).double()
    out = torch.full((out_size,), float("nan"), dtype=torch.float64)  # NaN where no segment writes
    for s in segments:
        n, K = s.weight.shape
        xs = torch.stack([xf[s.x_off + m * s.x_stride: s.x_off + m * s.x_stride + K] for m in range(M)])
        y = xs @ s.weight.double().t().to(xs.device)
        y = {"none": y, "tanh": torch.tanh(y), "sigmoid": torch.sigmoid(y), "relu2": torch.relu(y) ** 2}[s.act]
        for m in range(M):
            out[s.out_off + m * s.out_stride:s.out_off + m * s.out_stride + n] = y[m].cpu()
    return out
