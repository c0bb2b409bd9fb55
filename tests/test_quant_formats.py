"""int8 / int4 formats: reference round trip, packing, torch == reference, ONNX DQ, validation."""

import numpy as np
import pytest
import torch

from edge_rwkv.errors import CheckpointError
from edge_rwkv.quant import formats as F
from edge_rwkv.quant.policy import QuantPolicy


def _mats(rng):
    w = rng.standard_normal((48, 256)).astype(np.float32)
    heavy = w.copy()
    heavy[:, 5] *= 60.0  # an outlier column
    heavy[3, :] = 0.0  # a zero row
    heavy[4, :] *= 1e-7  # a row below the scale floor
    heavy[7, 9] = -1e4
    return {"random": w, "outliers": heavy}


@pytest.mark.parametrize("case", ["random", "outliers"])
def test_int8_reference_round_trip_within_limit(case):
    w = _mats(np.random.default_rng(1))[case]
    q, s = F.quantize_int8_ref(w)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (48,)
    assert q.min() >= -127
    err = np.abs(F.dequantize_int8_ref(q, s) - w)
    assert (err <= F.error_limit(s, F.int8_spec(), w.shape)).all()


@pytest.mark.parametrize("case", ["random", "outliers"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_reference_round_trip_within_limit(case, group):
    w = _mats(np.random.default_rng(2))[case]
    p, s = F.quantize_int4_ref(w, group)
    assert p.dtype == np.uint8 and p.shape == (48, 128) and s.shape == (48, 256 // group)
    err = np.abs(F.dequantize_int4_ref(p, s, group) - w)
    assert (err <= F.error_limit(s, F.int4_spec(group), w.shape)).all()
    # relative error of an int4 absmax quantizer on Gaussian data: well under 15 %
    if case == "random":
        assert np.linalg.norm(err) / np.linalg.norm(w) < 0.15


def test_int4_packing_hand_worked_example():
    q = np.array([[1, -1, 7, -8, 0, 3, -2, 5]], dtype=np.int8)
    # pairs (even k low nibble, odd k high nibble): (1,-1)->0xF1, (7,-8)->0x87, (0,3)->0x30, (-2,5)->0x5E
    p = F.pack_int4_ref(q)
    assert p.tolist() == [[0xF1, 0x87, 0x30, 0x5E]]
    assert F.unpack_int4_ref(p).tolist() == q.tolist()
    assert F.pack_int4_torch(torch.from_numpy(q)).tolist() == p.tolist()
    assert F.unpack_int4_torch(torch.from_numpy(p)).tolist() == q.tolist()
    # a hand-worked quantization: group of 32, absmax 7 -> scale 1
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, :8] = [1.2, -0.6, 7.0, -6.6, 0.4, 2.5, -2.5, 4.5]  # ties round to even: 2.5->2, -2.5->-2, 4.5->4
    p, s = F.quantize_int4_ref(w, 32)
    assert s.tolist() == [[1.0]]
    assert p[0, :4].tolist() == [0xF1, 0x97, 0x20, 0x4E]


def test_int8_hand_worked_example():
    w = np.array([[127.0, -63.5, 0.4, -0.5]], dtype=np.float32)
    q, s = F.quantize_int8_ref(w)
    assert s.tolist() == [1.0] and q.tolist() == [[127, -64, 0, 0]]


@pytest.mark.parametrize("group", [32, 128])
def test_torch_equals_reference(group):
    rng = np.random.default_rng(3)
    for w in _mats(rng).values():
        q, s = F.quantize_int8_ref(w)
        qt, st = F.quantize_int8_torch(torch.from_numpy(w))
        assert np.array_equal(qt.numpy(), q) and np.array_equal(st.numpy(), s)
        assert np.array_equal(F.dequantize_int8_torch(qt, st).numpy(), F.dequantize_int8_ref(q, s))
        p, s4 = F.quantize_int4_ref(w, group)
        pt, s4t = F.quantize_int4_torch(torch.from_numpy(w), group)
        assert np.array_equal(pt.numpy(), p) and np.array_equal(s4t.numpy(), s4)
        assert np.array_equal(F.dequantize_int4_torch(pt, s4t, group).numpy(), F.dequantize_int4_ref(p, s4, group))


def _run_onnx_dq(data_proto, scale, axis, shape, block_size=None):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], **attrs)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, list(shape))],
                              initializer=[data_proto, numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_bytes_are_onnx_blocked_dequantize_linear(group):
    from onnx import TensorProto, helper

    w = _mats(np.random.default_rng(4))["outliers"]
    p, s = F.quantize_int4_ref(w, group)
    t = helper.make_tensor("w", TensorProto.INT4, list(w.shape), p.tobytes(), raw=True)
    y = _run_onnx_dq(t, s, axis=1, shape=w.shape, block_size=group)
    ours = F.dequantize_int4_ref(p, s, group).astype(np.float16)
    assert y.dtype == np.float16 and y.shape == w.shape
    assert np.array_equal(y.view(np.uint16), ours.view(np.uint16))


def test_int8_is_onnx_per_axis_dequantize_linear():
    from onnx import numpy_helper

    w = _mats(np.random.default_rng(5))["outliers"]
    q, s = F.quantize_int8_ref(w)
    y = _run_onnx_dq(numpy_helper.from_array(q, "w"), s, axis=0, shape=w.shape)
    assert np.array_equal(y.view(np.uint16), F.dequantize_int8_ref(q, s).astype(np.float16).view(np.uint16))


def test_spec_round_trip_and_metadata():
    for spec in (F.int8_spec(), F.int4_spec(128), F.int4_spec(32, input_scale=True)):
        d = spec.to_dict()
        assert F.QuantSpec.from_dict(d) == spec
    assert F.int4_spec(64).to_dict() == {"format": "int4", "bits": 4, "group": 64, "version": 1,
                                          "input_scale": False}
    qw = F.quantize_rtn(torch.randn(16, 128), F.int4_spec(64))
    meta = qw.metadata()
    assert meta["shape"] == [16, 128]
    back = F.QuantizedWeight.from_stored("blocks.0.att.key.weight", meta, qw.stored_tensors("blocks.0.att.key.weight"))
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert qw.nbytes == F.int4_spec(64).nbytes((16, 128)) == 16 * 64 + 16 * 2 * 2


@pytest.mark.parametrize("bad, msg", [
    ({"format": "int3", "version": 1}, "unknown quantization format"),
    ({"format": "int4", "group": 128, "version": 9}, "version 9 is not supported"),
    ({"format": "int4", "group": 48, "version": 1}, "group must be one of"),
    ({"format": "int8", "group": 128, "version": 1}, "group must be None"),
    ({"format": "int4", "group": 128, "version": 1, "bits": 8}, "bits=8"),
    ({"format": "int4", "group": 128}, "version must be an integer"),
    ({"format": "int8", "version": 1, "zero_point": 3}, "unknown keys"),
    ({"group": 128, "version": 1}, "no 'format'"),
    ("int8", "JSON object"),
])
def test_invalid_specs_rejected(bad, msg):
    with pytest.raises(CheckpointError, match=msg):
        F.QuantSpec.from_dict(bad)


def test_corrupt_stored_tensors_rejected():
    name = "blocks.1.ffn.key.weight"
    qw = F.quantize_rtn(torch.randn(8, 256), F.int4_spec(128))
    meta, t = qw.metadata(), qw.stored_tensors(name)
    bad = dict(t, **{name: t[name][:, :-1]})
    with pytest.raises(CheckpointError, match="truncated"):
        F.QuantizedWeight.from_stored(name, meta, bad)
    bad = dict(t, **{name + ".scale": t[name + ".scale"][:, :1]})
    with pytest.raises(CheckpointError, match="wrong scale shape"):
        F.QuantizedWeight.from_stored(name, meta, bad)
    bad = dict(t, **{name + ".scale": t[name + ".scale"].float()})
    with pytest.raises(CheckpointError, match="dtype float32"):
        F.QuantizedWeight.from_stored(name, meta, bad)
    with pytest.raises(CheckpointError, match="missing"):
        F.QuantizedWeight.from_stored(name, meta, {name: t[name]})
    with pytest.raises(CheckpointError, match="K divisible"):
        F.QuantizedWeight.from_stored(name, dict(meta, shape=[8, 200]), t)
    with pytest.raises(CheckpointError, match="shape"):
        F.QuantizedWeight.from_stored(name, {k: v for k, v in meta.items() if k != "shape"}, t)
    with pytest.raises(CheckpointError, match="K divisible by 128"):
        F.quantize_int4_ref(np.zeros((2, 96), np.float32), 128)


def test_policy():
    C, Fd, V = 256, 1024, 512
    f = lambda n, s, **kw: QuantPolicy(bits=4, group=128, **kw).format_for(n, s)  # noqa: E731
    assert f("blocks.3.att.key.weight", (C, C)) == F.int4_spec(128)
    assert f("blocks.3.ffn.value.weight", (C, Fd)) == F.int4_spec(128)
    assert f("blocks.0.att.output.weight", (C, C)) is None
    assert f("blocks.0.att.output.weight", (C, C), keep_layer0_output=False) == F.int4_spec(128)
    assert f("blocks.10.att.output.weight", (C, C)) == F.int4_spec(128)
    assert f("head.weight", (V, C)) is None and f("head.weight", (V, C), quantize_head=True) == F.int4_spec(128)
    assert f("emb.weight", (V, C)) is None and f("emb.weight", (V, C), quantize_embedding=True) == F.int8_spec()
    for keep in ("blocks.2.att.w1", "blocks.2.att.a0", "blocks.2.att.x_r", "blocks.2.ln1.weight",
                 "blocks.2.att.ln_x.weight", "blocks.2.att.k_k", "ln_out.weight", "blocks.2.att.v2"):
        assert f(keep, (C, 64)) is None
    assert f("blocks.1.att.key.weight", (C, 200)) == F.int8_spec()  # K not a multiple of the group
    assert QuantPolicy(bits=8).format_for("blocks.1.att.key.weight", (C, C)) == F.int8_spec()
    assert QuantPolicy(bits=16).format_for("blocks.1.att.key.weight", (C, C)) is None
    with pytest.raises(CheckpointError):
        QuantPolicy(bits=3).format_for("blocks.1.att.key.weight", (C, C))
    p = QuantPolicy(bits=4, group=64, quantize_head=True, method="gptq")
    assert QuantPolicy.from_dict(p.to_dict()) == p
    assert p.format_for("head.weight", (V, C)) == F.int4_spec(64)
    with pytest.raises(CheckpointError):
        QuantPolicy.from_dict(dict(p.to_dict(), colour="red"))
