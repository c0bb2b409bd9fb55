"""Shared pieces of the quantized GEMV kernels (gemv_int8.py, gemv_int4.py).

* Register-level helpers used inside kernels: 16-byte global loads, int8 / int4 unpacking to exact
  fp32 integers, fp16 -> fp32. On a GPU they are Numba intrinsics emitting one PTX instruction
  each (``ld.global.nc.v4``, ``prmt``, ``cvt``) or a few LLVM ops; under the Numba CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1``) they are plain Python with the same results.
* Kernel source generation: kernels are specialised on the number of activation rows M (1..16) so
  that the M accumulators live in registers; ``build_kernel`` compiles generated source once per M.
* torch interop: zero-copy views (``cuda.as_cuda_array(..., sync=False)``: no host sync), the
  numba stream wrapping torch's current stream, cached per stream handle.

Numba is imported lazily: importing this module never fails on a machine without numba or a GPU.
"""

from __future__ import annotations

import threading

MAX_ROWS = 16
_lock = threading.Lock()
_helpers = None
_kernels: dict = {}
_streams: dict = {}


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
        from numba import cuda  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def simulator_enabled() -> bool:
    try:
        from numba.cuda.core import config
    except Exception:  # pragma: no cover
        return False
    return bool(config.ENABLE_CUDASIM)


# ----------------------------------------------------------------------------------------------
# helpers: simulator versions (plain Python, same arithmetic)


def _sim_helpers() -> dict:
    import numpy as np

    f32 = np.float32

    def ld_u32x4(arr, i):
        return (int(arr[i]) & 0xFFFFFFFF, int(arr[i + 1]) & 0xFFFFFFFF,
                int(arr[i + 2]) & 0xFFFFFFFF, int(arr[i + 3]) & 0xFFFFFFFF)

    def ld_f32x4(arr, i):
        return f32(arr[i]), f32(arr[i + 1]), f32(arr[i + 2]), f32(arr[i + 3])

    def unpack_s8x4(w):
        w = int(w) & 0xFFFFFFFF
        r = []
        for j in range(4):
            b = (w >> (8 * j)) & 0xFF
            r.append(f32(b - 256 if b >= 128 else b))
        return tuple(r)

    def unpack_s4x8(w):
        w = int(w) & 0xFFFFFFFF
        r = []
        for j in range(8):
            n = (w >> (4 * j)) & 0xF
            r.append(f32(n - 16 if n >= 8 else n))
        return tuple(r)

    def h2f(u):
        return f32(np.array([u], dtype=np.int16).view(np.float16)[0])

    # the simulator has no warp shuffles: lanes of a warp meet at a barrier and sum in lane order
    table: dict = {}
    tlock = threading.Lock()

    def warp_reduce(v, block, thread, op, cast):
        key = (int(block), int(thread) >> 5)
        with tlock:
            ent = table.get(key)
            if ent is None:
                ent = table[key] = (threading.Barrier(32), [None] * 32)
        bar, slots = ent
        slots[int(thread) & 31] = cast(v)
        bar.wait()
        total = slots[0]
        for s in slots[1:]:
            total = cast(op(total, s))
        bar.wait()
        return total

    def warp_sum(v, block, thread):
        return warp_reduce(v, block, thread, lambda a, b: a + b, f32)

    def warp_max(v, block, thread):
        return warp_reduce(v, block, thread, max, f32)

    def warp_sum_i(v, block, thread):
        return warp_reduce(v, block, thread, lambda a, b: a + b, int)

    def _bytes(w, signed):
        w = int(w) & 0xFFFFFFFF
        b = [(w >> (8 * j)) & 0xFF for j in range(4)]
        return [x - 256 if signed and x >= 128 else x for x in b]

    def _dp4a(a, b, c, a_signed):
        return int(np.int32(int(c) + sum(p * q for p, q in zip(_bytes(a, a_signed), _bytes(b, True)))))

    def dp4a_us(a, b, c):
        return _dp4a(a, b, c, False)

    def dp4a_ss(a, b, c):
        return _dp4a(a, b, c, True)

    def h2x2f(u):
        u = int(u) & 0xFFFFFFFF
        return tuple(f32(np.array([v], dtype=np.uint16).view(np.float16)[0]) for v in (u & 0xFFFF, u >> 16))

    def nibbles_u8x4(w):
        w = int(w) & 0xFFFFFFFF
        return (w & 0x0F0F0F0F) ^ 0x08080808, ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808

    def st_f16x8(arr, i, *vals):
        words = np.array(vals, dtype=np.float32).astype(np.float16).view(np.int32)
        for j in range(4):
            arr[i + j] = words[j]

    return dict(ld_u32x4=ld_u32x4, ld_u32x4_l1=ld_u32x4, ld_f32x4=ld_f32x4, unpack_s8x4=unpack_s8x4,
                unpack_s4x8=unpack_s4x8, h2f=h2f, warp_sum=warp_sum, warp_max=warp_max,
                warp_sum_i=warp_sum_i, dp4a_us=dp4a_us, dp4a_ss=dp4a_ss, nibbles_u8x4=nibbles_u8x4,
                h2x2f=h2x2f, st_f16x8=st_f16x8, float32=f32, int32=np.int32, uint32=np.uint32)


