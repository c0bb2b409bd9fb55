"""Calibration methods: plain stored format, and activation-aware methods beat RTN on outliers."""

import pytest
import torch

from edge_rwkv.errors import CheckpointError
from edge_rwkv.quant.calibrate import awq, gptq, output_mse, quantize_weight
from edge_rwkv.quant.formats import QuantizedWeight, int4_spec, int8_spec
from edge_rwkv.quant.linear import DenseLinear, QuantLinear, dense_or_quant_linear


def _problem(seed=0, out=96, k=256, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.05
    x = torch.randn(n, k, generator=g)
    hot = torch.randperm(k, generator=g)[:6]
    x[:, hot] *= 25.0  # outlier activation channels, as in real LLM activations
    x = x @ (torch.eye(k) + 0.05 * torch.randn(k, k, generator=g))  # correlated channels
    return w, x


@pytest.mark.parametrize("spec", [int4_spec(128), int4_spec(32), int8_spec()], ids=["int4g128", "int4g32", "int8"])
def test_gptq_and_awq_beat_rtn(spec):
    w, x = _problem()
    xc, xt = x[:384], x[384:]  # calibrate on one part, measure on held-out rows
    rtn = quantize_weight(w, spec, "rtn")
    g = gptq(w, xc, spec)
    a = awq(w, xc, spec)
    e_rtn, e_g, e_a = output_mse(w, rtn, xt), output_mse(w, g, xt), output_mse(w, a, xt)
    assert e_g < 0.8 * e_rtn, (e_g, e_rtn)
    assert e_a < e_rtn, (e_a, e_rtn)
    # stored formats stay plain (AWQ adds only the optional fp16 input_scale)
    for qw in (rtn, g, a):
        qw.validate()
        assert qw.qweight.dtype == (torch.int8 if spec.format == "int8" else torch.uint8)
    assert not g.spec.input_scale and g.input_scale is None
    if a.spec.input_scale:
        assert a.input_scale.dtype == torch.float16 and a.input_scale.shape == (w.shape[1],)


def test_awq_clip_search_and_round_trip_through_linear():
    w, x = _problem(seed=1)
    a = awq(w, x, int4_spec(64), clip=True)
    assert output_mse(w, a, x) < output_mse(w, quantize_weight(w, int4_spec(64)), x)
    name = "blocks.2.att.value.weight"
    lin = dense_or_quant_linear(a.stored_tensors(name), name, a.metadata())
    assert isinstance(lin, QuantLinear) and lin.path == "cpu-dequantize"
    y = lin(x[:5].half())
    assert y.dtype == torch.float16
    ref = x[:5] @ a.dequantize().t()
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert lin.nbytes == a.nbytes


def test_linear_modules_cpu():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    dense = dense_or_quant_linear({"head.weight": w.half()}, "head.weight", None)
    assert isinstance(dense, DenseLinear) and dense.nbytes == 64 * 128 * 2
    x = torch.randn(2, 3, 128)
    assert dense(x).shape == (2, 3, 64)
    for spec in (int8_spec(), int4_spec(128)):
        qw = quantize_weight(w, spec)
        lin = dense_or_quant_linear(qw.stored_tensors("head.weight"), "head.weight", spec, shape=(64, 128))
        y = lin(x.bfloat16())
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 64)
        # the module sees bf16 x: the reference starts from the same rounded input
        ref = x.bfloat16().float() @ qw.dequantize().t()
        torch.testing.assert_close(y.float(), ref.bfloat16().float(), rtol=2e-2, atol=5e-2)
        lin.cache_dequantized = True
        torch.testing.assert_close(lin(x), x @ qw.dequantize().t())
        assert isinstance(lin.quantized_weight(), QuantizedWeight)
    with pytest.raises(CheckpointError):
        dense_or_quant_linear({}, "head.weight", int8_spec())


def test_methods_need_activations():
    with pytest.raises(CheckpointError, match="needs calibration"):
        quantize_weight(torch.randn(4, 128), int4_spec(), "gptq")
    with pytest.raises(CheckpointError, match="unknown calibration"):
        quantize_weight(torch.randn(4, 128), int4_spec(), "smooth", torch.randn(3, 128))
