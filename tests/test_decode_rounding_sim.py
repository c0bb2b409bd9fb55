"""norm_mix and time_mix_wkv rounding their outputs to int8 for the GEMVs that read them
(cuda_kernels/decode_step.py → cuda_kernels/gemv_a8.py's layouts), under the Numba CUDA simulator:
the rounded values, scales and zero sums equal gemv_a8's own rounding (quantize_x_reference) of the
same outputs, in both the int4 pairs order and the natural order, and the outputs themselves are
unchanged by rounding them.

numba reads NUMBA_ENABLE_CUDASIM at its first import, so the checks run in a child process started
with it set (`python tests/test_decode_rounding_sim.py` runs them directly).
"""
from __future__ import annotations

import pytest
from _simulator import report, simulator_results

pytest.importorskip("numba")


def _natural(xq, rows: int, K: int, pairs: bool):
    """xq as written by the kernels, back in natural column order."""
    import torch

    q = xq.view(rows, K // 8, 8)
    if not pairs:
        return q.reshape(rows, K)
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # column k8 sits at (k8 & 1) * 4 + (k8 >> 1)
    return q[:, :, order].reshape(rows, K)


def _checks() -> dict:
    import torch

    from edge_rwkv.cuda_kernels import decode_step
    from edge_rwkv.cuda_kernels._runtime import simulator
    from edge_rwkv.cuda_kernels.gemv_a8 import RoundedX, quantize_x_reference

    assert simulator()
    res = {}
    g = torch.Generator().manual_seed(0)

    def same(name, rx, values, plain, out):
        q, s, z = quantize_x_reference(values, rx.pairs)
        rows, K = values.shape
        got_q = _natural(rx.xq, rows, K, rx.pairs)
        ok_q = torch.equal(got_q, q)
        ok_s = torch.allclose(rx.xs.view(rows, -1), s.float(), rtol=1e-6, atol=0)
        ok_z = torch.equal(rx.xz.view(rows, -1), z.view(rows, -1))
        ok_out = torch.equal(out, plain)
        res[name] = [ok_q and ok_s and ok_z and ok_out,
                     f"levels {ok_q}, scales {ok_s}, zero sums {ok_z}, outputs unchanged {ok_out}"]

    # norm_mix: B=2 rows of C=96 (three rounding blocks), six mixes, the first three rounded
    B, C, M = 2, 96, 6
    x = torch.randn(B, C, generator=g)
    dx = torch.randn(B, C, generator=g)
    lnw, lnb = torch.randn(C, generator=g), torch.randn(C, generator=g)
    prev0 = torch.randn(B, C, generator=g)
    mix = torch.rand(M, C, generator=g)
    live = torch.ones(B, dtype=torch.int32)
    for pairs in (True, False):
        outs = []
        for rounded in (None, RoundedX.empty(3 * B, C, pairs, "cpu")):
            out, prev, xout = torch.zeros(M, B, C), prev0.clone(), torch.zeros(B, C)
            decode_step.norm_mix(x, xout, dx, lnw, lnb, prev, live, mix, out, add=True, rounded=rounded,
                                 rounded_mixes=3)
            outs.append(out)
        same(f"norm_mix_pairs_{pairs}", rounded, outs[1][:3].reshape(3 * B, C), outs[0], outs[1])

    # time_mix_wkv: B=2, H=2 heads of N=32 (one rounding block a head)
    B, H, N = 2, 2, 32
    C = H * N
    vec = lambda: torch.randn(B, C, generator=g)  # noqa: E731
    par = lambda: torch.randn(C, generator=g) * 0.5  # noqa: E731
    r, k, v, gate = vec(), vec(), vec(), vec()
    lora = torch.randn(3, B, C, generator=g) * 0.5
    w0, a0, v0, k_k, k_a, lnw, lnb = (par() for _ in range(7))
    r_k = torch.randn(H, N, generator=g) * 0.5
    state0 = torch.randn(B, H, N, N, generator=g) * 0.3
    for pairs in (True, False):
        outs = []
        for rounded in (None, RoundedX.empty(B, C, pairs, "cpu")):
            out, state, v_first = torch.zeros(B, C), state0.clone(), torch.randn(B, C, generator=torch.Generator().manual_seed(1))
            decode_step.time_mix_wkv(r, k, v, lora, gate, w0, a0, v0, k_k, k_a, r_k, lnw, lnb, False, v_first,
                                     state, live, out, rounded=rounded)
            outs.append(out)
        same(f"time_mix_pairs_{pairs}", rounded, outs[1], outs[0], outs[1])

    # shapes the rounding cannot take are refused, not computed wrong
    try:
        decode_step.norm_mix(x[:, :40].contiguous(), torch.zeros(2, 40), dx[:, :40].contiguous(), lnw[:40], lnb[:40],
                             prev0[:, :40].clone(), live, mix[:, :40].contiguous(), torch.zeros(M, 2, 40), add=True,
                             rounded=RoundedX.empty(6, 64, True, "cpu"), rounded_mixes=3)
        res["mismatched_buffers_refused"] = [False, "no error"]
    except ValueError as e:
        res["mismatched_buffers_refused"] = ["rounded x buffers" in str(e), str(e)]
    return res


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(__file__)


NAMES = ["norm_mix_pairs_True", "norm_mix_pairs_False", "time_mix_pairs_True", "time_mix_pairs_False",
         "mismatched_buffers_refused"]


@pytest.mark.parametrize("name", NAMES)
def test_decode_rounding_sim(sim_results, name):
    ok, detail = sim_results[name]
    assert ok, f"{name}: {detail}"


if __name__ == "__main__":
    report(_checks())