# ----------------------------------------------------------------------------------------------
# helpers: GPU intrinsics


def _gpu_helpers() -> dict:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    i16, i32, i64, f32t = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()

    def _address(context, builder, aryty, idxty, ary, idx):
        arr = context.make_array(aryty)(context, builder, value=ary)
        idx = context.cast(builder, idx, idxty, types.int64)
        return builder.ptrtoint(builder.gep(arr.data, [idx]), i64)

    def _ld4(elem_llvm, elem_numba, asm_text, cons):
        rett = types.UniTuple(elem_numba, 4)

        @intrinsic
        def ld(typingctx, arr, idx):
            if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype.bitwidth != 32:
                return None
            sig = rett(arr, idx)

            def codegen(context, builder, sig, args):
                addr = _address(context, builder, sig.args[0], sig.args[1], args[0], args[1])
                st = ir.LiteralStructType([elem_llvm] * 4)
                fn = ir.InlineAsm(ir.FunctionType(st, [i64]), asm_text, cons)
                res = builder.call(fn, [addr])
                return context.make_tuple(builder, rett, [builder.extract_value(res, j) for j in range(4)])

            return sig, codegen

        return ld

    # weights are streamed once: keep them out of L1 so the activations stay there
    ld_u32x4 = _ld4(i32, types.uint32, "ld.global.nc.L1::no_allocate.v4.u32 {$0, $1, $2, $3}, [$4];",
                    "=r,=r,=r,=r,l")
    ld_f32x4 = _ld4(f32t, types.float32, "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];",
                    "=f,=f,=f,=f,l")
    # activations are re-read by every warp: cache them in L1
    ld_u32x4_l1 = _ld4(i32, types.uint32, "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l")

    def _as_i32(builder, v):
        if v.type == i32:
            return v
        return builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32)

    def _dp4a(asm_text):
        @intrinsic
        def dp4a(typingctx, a, b, c):
            sig = types.int32(a, b, c)

            def codegen(context, builder, sig, args):
                fn = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), asm_text, "=r,r,r,r")
                return builder.call(fn, [_as_i32(builder, v) for v in args])

            return sig, codegen

        return dp4a

    # four byte products summed into c; a's bytes unsigned (nibbles + 8) or signed, b's signed
    dp4a_us = _dp4a("dp4a.u32.s32 $0, $1, $2, $3;")
    dp4a_ss = _dp4a("dp4a.s32.s32 $0, $1, $2, $3;")

    @intrinsic
    def nibbles_u8x4(typingctx, w):
        # even / odd nibbles of a packed int4 word as four bytes each, two's complement → q + 8
        rett = types.UniTuple(types.int32, 2)
        sig = rett(w)

        def codegen(context, builder, sig, args):
            v = _as_i32(builder, args[0])
            m, o = ir.Constant(i32, 0x0F0F0F0F), ir.Constant(i32, 0x08080808)
            lo = builder.xor(builder.and_(v, m), o)
            hi = builder.xor(builder.and_(builder.lshr(v, ir.Constant(i32, 4)), m), o)
            return context.make_tuple(builder, rett, [lo, hi])

        return sig, codegen

    @intrinsic
    def unpack_s8x4(typingctx, w):
        # byte j (two's complement) -> exact fp32: prmt builds 0x4B0000(b^0x80) = 2^23 + q + 128
        rett = types.UniTuple(types.float32, 4)
        sig = rett(w)

        def codegen(context, builder, sig, args):
            v = builder.xor(builder.trunc(args[0], i32) if args[0].type != i32 else args[0],
                            ir.Constant(i32, 0x80808080))
            prmt = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "prmt.b32 $0, $1, $2, $3;",
                                "=r,r,r,r")
            vals = []
            for j in range(4):
                t = builder.call(prmt, [v, ir.Constant(i32, 0x4B000000), ir.Constant(i32, 0x7440 | j)])
                f = builder.bitcast(t, f32t)
                vals.append(builder.fsub(f, ir.Constant(f32t, 8388736.0)))
            return context.make_tuple(builder, rett, vals)

        return sig, codegen

    @intrinsic
    def unpack_s4x8(typingctx, w):
        # nibble e (bits 4e..4e+3, two's complement) -> exact fp32. The offset-binary nibble u = q+8
        # is or-ed into the mantissa of 2^23 at bit 4p (p <= 4) and scaled back with one multiply-add:
        # (2^23 + u*2^4p) * 2^-4p - (2^(23-4p) + 8) = q, exactly. Nibbles 5..7 come from w >> 12.
        rett = types.UniTuple(types.float32, 8)
        sig = rett(w)

        def codegen(context, builder, sig, args):
            w32 = builder.trunc(args[0], i32) if args[0].type != i32 else args[0]
            v = builder.xor(w32, ir.Constant(i32, 0x88888888))
            v2 = builder.lshr(v, ir.Constant(i32, 12))
            vals = []
            for e in range(8):
                src, p = (v, e) if e < 5 else (v2, e - 3)
                t = builder.or_(builder.and_(src, ir.Constant(i32, 0xF << (4 * p))),
                                ir.Constant(i32, 0x4B000000))
                f = builder.bitcast(t, f32t)
                # both steps exact (power-of-two scaling, exact integer difference); ptxas fuses them
                f = builder.fmul(f, ir.Constant(f32t, 2.0 ** (-4 * p)))
                vals.append(builder.fadd(f, ir.Constant(f32t, -(2.0 ** (23 - 4 * p) + 8.0))))
            return context.make_tuple(builder, rett, vals)

        return sig, codegen

    @intrinsic
    def h2x2f(typingctx, u):
        # the two fp16 halves of a 32-bit word (low = the even element) as fp32
        rett = types.UniTuple(types.float32, 2)
        sig = rett(u)

        def codegen(context, builder, sig, args):
            v = _as_i32(builder, args[0])
            fn = ir.InlineAsm(ir.FunctionType(f32t, [i16]), "cvt.f32.f16 $0, $1;", "=f,h")
            lo = builder.call(fn, [builder.trunc(v, i16)])
            hi = builder.call(fn, [builder.trunc(builder.lshr(v, ir.Constant(i32, 16)), i16)])
            return context.make_tuple(builder, rett, [lo, hi])

        return sig, codegen

    @intrinsic
    def h2f(typingctx, u):
        sig = types.float32(u)

        def codegen(context, builder, sig, args):
            x = args[0]
            if x.type != i16:
                x = builder.trunc(x, i16)
            fn = ir.InlineAsm(ir.FunctionType(f32t, [i16]), "cvt.f32.f16 $0, $1;", "=f,h")
            return builder.call(fn, [x])

        return sig, codegen

    @intrinsic
    def st_f16x8(typingctx, arr, idx, v0, v1, v2, v3, v4, v5, v6, v7):
        # eight values rounded to fp16 (round to nearest even) and stored as one 16-byte write at
        # 32-bit element idx of arr (idx a multiple of 4); value 2j in the low half of word j
        if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype.bitwidth != 32:
            return None
        sig = types.none(arr, idx, *([types.float32] * 8))

        def codegen(context, builder, sig, args):
            addr = _address(context, builder, sig.args[0], sig.args[1], args[0], args[1])
            cvt = ir.InlineAsm(ir.FunctionType(i16, [f32t]), "cvt.rn.f16.f32 $0, $1;", "=h,f")
            h = [builder.zext(builder.call(cvt, [v]), i32) for v in args[2:]]
            words = [builder.or_(h[2 * j], builder.shl(h[2 * j + 1], ir.Constant(i32, 16))) for j in range(4)]
            st = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [i64, i32, i32, i32, i32]),
                              "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", side_effect=True)
            builder.call(st, [addr] + words)
            return context.get_dummy_value()

        return sig, codegen

    from numba import cuda

    @cuda.jit(device=True)
    def warp_sum(v, block, thread):  # butterfly: every lane ends with the warp's total
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 16)
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 8)
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 4)
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 2)
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, 1)
        return v

    @cuda.jit(device=True)
    def warp_max(v, block, thread):
        for off in (16, 8, 4, 2, 1):
            v = max(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, off))
        return v

    @cuda.jit(device=True)
    def warp_sum_i(v, block, thread):
        v = types.int32(v)
        for off in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
        return v

    return dict(ld_u32x4=ld_u32x4, ld_u32x4_l1=ld_u32x4_l1, ld_f32x4=ld_f32x4, unpack_s8x4=unpack_s8x4,
                unpack_s4x8=unpack_s4x8, h2f=h2f, warp_sum=warp_sum, warp_max=warp_max,
                warp_sum_i=warp_sum_i, dp4a_us=dp4a_us, dp4a_ss=dp4a_ss, nibbles_u8x4=nibbles_u8x4,
                h2x2f=h2x2f, st_f16x8=st_f16x8, float32=types.float32, int32=types.int32,
                uint32=types.uint32)


