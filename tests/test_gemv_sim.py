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


def test_gemv_kernels_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_kernel_modules_import_without_gpu():
    # importing must not need a GPU (nor compile anything)
    from edge_rwkv.cuda_kernels import gemv_int4, gemv_int8

    assert "ld_u32x4" in gemv_int8.kernel_source(2) and "unpack_s4x8" in gemv_int4.kernel_source(1)
