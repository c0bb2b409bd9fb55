"""The fused decode step (edge_rwkv.runtime.fused + cuda_kernels/decode_step.py) under the Numba CUDA
simulator: same logits and state as the model's own forward, idle rows untouched, quantized linears.

numba reads NUMBA_ENABLE_CUDASIM at its first import, so the checks run in a child process started
with it set (`python tests/test_fused_decode_sim.py` runs them directly).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from _simulator import report, simulator_results

def _checks() -> dict:
    import torch

    from edge_rwkv.checkpoint import derive_config
    from edge_rwkv.cuda_kernels._runtime import simulator
    from edge_rwkv.runtime.fused import FusedStep, fused_step_supported, pack_layers
    from edge_rwkv.model import build_model
    from edge_rwkv.state import State
    from edge_rwkv.synthetic import random_checkpoint

    assert simulator()
    res = {}

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    def random_state(cfg, B, g):
        st = State.zeros(cfg.n_layer, B, cfg.n_embd, cfg.n_head, cfg.head_size, "cpu")
        st.att_x.copy_(torch.randn(st.att_x.shape, generator=g))
        st.ffn_x.copy_(torch.randn(st.ffn_x.shape, generator=g))
        st.wkv.copy_(torch.randn(st.wkv.shape, generator=g) * 0.3)
        return st

    def compare(name, net, ref_net, cfg, B, steps, tol):
        g = torch.Generator().manual_seed(len(name))
        st = random_state(cfg, B, g)
        st_ref = st.clone()
        step = FusedStep(net, B, pack_layers(net))
        live = torch.ones(B, dtype=torch.int32)
        worst = 0.0
        for _ in range(steps):
            tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
            lr, st_ref = ref_net.forward(tok, st_ref, all_logits=False)
            lf = step(tok, st, live)
            worst = max(worst, rel(lf, lr), rel(st.wkv, st_ref.wkv), rel(st.att_x, st_ref.att_x),
                        rel(st.ffn_x, st_ref.ffn_x))
        res[name] = [worst <= tol, f"max rel err {worst:.3g} over {steps} steps (tol {tol:g})"]
        return step

    sd = random_checkpoint(2, 32, 8, 300, seed=1)
    cfg = derive_config(sd)
    for dt in (torch.float32, torch.float64):
        net = build_model(cfg, sd, dt, "cpu")
        assert fused_step_supported(net) is None
        compare(f"fused_{str(dt)[6:]}_B2", net, build_model(cfg, sd, dt, "cpu"), cfg, 2, 2, 2e-6)

    # time_mix_wkv with fewer threads than columns a state row (each thread then owns several)
    from edge_rwkv.cuda_kernels import decode_step

    saved, decode_step.THREADS_PER_ROW = decode_step.THREADS_PER_ROW, 2
    try:
        compare("fused_float32_B2_tpr2", build_model(cfg, sd, torch.float32, "cpu"),
                build_model(cfg, sd, torch.float32, "cpu"), cfg, 2, 2, 2e-6)
    finally:
        decode_step.THREADS_PER_ROW = saved

    # fp16: the segmented GEMV (B ≤ 4: one launch for r, k, v and the LoRA-downs, one for the
    # LoRA-ups, one per remaining matrix) and cuBLAS over the same packed buffers (B > 4)
    sd16 = random_checkpoint(2, 32, 8, 64, seed=3)
    cfg16 = derive_config(sd16)
    for B, seg in ((1, True), (5, False)):
        step = compare(f"fused_float16_B{B}", build_model(cfg16, sd16, torch.float16, "cpu"),
                       build_model(cfg16, sd16, torch.float16, "cpu"), cfg16, B, 1, 3e-3)
        if (step.tables is not None) != seg:
            res[f"fused_float16_B{B}"] = [False, f"segmented GEMV used: {step.tables is not None}, expected {seg}"]

    # the embedding as Int8Rows (what a CUDA load of an artifact with an int8 embedding keeps)
    net = build_model(cfg, sd, torch.float32, "cpu", int8_embedding=True)
    assert fused_step_supported(net) is None
    compare("fused_int8_embedding_B2", net, build_model(cfg, sd, torch.float32, "cpu", int8_embedding=True), cfg, 2, 2, 2e-6)

    # packing rebinds the layers' tensors to stacked views: the model's own forward is unchanged
    net, ref = build_model(cfg, sd, torch.float32, "cpu"), build_model(cfg, sd, torch.float32, "cpu")
    FusedStep(net, 1, pack_layers(net))
    tok = torch.tensor([[5, 6, 7]])
    st = State.zeros(cfg.n_layer, 1, cfg.n_embd, cfg.n_head, cfg.head_size, "cpu")
    a, _ = net.forward(tok, st)
    b, _ = ref.forward(tok, st)
    res["packed_forward_unchanged"] = [bool(torch.equal(a, b)), "forward after packing == fresh model"]

    # idle rows (live = 0) keep their state exactly; live rows match running alone
    net = build_model(cfg, sd, torch.float32, "cpu")
    g = torch.Generator().manual_seed(9)
    st = random_state(cfg, 3, g)
    before = st.clone()
    live = torch.tensor([1, 0, 1], dtype=torch.int32)
    tok = torch.tensor([[11], [12], [13]])
    logits = FusedStep(net, 3, pack_layers(net))(tok, st, live)
    idle_same = all(torch.equal(getattr(st, k)[:, 1], getattr(before, k)[:, 1]) for k in ("att_x", "wkv", "ffn_x"))
    alone = before.select(2)
    la, sa = build_model(cfg, sd, torch.float32, "cpu").forward(tok[2:], alone, all_logits=False)
    err = max(rel(logits[2:], la), rel(st.wkv[:, 2:], sa.wkv))
    res["idle_rows_untouched"] = [idle_same and err < 2e-6, f"idle row equal: {idle_same}; live row rel err {err:.3g}"]

    # quantized linears (int8 / int4 behind QuantLinear) go through the same step
    from edge_rwkv.api import load
    from edge_rwkv.artifact import write_artifact
    from edge_rwkv.checkpoint import load_checkpoint
    from edge_rwkv.quant.policy import QuantPolicy
    from edge_rwkv.quant.transform import quantize_checkpoint
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "m.pth"
        torch.save(random_checkpoint(2, 32, 8, 300, seed=2), src)
        tensors, meta = quantize_checkpoint(load_checkpoint(src), QuantPolicy(bits=4, group=32, method="rtn"))
        write_artifact(Path(d) / "q.safetensors", tensors, meta)
        m = load(Path(d) / "q.safetensors")
        m2 = load(Path(d) / "q.safetensors")
        compare("fused_int4_B2", m.net, m2.net, m.net.cfg, 2, 2, 2e-6)
    return res


@pytest.fixture(scope="module")
def sim_results():
    return simulator_results(__file__)


NAMES = ["fused_float32_B2", "fused_float64_B2", "fused_float32_B2_tpr2", "fused_float16_B1", "fused_float16_B5", "fused_int8_embedding_B2", "packed_forward_unchanged",
         "idle_rows_untouched", "fused_int4_B2"]


@pytest.mark.parametrize("name", NAMES)
def test_fused_decode_sim(sim_results, name):
    ok, detail = sim_results[name]
    assert ok, f"{name}: {detail}"


if __name__ == "__main__":
    report(_checks())