def sm_count() -> int:
    """Streaming multiprocessors of the current device (persistent grids size themselves by it)."""
    global _sm_count
    if _sm_count is None:
        from numba import cuda

        _sm_count = 4 if simulator_enabled() else cuda.get_current_device().MULTIPROCESSOR_COUNT
    return _sm_count


_sm_count = None


def helpers() -> dict:
    global _helpers
    with _lock:
        if _helpers is None:
            _helpers = _sim_helpers() if simulator_enabled() else _gpu_helpers()
        return _helpers


# ----------------------------------------------------------------------------------------------
# kernel building


def build_kernel(key, source: str, func_name: str):
    """Compile generated kernel ``source`` (defining ``func_name``) once per ``key``."""
    with _lock:
        k = _kernels.get(key)
    if k is not None:
        return k
    from numba import cuda

    ns = dict(helpers())
    ns["cuda"] = cuda
    exec(compile(source, f"<{func_name} {key}>", "exec"), ns)
    k = cuda.jit(ns[func_name])
    with _lock:
        _kernels[key] = k
    return k


def reduce_and_store_lines(M: int, R: int, ind: str, scaled: bool = False) -> list[str]:
    """Warp-reduce accumulators a{r}_{m}; lane 0 writes out[m, row0 + r] for rows below N."""
    lines = [f"{ind}a{r}_{m} = warp_sum(a{r}_{m}, cuda.blockIdx.x, cuda.threadIdx.x)"
             for r in range(R) for m in range(M)]
    lines.append(f"{ind}if lane == 0:")
    for r in range(R):
        lines.append(f"{ind}    if row0 + {r} < N:")
        for m in range(M):
            val = f"a{r}_{m} * rs{r}" if scaled else f"a{r}_{m}"
            lines.append(f"{ind}        out[{m}, row0 + {r}] = {val}")
    return lines


