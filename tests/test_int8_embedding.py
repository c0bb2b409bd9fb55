"""The int8 embedding table (quant.formats.Int8Rows, the int8-rows format): per-row rounding bound, indexing, and a model built with it.

On CUDA, a model loaded from an artifact with an int8 embedding keeps its ln0-folded table as Int8Rows
(quant/load.keeps_int8_embedding); here, on the CPU, the same table is built through build_model(int8_embedding=True).
"""
from __future__ import annotations

import pytest
import torch

from edge_rwkv.checkpoint import derive_config
from edge_rwkv.model import RWKV7, build_model
from edge_rwkv.quant.formats import Int8Rows, dequantize_int8_rows_ref, quantize_int8_rows_ref, quantize_rows
from edge_rwkv.state import State
from edge_rwkv.synthetic import random_checkpoint

VOCAB = 1000


def test_round_trip_error_within_half_a_step():
    t = torch.randn(300, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 50, 300)[:, None]
    rows = Int8Rows.quantize(t, torch.float32)
    got = rows[torch.arange(300)]
    absmax = t.abs().amax(1, keepdim=True)
    err = (got - t).abs()
    # round to nearest: half a step (absmax / 127 / 2), plus fp32 rounding of the scale and the product
    assert (err <= absmax / 254 * (1 + 1e-5) + 1e-7).all(), float((err / absmax).max())
    assert rows.q.abs().max() == 127 and rows.q.dtype == torch.int8
    assert (rows.q.abs().amax(1) == 127).all()  # each row's absmax element maps to ±127


def test_torch_rows_equal_the_reference():
    t = torch.randn(50, 40, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 2, 50)[:, None]
    t[7] = 0
    q, s = quantize_rows(t)
    q_ref, s_ref = quantize_int8_rows_ref(t.numpy())
    assert torch.equal(q, torch.from_numpy(q_ref)) and torch.equal(s, torch.from_numpy(s_ref))
    rows = Int8Rows(q, s, torch.float32)
    assert torch.equal(rows[torch.arange(50)], torch.from_numpy(dequantize_int8_rows_ref(q_ref, s_ref)))


def test_zero_row_and_shapes():
    t = torch.randn(10, 16)
    t[3] = 0
    rows = Int8Rows.quantize(t, torch.float16)
    assert rows.shape == (10, 16) and rows.device == t.device and rows.dtype == torch.float16
    assert torch.equal(rows[torch.tensor([3])], torch.zeros(1, 16, dtype=torch.float16))
    assert rows.nbytes == 10 * 16 + 10 * 4 and rows.row_bytes == 16 + 4
    idx2 = torch.tensor([[1, 2, 3], [9, 0, 3]])
    out2 = rows[idx2]
    assert out2.shape == (2, 3, 16) and out2.dtype == torch.float16
    out1 = rows[idx2[:, 0]]
    assert out1.shape == (2, 16)
    torch.testing.assert_close(out2[:, 0], out1, rtol=0, atol=0)
    q, s = quantize_rows(t)
    torch.testing.assert_close(out2, (q[idx2].float() * s[idx2]).half(), rtol=0, atol=0)


