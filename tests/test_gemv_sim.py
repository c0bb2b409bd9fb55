"""Quantized GEMV kernels under the Numba CUDA simulator (no GPU needed).

numba reads NUMBA_ENABLE_CUDASIM when it is imported, so the kernels run in a subprocess."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

SCRIPT = textwrap.dedent(r"""
    import numpy as np
    from edge_rwkv.quant import formats as F
    from edge_rwkv.cuda_kernels import gemv_int8, gemv_int4, _gemv_util as U
    assert U.simulator_enabled()
    rng = np.random.default_rng(0)

    def check(name, got, ref):
        got = np.asarray(got, dtype=np.float64); ref = np.asarray(ref, dtype=np.float64)
        assert np.isfinite(got).all(), name
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 2e-6, (name, err)
        print("ok", name, f"{err:.2e}")

    # int8: K covers one unrolled step (4*512) and the tail loop; N not a multiple of the warps/block
    for M, N, K in [(1, 6, 2560), (3, 5, 512)]:
        w = rng.standard_normal((N, K)).astype(np.float32)
        w[1, 7] = 9.0  # an outlier
        q, s = F.quantize_int8_ref(w)
        x = rng.standard_normal((M, K)).astype(np.float32)
        ref = x.astype(np.float64) @ F.dequantize_int8_ref(q, s).astype(np.float64).T
        out = np.full((M, N), np.nan, dtype=np.float32)
        gemv_int8.launch_int8(q.reshape(-1).view(np.int32), s.view(np.int16), x.reshape(-1), out, N, K)
        check(f"int8 M={M} N={N} K={K}", out, ref)

    # int4: group sizes 32/64/128, K with and without the unrolled step (4*1024)
    for M, N, K, g in [(1, 5, 5120, 128), (2, 3, 1024, 64), (1, 4, 2048, 32)]:
        w = rng.standard_normal((N, K)).astype(np.float32)
        w[0, 3] = -7.5
        p, s = F.quantize_int4_ref(w, g)
        x = rng.standard_normal((M, K)).astype(np.float32)
        ref = x.astype(np.float64) @ F.dequantize_int4_ref(p, s, g).astype(np.float64).T
        out = np.full((M, N), np.nan, dtype=np.float32)
        gemv_int4.launch_int4(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), x.reshape(-1), out, N, K, g)
        check(f"int4 M={M} N={N} K={K} g={g}", out, ref)

    # every nibble / byte value, including -8 (reachable with clipped scales) and -128 never stored
    allq = np.tile(np.arange(-8, 8, dtype=np.int8), 64).reshape(2, 512)
    p = F.pack_int4_ref(allq)
    s = np.ones((2, 4), dtype=np.float16)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    out = np.zeros((1, 2), dtype=np.float32)
    gemv_int4.launch_int4(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), x.reshape(-1), out, 2, 512, 128)
    check("int4 all levels", out, x.astype(np.float64) @ allq.astype(np.float64).T)
    q8 = np.tile(np.arange(-127, 128, dtype=np.int16), 3)[:512].astype(np.int8).reshape(1, 512)
    out = np.zeros((1, 1), dtype=np.float32)
    gemv_int8.launch_int8(q8.reshape(-1).view(np.int32), np.ones(1, np.float16).view(np.int16), x.reshape(-1), out, 1, 512)
    check("int8 all levels", out, x.astype(np.float64) @ q8.astype(np.float64).T)
    print("ALL OK")