def block_reduce_lines(R: int, M: int, warps: int, ind: str, row_end: str) -> list[str]:
    """Split-K blocks (gemv_a8.py, gemv_seg.py): warp-sum a{r}_{m}, lane 0 puts each warp's partials in
    shared ``red``, then thread t < R·M adds the warps' partials of output (row0 + t // M, t % M) into
    ``v`` where that row is below ``row_end``; the caller stores v (lines indented ind + 8)."""
    L = [f"{ind}a{r}_{m} = warp_sum(a{r}_{m}, cuda.blockIdx.x, cuda.threadIdx.x)"
         for r in range(R) for m in range(M)]
    L.append(f"{ind}if lane == 0:")
    L += [f"{ind}    red[warp * {R * M} + {r * M + m}] = a{r}_{m}" for r in range(R) for m in range(M)]
    L += [f"{ind}cuda.syncthreads()",
          f"{ind}if t < {R * M}:",
          f"{ind}    row = row0 + t // {M}",
          f"{ind}    if row < {row_end}:",
          f"{ind}        v = red[t]"]
    L += [f"{ind}        v += red[{w * R * M} + t]" for w in range(1, warps)]
    return L


# ----------------------------------------------------------------------------------------------
# torch interop


def numba_stream_for_torch():
    """The numba stream object for torch's current CUDA stream (cached per handle)."""
    import torch
    from numba import cuda

    h = torch.cuda.current_stream().cuda_stream
    s = _streams.get(h)
    if s is None:
        s = cuda.external_stream(h)
        _streams[h] = s
    return s


def as_numba(t):
    """Zero-copy numba view of a CUDA torch tensor, without a host synchronisation (cached: see
    _runtime.kernel_array)."""
    from ._runtime import kernel_array

    return kernel_array(t)


def check_aligned(t, what: str) -> None:
    if t.data_ptr() % 16:
        raise ValueError(f"{what}: data must be 16-byte aligned for the GEMV kernel")
