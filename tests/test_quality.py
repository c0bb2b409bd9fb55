"""Quality metrics: a model compared with itself is perfect; quantization moves the metrics the right way."""
import pytest
import torch

import edge_rwkv
from edge_rwkv.artifact import write_artifact
from edge_rwkv.checkpoint import load_checkpoint
from edge_rwkv.quality import compare
from edge_rwkv.quant.policy import QuantPolicy
from edge_rwkv.quant.transform import quantize_checkpoint
from edge_rwkv.synthetic import random_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("q") / "m.pth"
    torch.save(random_checkpoint(2, 128, 32, 65536, seed=7), p)
    return p


def test_self_comparison_is_exact(model_path):
    m = edge_rwkv.load(model_path)
    tokens = list(range(1000, 1000 + 90))
    r = compare(m, m, tokens, ctx=40)
    assert r["tokens"] == 80
    assert r["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9)
    assert r["top1_agreement_pct"] == 100.0
    assert abs(r["mean_kl"]) < 1e-9


def test_int8_closer_than_int4(model_path, tmp_path):
    ckpt = load_checkpoint(model_path)
    ref = edge_rwkv.load(model_path)
    tokens = [int(t) for t in torch.randint(0, 65536, (130,), generator=torch.Generator().manual_seed(0))]
    kls = {}
    for bits in (8, 4):
        tensors, meta = quantize_checkpoint(ckpt, QuantPolicy(bits=bits))
        path = tmp_path / f"q{bits}.safetensors"
        write_artifact(path, tensors, meta)
        kls[bits] = compare(ref, edge_rwkv.load(path), tokens, ctx=64)["mean_kl"]
    assert 0 < kls[8] < kls[4]


def test_too_little_text_is_an_error(model_path):
    m = edge_rwkv.load(model_path)
    with pytest.raises(ValueError, match="more than"):
        compare(m, m, [1, 2, 3], ctx=8)