""")


A8_SCRIPT = textwrap.dedent(r"""
    import numpy as np, torch
    from edge_rwkv.quant import formats as F
    from edge_rwkv.cuda_kernels import gemv_a8, _gemv_util as U
    assert U.simulator_enabled()
    rng = np.random.default_rng(1)

    def quantize(x, pairs):
        M, K = x.shape
        xq = np.zeros(M * K, np.int8); xs = np.full(M * K // 32, np.nan, np.float32)
        xz = np.zeros(M * K // 32, np.int32)
        gemv_a8.launch_quantize_x(x.reshape(-1), xq, xs, xz, M, K, pairs)
        q = xq.reshape(M, K)
        if pairs:  # undo the (even, odd) order inside each 8 values
            order = np.arange(K).reshape(-1, 8)
            order = np.concatenate([order[:, 0::2], order[:, 1::2]], 1).reshape(-1)
            nat = np.empty_like(q); nat[:, order] = q; q = nat
        # against the torch reference: equal up to rounding ties (x·127/amax exactly k + 0.5)
        rq, rs, rz = gemv_a8.quantize_x_reference(torch.from_numpy(x.astype(np.float32)), pairs)
        diff = np.abs(q.astype(np.int32) - rq.numpy())
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, diff.max()
        assert np.allclose(xs, rs.numpy().reshape(-1), rtol=1e-6)
        assert (xz == -8 * q.reshape(M, -1, 32).sum(-1, dtype=np.int32).reshape(-1)).all()
        return xq, xs, xz, (q.astype(np.float64).reshape(M, -1, 32) * xs.reshape(M, -1, 1)).reshape(M, K)

    def check(name, got, xr, x, wd, xs):
        got = np.asarray(got, dtype=np.float64)
        assert np.isfinite(got).all(), name
        ref, exact = xr @ wd.T, x.astype(np.float64) @ wd.T
        e_ref = np.linalg.norm(got - ref) / np.linalg.norm(ref)  # the kernel's own arithmetic
        assert e_ref < 1e-6, (name, e_ref)
        # rounding x to int8 moves each value by at most half its block's step
        half_step = np.repeat(xs.reshape(x.shape[0], -1), 32, axis=1) / 2
        bound = half_step @ np.abs(wd).T
        assert (np.abs(got - exact) <= bound * (1 + 1e-5) + 1e-5).all(), name
        print("ok", name, f"{e_ref:.1e}", f"{np.abs(got - exact).max() / bound.max():.2f} of the bound")

    # the default layout, and persistent pipelined grids: few blocks walking several row groups (the
    # simulator has 4 SMs), K spanning one or two block steps (2 warps cover 2048 weights a step)
    tilings = [None, gemv_a8.Tiling(warps=2, rows=2, pipelined=True, blocks_per_sm=1),
               gemv_a8.Tiling(warps=1, rows=3, pipelined=True, blocks_per_sm=1)]
    for tiling in tilings:
        for M, N, K, g in [(1, 13, 2048 + 128, 128), (2, 3, 1024, 64), (3, 6, 512, 32)]:
            w = rng.standard_normal((N, K)).astype(np.float32)
            w[0, 3] = -7.5
            p, s = F.quantize_int4_ref(w, g)
            x = rng.standard_normal((M, K)).astype(np.float32 if M != 2 else np.float16)
            x[0, 5] = 40.0  # an outlier in one block
            xq, xs, xz, xr = quantize(x, True)
            wd = F.dequantize_int4_ref(p, s, g).astype(np.float64)
            out = np.full((M, N), np.nan, np.float32)
            gemv_a8.launch_int4_a8(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), xq.view(np.int32),
                                   xs, xz, out.reshape(-1), M, N, K, g, tiling=tiling)
            check(f"int4-a8 M={M} N={N} K={K} g={g} {tiling}", out, xr, x, wd, xs)

        for M, N, K in [(1, 11, 2048 + 64), (2, 5, 1024 + 32)]:
            w = rng.standard_normal((N, K)).astype(np.float32)
            q, s = F.quantize_int8_ref(w)
            x = rng.standard_normal((M, K)).astype(np.float16)
            xq, xs, xz, xr = quantize(x, False)
            wd = F.dequantize_int8_ref(q, s).astype(np.float64)
            out = np.full((M, N), np.nan, np.float32)
            gemv_a8.launch_int8_a8(q.reshape(-1).view(np.int32), s.view(np.int16), xq.view(np.int32), xs,
                                   out.reshape(-1), M, N, K, tiling=tiling)
            check(f"int8-a8 M={M} N={N} K={K} {tiling}", out, xr, x, wd, xs)

    # relu² at the store (the FFN key): the same product, activated
    for fmt in ("int4", "int8"):
        M, N, K = 2, 8, 256
        w = rng.standard_normal((N, K)).astype(np.float32)
        x = rng.standard_normal((M, K)).astype(np.float32)
        xq, xs, xz, xr = quantize(x, fmt == "int4")
        plain, act = np.full((M, N), np.nan, np.float32), np.full((M, N), np.nan, np.float32)
        if fmt == "int4":
            p, s = F.quantize_int4_ref(w, 64)
            for o, a in ((plain, "none"), (act, "relu2")):
                gemv_a8.launch_int4_a8(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), xq.view(np.int32),
                                       xs, xz, o.reshape(-1), M, N, K, 64, act=a)
        else:
            q, s = F.quantize_int8_ref(w)
            for o, a in ((plain, "none"), (act, "relu2")):
                gemv_a8.launch_int8_a8(q.reshape(-1).view(np.int32), s.view(np.int16), xq.view(np.int32), xs,
                                       o.reshape(-1), M, N, K, act=a)
        assert (plain < 0).any() and np.allclose(act, np.maximum(plain, 0) ** 2, rtol=1e-6, atol=0), fmt
        print("ok relu2", fmt)

    # every nibble level against all-equal x (no rounding of x): exact
    allq = np.tile(np.arange(-8, 8, dtype=np.int8), 64).reshape(2, 512)
    x = np.full((1, 512), 0.5, np.float32)
    xq, xs, xz, xr = quantize(x, True)
    out = np.zeros((1, 2), np.float32)
    gemv_a8.launch_int4_a8(F.pack_int4_ref(allq).reshape(-1).view(np.int32),
                           np.ones((2, 4), np.float16).reshape(-1).view(np.int16), xq.view(np.int32), xs, xz,
                           out.reshape(-1), 1, 2, 512, 128)
    assert (out == x.astype(np.float64) @ allq.T.astype(np.float64)).all(), out

    # stacked: three int4 matrices of 8 rows, each with its own 2 rows of x (r, k, v of a layer)
    G, M, n, K, g = 3, 2, 8, 256, 64
    w = rng.standard_normal((G * n, K)).astype(np.float32)
    p, s = F.quantize_int4_ref(w, g)
    x = rng.standard_normal((G * M, K)).astype(np.float32)
    xq, xs, xz, xr = quantize(x, True)
    wd = F.dequantize_int4_ref(p, s, g).astype(np.float64)
    out = np.full((G, M, n), np.nan, np.float32)
    gemv_a8.launch_int4_a8(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), xq.view(np.int32), xs, xz,
                           out.reshape(-1), M, G * n, K, g, groups=G)
    ref = np.stack([xr[i * M:(i + 1) * M] @ wd[i * n:(i + 1) * n].T for i in range(G)])
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < 1e-6, err
    piped = np.full((G, M, n), np.nan, np.float32)
    gemv_a8.launch_int4_a8(p.reshape(-1).view(np.int32), s.reshape(-1).view(np.int16), xq.view(np.int32), xs, xz,
                           piped.reshape(-1), M, G * n, K, g, groups=G, tiling=tilings[1], act="relu2")
    assert np.allclose(piped, np.maximum(out, 0) ** 2, rtol=1e-6, atol=0)
    print("ok stacked", err)
    print("ALL OK")
