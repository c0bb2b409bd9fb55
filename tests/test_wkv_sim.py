"""WKV-7 Numba kernels under the Numba CUDA simulator (CPU CI).

numba reads NUMBA_ENABLE_CUDASIM when it is first imported, so the checks run once in a child
process started with it set (`python tests/test_wkv_sim.py` runs them directly) and each test below
asserts one of the results it reports.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _simulator import report, simulator_results

HERE = Path(__file__).resolve().parent


def _checks():
    """Run in the simulator child. Returns {name: [ok, detail]}."""
    import torch

    sys.path.insert(0, str(HERE))
    from _wkv_inputs import make_inputs, ref64, rel_err

    from edge_rwkv.cuda_kernels import WKV7Function, wkv7, wkv7_decode, wkv7_prefill
    from edge_rwkv.cuda_kernels._runtime import simulator

    assert simulator()
    res = {}

    def record(name, err, tol):
        res[name] = [bool(err <= tol), f"rel err {err:.3g} (tol {tol:g})"]

    # decode
    for dtype, N, B, H in [(torch.float64, 8, 1, 2), (torch.float64, 4, 2, 3), (torch.float32, 8, 2, 1)]:
        xs = make_inputs(B, 1, H, N, dtype, seed=N + B)
        yr, sr = ref64(*xs)
        state = xs[6].clone()
        out = torch.full((B, 1, H, N), float("nan"), dtype=state.dtype)
        y = wkv7_decode(*xs[:6], state, out=out)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        record(f"decode_{dtype}_N{N}_B{B}_H{H}", max(rel_err(y, yr), rel_err(state, sr)), tol)

    # prefill: T in {1,5,17}, B in {1,2}, chunk lengths leaving remainders
    for T in (1, 5, 17):
        for B in (1, 2):
            for L in (4, 16):
                xs = make_inputs(B, T, 2, 8, torch.float64, seed=T * 10 + B + L)
                yr, sr = ref64(*xs)
                s0 = xs[6].clone()
                y, s = wkv7_prefill(*xs, chunk_len=L)
                ok_state = torch.equal(s0, xs[6])
                err = max(rel_err(y, yr), rel_err(s, sr)) if ok_state else float("inf")
                record(f"prefill_f64_T{T}_B{B}_L{L}", err, 1e-12)
    xs = make_inputs(2, 9, 1, 4, torch.float32, seed=3)
    yr, sr = ref64(*xs)
    y, s = wkv7_prefill(*xs, chunk_len=4)
    record("prefill_f32_N4", max(rel_err(y, yr), rel_err(s, sr)), 1e-5)

    # bf16 inputs are read as raw bits and decoded in the kernel: exact for every finite class
    from edge_rwkv.cuda_kernels.wkv_prefill import prep

    xs = make_inputs(1, 6, 1, 8, torch.bfloat16, seed=8)
    special = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.0e38, -1.5, 2.0 ** -126, 65504.0], dtype=torch.bfloat16)
    xs[3] = xs[3].clone()
    xs[3][0, 0, 0] = special
    P, _ = prep(*xs[:6], 4, torch.float32)
    got = P[0, 0, :, 4].reshape(-1, 8)[:6]
    want = xs[3][0, :, 0].float()
    res["bf16_decode"] = [bool(torch.equal(got, want)) and bool(torch.equal(got[0].signbit(), want[0].signbit())),
                          "prep's V slot == v.float() incl. ±0, subnormals, large"]
    xs = make_inputs(2, 11, 2, 8, torch.bfloat16, seed=9)
    yr, sr = ref64(*xs)
    y, s = wkv7_prefill(*xs, chunk_len=4)
    record("prefill_bf16", max(rel_err(y, yr), rel_err(s, sr)), 1e-5)
    xs = [x.requires_grad_(True) for x in make_inputs(1, 9, 2, 4, torch.bfloat16, seed=10)]
    y, s = WKV7Function.apply(*xs, 4)
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
    yr, sr = ref64(*xs)
    g2 = torch.autograd.grad((yr * gy.double()).sum() + (sr * gs.double()).sum(), xs)
    record("backward_bf16", max(rel_err(p, q) for p, q in zip(g1, g2)), 1e-3)  # both sides rounded to bf16

    # strong decays over many chunks stay finite and exact
    xs = make_inputs(1, 40, 1, 4, torch.float64, seed=5, decay_bias=12.0)
    yr, sr = ref64(*xs)
    y, s = wkv7_prefill(*xs, chunk_len=16)
    record("prefill_strong_decay", max(rel_err(y, yr), rel_err(s, sr)), 1e-12)

    # prefill == step-by-step decode
    xs = make_inputs(1, 7, 2, 8, torch.float64, seed=11)
    y, s = wkv7_prefill(*xs, chunk_len=4)
    state = xs[6].clone()
    ys = [wkv7_decode(*[x[:, t] for x in xs[:6]], state) for t in range(7)]
    record("prefill_equals_decode", max(rel_err(torch.stack(ys, 1), y), rel_err(state, s)), 1e-12)

    # chunked == step-by-step over several chunk lengths, T not a multiple of the chunk
    for T, L in ((37, 8), (37, 16), (19, 32)):
        xs = make_inputs(1, T, 2, 16, torch.float64, seed=T + L)
        yr, sr = ref64(*xs)
        y, s = wkv7_prefill(*xs, chunk_len=L)
        record(f"prefill_N16_T{T}_L{L}", max(rel_err(y, yr), rel_err(s, sr)), 1e-12)

    # the model's head size: the scan's two-column register tiles (N=64) and a 64-step chunk
    xs = make_inputs(1, 70, 1, 64, torch.float32, seed=64)
    yr, sr = ref64(*xs)
    y, s = wkv7_prefill(*xs, chunk_len=64)
    record("prefill_N64_T70_L64", max(rel_err(y, yr), rel_err(s, sr)), 1e-5)

    # the in-kernel causal inverse against a dense inverse, and its adjoint by gradcheck
    from edge_rwkv.cuda_kernels.wkv_prefill import _CausalInverse

    for L in (4, 8):
        g = torch.Generator().manual_seed(L)
        A = torch.randn(3, 2 * L, 2 * L, generator=g, dtype=torch.float64) * 0.3
        out = _CausalInverse.apply(A.clone(), L)
        eye = torch.eye(L, dtype=torch.float64)
        want = A.clone()
        want[:, :L, :L] = torch.linalg.inv(eye - torch.tril(A[:, :L, :L], -1))
        want[:, :L, L:] = torch.tril(A[:, :L, L:], -1)
        want[:, L:, :L] = torch.tril(A[:, L:, :L])
        want[:, L:, L:] = torch.tril(A[:, L:, L:])
        record(f"causal_inverse_L{L}", rel_err(out, want), 1e-13)
    A = (torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3)
    try:
        ok = torch.autograd.gradcheck(lambda x: _CausalInverse.apply(x.clone(), 4), (A.requires_grad_(True),))
        res["causal_inverse_gradcheck"] = [bool(ok), "gradcheck"]
    except Exception as exc:  # noqa: BLE001
        res["causal_inverse_gradcheck"] = [False, repr(exc)[:400]]

    # backward vs autograd through the float64 reference (grads of r, w, k, v, a, b and the initial state)
    for T, L in ((5, 4), (17, 4), (37, 16), (19, 8)):
        xs = [x.requires_grad_(True) for x in make_inputs(2, T, 2, 4, torch.float64, seed=T)]
        y, s = WKV7Function.apply(*xs, L)
        gy, gs = torch.randn_like(y), torch.randn_like(s)
        g1 = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), xs)
        yr, sr = ref64(*xs)
        g2 = torch.autograd.grad((yr * gy).sum() + (sr * gs).sum(), xs)
        record(f"backward_T{T}_L{L}", max(rel_err(p, q) for p, q in zip(g1, g2)), 1e-12)

    # a forward under inference mode first (as serving does) must not poison later training passes
    xs = make_inputs(1, 3, 1, 4, torch.float64, seed=6)
    with torch.inference_mode():
        wkv7_prefill(*xs, chunk_len=2)
    xs = [x.requires_grad_(True) for x in xs]
    try:
        y, s = WKV7Function.apply(*xs, 2)
        (y.sum() + s.sum()).backward()
        res["inference_then_backward"] = [all(x.grad is not None for x in xs), "grads after an inference-mode forward"]
    except Exception as exc:  # noqa: BLE001
        res["inference_then_backward"] = [False, repr(exc)[:400]]

    # float64 gradcheck of the autograd Function on a tiny shape
    xs = [x.requires_grad_(True) for x in make_inputs(1, 3, 1, 4, torch.float64, seed=2)]
    try:
        ok = torch.autograd.gradcheck(lambda *t: WKV7Function.apply(*t, 2), xs, fast_mode=True)
        res["gradcheck_f64"] = [bool(ok), "gradcheck fast_mode"]
    except Exception as exc:  # noqa: BLE001
        res["gradcheck_f64"] = [False, repr(exc)[:400]]

    # a chunk length the kernels cannot hold is refused with a clear error before any launch
    try:
        wkv7_prefill(*make_inputs(1, 3, 1, 4, torch.float64, seed=1), chunk_len=128)
        res["chunk_len_refused"] = [False, "no error"]
    except ValueError as exc:
        res["chunk_len_refused"] = ["chunk length 128" in str(exc), str(exc)[:200]]

    # the public op takes the kernel path on simulator tensors
    xs = make_inputs(1, 6, 1, 4, torch.float64, seed=4)
    yr, sr = ref64(*xs)
    y, s = wkv7(*xs)
    record("wkv7_public", max(rel_err(y, yr), rel_err(s, sr)), 1e-12)
    return res


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(__file__)


NAMES = (
    ["decode_torch.float64_N8_B1_H2", "decode_torch.float64_N4_B2_H3", "decode_torch.float32_N8_B2_H1"]
    + [f"prefill_f64_T{T}_B{B}_L{L}" for T in (1, 5, 17) for B in (1, 2) for L in (4, 16)]
    + ["prefill_f32_N4", "bf16_decode", "prefill_bf16", "backward_bf16", "prefill_strong_decay",
       "prefill_equals_decode"]
    + [f"prefill_N16_T{T}_L{L}" for T, L in ((37, 8), (37, 16), (19, 32))] + ["prefill_N64_T70_L64"]
    + ["causal_inverse_L4", "causal_inverse_L8", "causal_inverse_gradcheck"]
    + [f"backward_T{T}_L{L}" for T, L in ((5, 4), (17, 4), (37, 16), (19, 8))]
    + ["inference_then_backward", "gradcheck_f64", "chunk_len_refused", "wkv7_public"]
)


@pytest.mark.parametrize("name", NAMES)
def test_sim(sim_results, name):
    ok, detail = sim_results[name]
    assert ok, f"{name}: {detail}"


if __name__ == "__main__":
    report(_checks())
