"""Quantized GEMV kernels and QuantLinear on a CUDA GPU (skipped without one)."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("numba")

from edge_rwkv.cuda_kernels import gemv_a8, gemv_int4, gemv_int8  # noqa: E402
from edge_rwkv.quant.formats import (dequantize_int4_torch, dequantize_int8_torch, int4_spec,  # noqa: E402
                                     int8_spec, quantize_rtn)
from edge_rwkv.quant.linear import QuantLinear  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("N,K", [(256, 512), (300, 1536), (64, 4096 + 1024)])
@pytest.mark.parametrize("M", [1, 3])  # 4 and 16 rows: benchmarks/bench_gemv.py checks them
@pytest.mark.parametrize("fmt", ["int8", "int4-128", "int4-64", "int4-32"])
def test_kernel_matches_reference(N, K, M, fmt):
    torch.manual_seed(N * K + M)
    w = torch.randn(N, K, device="cuda")
    x = torch.randn(M, K, device="cuda")
    if fmt == "int8":
        qw = quantize_rtn(w, int8_spec())
        prep = gemv_int8.PreparedInt8(qw.qweight, qw.scale)
        run = lambda xx, out=None: gemv_int8.gemv_int8(xx, prep, out)  # noqa: E731
        wd = dequantize_int8_torch(qw.qweight, qw.scale)
    else:
        g = int(fmt.split("-")[1])
        qw = quantize_rtn(w, int4_spec(g))
        prep = gemv_int4.PreparedInt4(qw.qweight, qw.scale, g)
        run = lambda xx, out=None: gemv_int4.gemv_int4(xx, prep, out)  # noqa: E731
        wd = dequantize_int4_torch(qw.qweight, qw.scale, g)
    ref = x.double() @ wd.double().t()
    out = torch.full((M, N), float("nan"), device="cuda")
    run(x, out)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    yh = run(x.half())
    assert yh.dtype == torch.float16 and rel(yh, ref) < 2e-3
    # int8 activations (W4A8 / W8A8): the kernel's own arithmetic vs its reference, and the total
    # error of rounding x, fp32 and fp16 x. The GPU contracts x·(127/amax) + 0.5 into one fma, so a
    # value within an ulp of a rounding tie may round the other way than torch: one such step moves
    # the product by ~1/(127·√K) relative (2e-4 at K=1536, seen) — hence 1e-3, far below a wrong weight.
    a8_ref = gemv_a8.gemv_a8_reference(x, wd)
    y8 = torch.full((M, N), float("nan"), device="cuda")
    gemv_a8.gemv_a8(x, prep, y8)
    assert torch.isfinite(y8).all() and rel(y8, a8_ref) < 1e-3 and rel(y8, ref) < 2e-2
    y8h = gemv_a8.gemv_a8(x.half(), prep)
    assert y8h.dtype == torch.float16 and rel(y8h, gemv_a8.gemv_a8_reference(x.half().float(), wd)) < 2e-3


def test_cuda_graph_capture_and_replay():
    N, K = 512, 2048
    w = torch.randn(N, K, device="cuda")
    lin8 = QuantLinear(quantize_rtn(w, int8_spec()))
    lin4 = QuantLinear(quantize_rtn(w, int4_spec(128)))
    assert lin8.path == "cuda-gemv-a8" and lin4.path == "cuda-gemv-a8"
    x = torch.randn(1, K, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin8(x), lin4(x)  # compile + prepare outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y8 = lin8(x)
        y4 = lin4(x)
    for _ in range(3):
        x.copy_(torch.randn(1, K, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        assert rel(y8, gemv_a8.gemv_a8_reference(x, lin8.dequantize())) < 1e-4
        assert rel(y4, gemv_a8.gemv_a8_reference(x, lin4.dequantize())) < 1e-4


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantlinear_cuda_paths(rows, dtype):
    N, K = 384, 1024
    w = torch.randn(N, K)
    for spec in (int8_spec(), int4_spec(64)):
        lin = QuantLinear(quantize_rtn(w, spec)).to("cuda")
        lin.scratch_bytes = 64 * K * 2  # force several slabs on the prefill path
        x = torch.randn(rows, K, device="cuda").to(dtype)
        y = lin(x)
        assert y.shape == (rows, N) and y.dtype == dtype
        if rows <= lin.gemv_max_rows:  # int8-activation kernels
            ref = gemv_a8.gemv_a8_reference(x.float(), lin.dequantize())
            assert rel(y, ref) < (1e-4 if dtype == torch.float32 else 1e-2)
            lin.int8_activations = False  # the fp32-activation kernels
            y = lin(x)
        ref = x.double() @ lin.dequantize().double().t()
        assert rel(y, ref) < (1e-5 if dtype == torch.float32 and rows <= 16 else 1e-2)


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 32), ("int8", 0)])
@pytest.mark.parametrize("input_scale", [False, True])
def test_dequantize_fp16_kernel_is_bit_exact(fmt, group, input_scale):
    from edge_rwkv.cuda_kernels.dequant import dequantize_fp16

    N, K = 1000, 4096 + 128
    w = torch.randn(N, K, device="cuda")
    spec = int4_spec(group) if fmt == "int4" else int8_spec()
    qw = quantize_rtn(w.cpu(), spec)
    q, s = qw.qweight.cuda(), qw.scale.cuda()
    isc = (torch.rand(K, device="cuda") + 0.5).half() if input_scale else None
    ref = (dequantize_int4_torch(q, s, group, torch.float16, isc) if fmt == "int4"
           else dequantize_int8_torch(q, s, torch.float16, isc))
    assert torch.equal(dequantize_fp16(fmt, q, s, isc, group), ref)
    buf = torch.full((600 * K,), float("nan"), device="cuda", dtype=torch.float16)
    got = dequantize_fp16(fmt, q, s, isc, group, rows=slice(400, 1000), out=buf)
    assert torch.equal(got, ref[400:])