""")


SEG_SCRIPT = textwrap.dedent(r"""
    import numpy as np, torch
    from edge_rwkv.cuda_kernels import gemv_seg as G, _gemv_util as U
    assert U.simulator_enabled()
    torch.manual_seed(0)

    def run(buf, segs, x, M, out_dtype):
        st = G.build_table(buf, segs)
        size = max(s.out_off + (M - 1) * s.out_stride + s.weight.shape[0] for s in segs)
        out = np.full(size, np.nan, out_dtype)
        G.launch(buf.numpy().reshape(-1).view(np.int32), x.numpy().reshape(-1).view(np.int32), out,
                 st.table.numpy(), st.nrows, M, rows=st.rows, warps=st.warps)
        ref = G.seg_gemv_reference(segs, x, size, M)
        got = torch.from_numpy(out.astype(np.float64))
        assert torch.equal(torch.isnan(got), torch.isnan(ref))  # exactly the segments' outputs written
        ok = ~torch.isnan(ref)
        return float((got[ok] - ref[ok]).abs().max() / ref[ok].abs().max())

    # five segments over one buffer reading slots of a [6, M, C] input, each activation, outputs as
    # contiguous [M, rows] blocks and one strided into another's rows
    C, Rv, Rg, M = 64, 16, 32, 2
    buf = (torch.randn(3 * C + Rv + Rg, C) * 0.3).half()
    x = torch.randn(6, M, C).half()
    segs = [G.Segment(buf[0:C], 0, C, 0), G.Segment(buf[C:2 * C], M * C, C, M * C, "tanh"),
            G.Segment(buf[2 * C:3 * C], 2 * M * C, C, 2 * M * C, "relu2"),
            G.Segment(buf[3 * C:3 * C + Rv], 3 * M * C, C, 3 * M * C, "sigmoid"),
            G.Segment(buf[3 * C + Rv:], 5 * M * C, C, 3 * M * C + Rv, "none", out_stride=2 * Rg)]
    err = run(buf, segs, x, M, np.float16)
    assert err < 2e-3, err  # fp16 output
    print("ok segments", err)
    # one segment, K not a multiple of the block's step (1024), fp32 output
    x2 = torch.randn(1, 1000 + 24).half()
    w2 = (torch.randn(16, x2.shape[1]) * 0.1).half()
    err = run(w2, [G.Segment(w2, 0, 0, 0)], x2, 1, np.float32)
    assert err < 1e-5, err
    print("ok long K", err)
    # misuse: a segment that is not a view of the buffer, a transposed view, rows not a whole block
    for bad in (lambda: G.build_table(buf, [G.Segment(w2, 0, 0, 0)]),
                lambda: G.build_table(buf, [G.Segment(buf[:, :8].t(), 0, 0, 0)]),
                lambda: G.build_table(buf, [G.Segment(buf[:4], 0, 0, 0)])):
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError("bad segment accepted")
    print("ALL OK")
