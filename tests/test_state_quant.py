"""int8 WKV-state storage: round-trip error bound, file checks, and the perplexity effect on a random model."""
import math

import pytest
import torch

from edge_rwkv.errors import StateError
from edge_rwkv.state import State
from edge_rwkv.state_quant import (QuantizedState, dequantize_state, from_bytes, load_quantized,
                                   perplexity_with_roundtrip, quantize_state, save_quantized, to_bytes)


def random_state(L=2, B=2, H=2, N=64, seed=0, fp="fp-abc"):
    g = torch.Generator().manual_seed(seed)
    C = H * N
    wkv = torch.randn(L, B, H, N, N, generator=g) * torch.logspace(-3, 2, N)[:, None]  # rows of very different size
    wkv[0, 0, 0, 3] = 0.0  # an all-zero row
    return State(torch.randn(L, B, C, generator=g), wkv, torch.randn(L, B, C, generator=g), fp, tokens=123)


@pytest.mark.parametrize("gran", ["head_row", "row"])
def test_roundtrip_within_bound(gran):
    st = random_state()
    q = quantize_state(st, gran)
    assert q.wkv_q.dtype == torch.int8 and q.wkv_scale.dtype == torch.float16
    assert q.wkv_scale.shape == ((2, 2, 2, 64) if gran == "head_row" else (2, 2, 64))
    assert int(q.wkv_q.min()) >= -127
    back = dequantize_state(q)
    err = (back.wkv - st.wkv).abs()
    assert bool((err <= q.error_bound() * (1 + 1e-6)).all())
    assert torch.equal(back.att_x, st.att_x) and torch.equal(back.ffn_x, st.ffn_x)
    assert back.fingerprint == st.fingerprint and back.tokens == 123
    if gran == "head_row":  # relative error per row ≤ 1/254 of the row's absmax (+ fp16 scale rounding)
        amax = st.wkv.abs().amax(-1, keepdim=True)
        assert bool((err <= amax / 254 * 1.002 + 2.0**-15).all())
    assert q.nbytes < st.nbytes / 3.5


def test_refuses_non_finite():
    st = random_state()
    st.wkv[1, 1, 1, 1, 1] = float("nan")
    with pytest.raises(StateError):
        quantize_state(st)


def test_file_roundtrip_and_fingerprint(tmp_path):
    st = random_state()
    path = tmp_path / "s.qstate"
    size = save_quantized(st, path)
    assert path.stat().st_size == size < st.nbytes / 3
    back = load_quantized(path, expect_fingerprint="fp-abc")
    assert torch.equal(back.wkv, dequantize_state(quantize_state(st)).wkv)
    q = load_quantized(path, dequantize=False)
    assert isinstance(q, QuantizedState) and q.granularity == "head_row"
    with pytest.raises(StateError, match="another model"):
        load_quantized(path, expect_fingerprint="other")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


def test_corrupt_files_rejected(tmp_path):
    data = to_bytes(quantize_state(random_state()))
    flipped = bytearray(data)
    flipped[-100] ^= 0x01  # a bit in the tensor data
    with pytest.raises(StateError, match="checksum"):
        from_bytes(bytes(flipped))
    for bad in (data[:5], data[:len(data) // 2], b"\x00" * 64, b"{}" + data):
        with pytest.raises(StateError):
            from_bytes(bad)
    # a plain fp32 state file is not an int8 state file
    with pytest.raises(StateError):
        from_bytes(random_state().to_bytes())
    p = tmp_path / "missing.qstate"
    with pytest.raises(StateError):
        load_quantized(p)


def test_perplexity_change_small_on_random_model():
    import edge_rwkv
    from edge_rwkv.model import build_model
    from edge_rwkv.checkpoint import derive_config
    from edge_rwkv.synthetic import random_checkpoint

    sd = random_checkpoint(2, 128, 64, vocab_size=65536, seed=3)
    cfg = derive_config(sd)
    net = build_model(cfg, sd, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 65536, (257,), generator=g).tolist()
    base = perplexity_with_roundtrip(net, tokens, every=16, quantize=False)
    q = perplexity_with_roundtrip(net, tokens, every=16, quantize=True)
    assert base["n"] == q["n"] == 256
    assert math.isfinite(q["ppl"])
    assert abs(q["nll"] - base["nll"]) < 0.01  # nats per token
    assert float((q["logprobs"] - base["logprobs"]).abs().max()) < 0.1
