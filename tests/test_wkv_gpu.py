"""WKV-7 Numba-CUDA kernels on a GPU against a float64 reference (skipped without CUDA)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _wkv_inputs import make_inputs, ref64, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu


def _ready():
    if not torch.cuda.is_available():
        return False
    from edge_rwkv.cuda_kernels import cuda_available

    return cuda_available()


skip = pytest.mark.skipif(not _ready(), reason="needs CUDA and numba-cuda")


@pytest.fixture(autouse=True)
def ieee_fp32_products():
    """fp32 inputs run at the caller's matmul precision: hold it at the default (IEEE) whatever ran before."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [1, 12, 64])
@pytest.mark.parametrize("B", [1, 3])
def test_decode(B, H, dtype):
    xs = make_inputs(B, 1, H, 64, dtype, device="cuda", seed=B * 100 + H)
    yr, sr = ref64(*xs)
    state = xs[6].clone()
    out = torch.full((B, 1, H, 64), float("nan"), device="cuda")
    from edge_rwkv.cuda_kernels import wkv7_decode

    wkv7_decode(*xs[:6], state, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert rel_err(out, yr) <= TOL[dtype] and rel_err(state, sr) <= TOL[dtype]


@skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", [1, 12, 64])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 13, 64, 4100])
def test_prefill(T, B, H, dtype):
    from edge_rwkv.cuda_kernels.wkv_prefill import prefill_forward

    xs = make_inputs(B, T, H, 64, dtype, device="cuda", seed=T + B + H, decay_bias=4.0 if T == 4100 else 0.0)
    yr, sr = ref64(*xs)
    s0 = xs[6].clone()
    y, s, _ = prefill_forward(*xs)
    torch.cuda.synchronize()
    assert torch.equal(s0, xs[6])
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, yr) <= TOL[dtype], rel_err(y, yr)
    assert rel_err(s, sr) <= TOL[dtype], rel_err(s, sr)


@skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [16, 32, 64])
@pytest.mark.parametrize("T", [77, 8192])
def test_prefill_chunk_lengths(T, L, dtype):
    """Every chunk length the benchmark sweeps, at a real size (H=64) and at T not a multiple of it."""
    from edge_rwkv.cuda_kernels.wkv_prefill import prefill_forward

    xs = make_inputs(1, T, 64, 64, dtype, device="cuda", seed=T + L)
    yr, sr = ref64(*xs)
    precision = torch.get_float32_matmul_precision()
    y, s, _ = prefill_forward(*xs, L)
    torch.cuda.synchronize()
    assert torch.get_float32_matmul_precision() == precision  # the TF32 switch is scoped
    assert rel_err(y, yr) <= TOL[dtype], rel_err(y, yr)
    assert rel_err(s, sr) <= TOL[dtype], rel_err(s, sr)


# half-precision inputs run the chunk products in TF32: with TF32 rounding emulated in the simulator,
# the gradients differ from the fp64 recurrence's by ≤ 1.3e-3 (r, k, v, a, b, S) and up to 2.2e-3 (fp16)
# / 2.9e-3 (bf16) for the decay logit w at strong decays (its gradient is a sum of cancelling terms);
# fp32 inputs keep IEEE products (~1e-5)
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-3}


@skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [16, 32, 64])
def test_backward_chunk_lengths(L, dtype):
    """Grads of r, w, k, v, a, b and the initial state vs autograd through the fp64 recurrence."""
    from edge_rwkv.cuda_kernels import WKV7Function

    xs = [x.requires_grad_(True) for x in make_inputs(2, 300, 4, 64, dtype, device="cuda", seed=L)]
    y, s = WKV7Function.apply(*xs, L)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    yr, sr = ref64(*xs)
    g2 = torch.autograd.grad((yr * gy.double()).sum() + (sr * gs.double()).sum(), xs)
    for name, p, q in zip("rwkvabS", g1, g2):
        assert p.dtype == q.dtype and torch.isfinite(p.float()).all(), name
        assert rel_err(p, q) <= GRAD_TOL[dtype], (name, rel_err(p, q))


@skip
def test_prefill_writes_every_output():
    """The output comes from fresh buffers: poison the allocator's memory first, then check no NaN."""
    from edge_rwkv.cuda_kernels import wkv7_prefill

    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    xs = make_inputs(3, 77, 12, 64, torch.float32, device="cuda", seed=9)
    y, s = wkv7_prefill(*xs)
    assert not y.isnan().any() and not s.isnan().any()


@skip
@pytest.mark.parametrize("T", [13, 64, 300])
def test_backward_vs_reference_autograd(T):
    from edge_rwkv.cuda_kernels import wkv7
    from edge_rwkv.wkv import wkv7_reference

    xs = [x.requires_grad_(True) for x in make_inputs(2, T, 4, 64, torch.float32, device="cuda", seed=T)]
    y, s = wkv7(*xs)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    yr, sr = wkv7_reference(*xs)
    g2 = torch.autograd.grad((yr * gy).sum() + (sr * gs).sum(), xs)
    for name, p, q in zip("rwkvabS", g1, g2):
        assert rel_err(p, q) <= 1e-4, (name, rel_err(p, q))


@skip
def test_backward_half_inputs():
    from edge_rwkv.cuda_kernels import wkv7

    xs = [x.requires_grad_(True) for x in make_inputs(1, 100, 4, 64, torch.bfloat16, device="cuda", seed=1)]
    y, s = wkv7(*xs)
    (y.sum() + s.sum()).backward()
    for x in xs:
        assert x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad.float()).all()


@skip
def test_decode_cuda_graph():
    from edge_rwkv.cuda_kernels import wkv7_decode

    B, H = 1, 64
    xs = make_inputs(B, 1, H, 64, torch.float16, device="cuda", seed=5)
    ins = [x.clone() for x in xs[:6]]
    state = xs[6].clone()
    out = torch.empty(B, 1, H, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compile + cache views
            wkv7_decode(*ins, state, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        wkv7_decode(*ins, state, out=out)
    eager_state = xs[6].clone()
    for step in range(3):
        new = make_inputs(B, 1, H, 64, torch.float16, device="cuda", seed=50 + step)
        for dst, src in zip(ins, new[:6]):
            dst.copy_(src)
        if step == 0:
            state.copy_(xs[6])
        g.replay()
        y_eager = wkv7_decode(*new[:6], eager_state)
        torch.cuda.synchronize()
        assert torch.equal(out, y_eager) and torch.equal(state, eager_state)