""")


DEQUANT_SCRIPT = textwrap.dedent(r"""
    import torch
    from edge_rwkv.cuda_kernels import dequant as D, _gemv_util as U
    from edge_rwkv.quant import formats as F
    assert U.simulator_enabled()
    torch.manual_seed(0)
    for fmt, N, K, g, with_insc in [("int4", 5, 256, 128, False), ("int4", 3, 192, 64, True),
                                    ("int4", 4, 64, 32, False), ("int8", 5, 72, 0, False), ("int8", 3, 40, 0, True)]:
        w = torch.randn(N, K)
        w[0, 3] = 9.0  # an outlier
        q, s = F.quantize_int4_torch(w, g) if fmt == "int4" else F.quantize_int8_torch(w)
        isc = (torch.rand(K) + 0.5).half() if with_insc else None
        ref = (F.dequantize_int4_torch(q, s, g, torch.float16, isc) if fmt == "int4"
               else F.dequantize_int8_torch(q, s, torch.float16, isc))
        assert torch.equal(D.dequantize_fp16(fmt, q, s, isc, g), ref), fmt  # bit for bit
        buf = torch.full((N * K + 64,), float("nan"), dtype=torch.float16)  # rows 1.. into a larger buffer
        assert torch.equal(D.dequantize_fp16(fmt, q, s, isc, g, rows=slice(1, N), out=buf), ref[1:]), fmt
        assert torch.isnan(buf[(N - 1) * K:]).all()  # nothing written past the slab
        print("ok", fmt, N, K, g, with_insc)
    for bad in (lambda: D.dequantize_fp16("int8", torch.zeros(2, 12, dtype=torch.int8), torch.ones(2).half()),
                lambda: D.dequantize_fp16("int4", torch.zeros(2, 128, dtype=torch.uint8), torch.ones(2, 1).half(),
                                          group=256)):
        try:
            bad()
        except ValueError as e:
            assert "not supported" in str(e)
        else:
            raise AssertionError("unsupported shape accepted")
    assert not D.supported("int4", 256, 256) and D.supported("int4", 256, 128) and not D.supported("int8", 12)
    q, s = F.quantize_int8_torch(torch.randn(4, 16))
    dq = D.Dequantizer("int8", q, s)
    for bad in (lambda: dq.rows(2, 5), lambda: dq.rows(3, 1), lambda: dq.rows(-1, 2),
                lambda: dq.rows(0, 4, out=torch.empty(64)),                       # fp32, not fp16
                lambda: dq.rows(0, 4, out=torch.empty(63, dtype=torch.float16)),  # too small
                lambda: dq.rows(0, 2, out=torch.empty(8, 8, dtype=torch.float16).t())):  # not contiguous
        try:
            bad()
        except ValueError as e:
            assert "dequantize_fp16" in str(e)
        else:
            raise AssertionError("bad rows / output accepted")
    print("ALL OK")
""")


def test_dequantize_kernel_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", DEQUANT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_seg_gemv_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", SEG_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_a8_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", A8_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_gemv_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_gemv_a8_rejects_unknown_activation():
    from edge_rwkv.cuda_kernels import gemv_a8

    with pytest.raises(ValueError, match="activation 'gelu'"):
        gemv_a8.get_kernel("int4", 1, act="gelu")


def test_kernel_modules_import_without_gpu():
    # importing must not need a GPU (nor compile anything)
    from edge_rwkv.cuda_kernels import gemv_a8, gemv_int4, gemv_int8

    assert "ld_u32x4" in gemv_int8.kernel_source(2) and "unpack_s4x8" in gemv_int4.kernel_source(1)
    assert "dp4a_us" in gemv_a8.int4_source(2) and "dp4a_ss" in gemv_a8.int8_source(1)