def test_bad_tables_rejected():
    q, s = quantize_rows(torch.randn(4, 8))
    with pytest.raises(ValueError, match="int8"):
        Int8Rows(q.float(), s, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        Int8Rows(q, s.view(-1), torch.float32)
    with pytest.raises(ValueError, match="scale"):
        Int8Rows(q, s.half(), torch.float32)


@pytest.fixture(scope="module", params=[(2, 64, 32), (3, 160, 32)], ids=lambda s: f"L{s[0]}-C{s[1]}")
def nets(request):
    n_layer, n_embd, head_size = request.param
    sd = random_checkpoint(n_layer, n_embd, head_size, vocab_size=VOCAB, seed=n_layer + n_embd)
    cfg = derive_config(sd)
    return cfg, build_model(cfg, sd, torch.float32, "cpu"), build_model(cfg, sd, torch.float32, "cpu", int8_embedding=True)


def _run(cfg, net, tokens):
    st = State.zeros(cfg.n_layer, tokens.shape[0], cfg.n_embd, cfg.n_head, cfg.head_size, "cpu")
    return net.forward(tokens, st)[0]


def test_model_with_int8_embedding_is_the_dense_model_on_the_rounded_table(nets):
    cfg, dense, q = nets
    assert isinstance(q.emb, Int8Rows) and isinstance(dense.emb, torch.Tensor)
    assert q.device == dense.device
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    rounded = q.emb[torch.arange(VOCAB)]  # the int8 table, dequantized: a dense table
    on_rounded = RWKV7(cfg, rounded, dense.layers, dense.ln_out, dense.head, dense.dtype, dense.wkv)
    assert torch.equal(_run(cfg, q, tokens), _run(cfg, on_rounded, tokens))


def test_model_with_int8_embedding_close_to_dense(nets):
    cfg, dense, q = nets
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    a, b = _run(cfg, dense, tokens), _run(cfg, q, tokens)
    # per element |err| ≤ absmax/254, so a row's relative error is ≤ sqrt(C)·absmax / (254·‖row‖); the
    # random network is near-linear at this size, so the logits move by about as much (3× allowed)
    table = dense.emb
    eps = float((table.shape[1] ** 0.5 * table.abs().amax(1) / (254 * table.norm(dim=1))).max())
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel <= 3 * eps, f"logits rel err {rel:.3g}, input bound {eps:.3g}"
    assert float((a.argmax(-1) == b.argmax(-1)).double().mean()) >= 0.9


def test_keeps_int8_embedding_only_on_cuda_for_int8_tables():
    from edge_rwkv.quant.load import keeps_int8_embedding

    int8 = {"emb.weight": {"format": "int8", "bits": 8, "group": None, "version": 1, "shape": [4, 4]}}
    assert keeps_int8_embedding(int8, torch.device("cuda"))
    assert not keeps_int8_embedding(int8, torch.device("cpu"))
    assert not keeps_int8_embedding({}, torch.device("cuda"))
    assert not keeps_int8_embedding({"head.weight": int8["emb.weight"]}, torch.device("cuda"))


def test_bench_counts_int8_table(nets):
    from edge_rwkv.bench.memory import embedding_row_bytes, object_bytes, weight_bytes_per_step, weights_resident_bytes

    cfg, dense, q = nets
    C = cfg.n_embd
    assert object_bytes(q.emb, set()) == q.emb.nbytes == VOCAB * C + VOCAB * 4
    assert embedding_row_bytes(q.emb) == C + 4 and embedding_row_bytes(dense.emb) == 4 * C
    assert weight_bytes_per_step(dense) - weight_bytes_per_step(q) == 4 * C - (C + 4)
    assert weights_resident_bytes(dense) - weights_resident_bytes(q) == 4 * VOCAB * C - (VOCAB * C + 4 * VOCAB)


def test_quantize_device_argument_and_cpu_load_keeps_dense_table(tmp_path):
    """quantize_checkpoint(device=...) stores the same tensors (on the CPU); a CPU load of an artifact with
    an int8 embedding keeps today's dense fp32 table."""
    import edge_rwkv
    from edge_rwkv.artifact import write_artifact
    from edge_rwkv.checkpoint import load_checkpoint
    from edge_rwkv.quant.policy import QuantPolicy
    from edge_rwkv.quant.transform import quantize_checkpoint

    src = tmp_path / "m.pth"
    torch.save(random_checkpoint(1, 64, 32, vocab_size=VOCAB, seed=5), src)
    policy = QuantPolicy(bits=4, group=32, quantize_head=True, quantize_embedding=True)
    ckpt = load_checkpoint(src)
    t0, m0 = quantize_checkpoint(ckpt, policy)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        t1, m1 = quantize_checkpoint(ckpt, policy, device=dev)
        assert m1 == m0 and set(t1) == set(t0)
        assert all(t1[k].device.type == "cpu" and torch.equal(t1[k], t0[k]) for k in t0), dev
    assert m0["quant"]["tensors"]["emb.weight"]["format"] == "int8"
    write_artifact(tmp_path / "q.safetensors", t0, m0)
    m = edge_rwkv.load(tmp_path / "q.safetensors", device="cpu")
    assert isinstance(m.net.emb, torch.Tensor) and m.net.emb.dtype == torch.float32
