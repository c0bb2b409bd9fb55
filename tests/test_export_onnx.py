"""ONNX export: graphs valid, onnxruntime matches the torch runtime, chunk == T decode steps, lint, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edge_rwkv  # noqa: E402
from edge_rwkv.artifact import make_metadata, write_artifact  # noqa: E402
from edge_rwkv.checkpoint import derive_config  # noqa: E402
from edge_rwkv.errors import CheckpointError, InputError  # noqa: E402
from edge_rwkv.export.exporter import ExportOptions, export_onnx  # noqa: E402
from edge_rwkv.export.manifest import describe, load_manifest  # noqa: E402
from edge_rwkv.export.ort_runner import OrtGraph, OrtModel  # noqa: E402
from edge_rwkv.export.source import read_source  # noqa: E402
from edge_rwkv.export.trt_lint import TARGETS, lint_model  # noqa: E402
from edge_rwkv.export.verify import compare, verify_export  # noqa: E402
from edge_rwkv.quant import formats  # noqa: E402
from edge_rwkv.state import State  # noqa: E402
from edge_rwkv.synthetic import random_checkpoint  # noqa: E402

VOCAB, LAYERS, EMBD, HEAD = 97, 2, 64, 32
CHUNK = 4
# Tolerances: max |Δlogits| / std(logits). fp32 graphs compute what the torch runtime computes;
# fp16 graphs differ from torch's fp16 CPU path by rounding/accumulation order in the fp16 matmuls.
TOL_FP32 = 1e-4
TOL_FP16 = 2e-2

QUANTIZED = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def _official(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(random_checkpoint(LAYERS, EMBD, HEAD, vocab_size=VOCAB, seed=3), str(path))
    return path


def _quantized_artifact(path, fmt: str, input_scale: bool = False, group: int = 32,
                        head_and_emb: bool = False):
    """An fp16 artifact whose big matrices are quantized by quant.formats' reference quantizers."""
    sd = random_checkpoint(LAYERS, EMBD, HEAD, vocab_size=VOCAB, seed=5)
    cfg = derive_config(sd)
    tensors = {k: v.to(torch.float16) for k, v in sd.items()}
    specs = {}
    g = torch.Generator().manual_seed(9)
    for i in range(LAYERS):
        for short in QUANTIZED:
            name = f"blocks.{i}.{short}.weight"
            w = tensors.pop(name).float()
            ins = None
            if input_scale:
                ins = (torch.rand(w.shape[1], generator=g) * 1.5 + 0.5).to(torch.float16)
                w = w / ins.float()[None, :]
            if fmt == "int8":
                q, s = formats.quantize_int8_ref(w.numpy())
                spec = formats.int8_spec(input_scale)
            else:
                q, s = formats.quantize_int4_ref(w.numpy(), group)
                spec = formats.int4_spec(group, input_scale)
            qw = formats.QuantizedWeight(spec, tuple(w.shape), torch.from_numpy(q), torch.from_numpy(s), ins)
            stored = qw.stored_tensors(name)
            tensors.update(stored)
            specs[name] = qw.metadata()
    if head_and_emb:  # int8 per row, as quant/policy.py allows for these two
        for name in ("head.weight", "emb.weight"):
            w = tensors.pop(name).float()
            q, s = formats.quantize_int8_ref(w.numpy())
            qw = formats.QuantizedWeight(formats.int8_spec(), tuple(w.shape), torch.from_numpy(q), torch.from_numpy(s))
            tensors.update(qw.stored_tensors(name))
            specs[name] = qw.metadata()
    meta = make_metadata(cfg, "float16", source_sha256="0" * 64, quant={"policy": None, "tensors": specs})
    write_artifact(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return _official(tmp_path_factory)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, official):
    """Export folders by key; built on first use."""
    cache = {}
    models = tmp_path_factory.mktemp("qmodels")

    def get(key):
        if key in cache:
            return cache[key]
        kind, dtype, batch, *target = key  # target: "onnxruntime" unless a fourth element says "tensorrt"
        if kind == "dense":
            model = official
        else:
            fmt, _, rest = kind.partition("-")
            model = _quantized_artifact(models / f"{kind}.safetensors", fmt, input_scale="awq" in rest, head_and_emb="head" in rest)
        out = tmp_path_factory.mktemp(f"export-{kind}-{dtype}-b{batch}-{'-'.join(target)}")
        export_onnx(model, out, ExportOptions(chunk=CHUNK, batch=batch, dtype=dtype, force=True, progress=False,
                                              target=target[0] if target else "onnxruntime"), log=lambda m: None)
        cache[key] = (model, out)
        return cache[key]

    return get


# --------------------------------------------------------------------------- validity

@pytest.mark.parametrize("key", [("dense", "float32", 1, "tensorrt"), ("dense", "float16", 1, "tensorrt"),
                                 ("int8", "float16", 1, "tensorrt"), ("int4", "float16", 1, "tensorrt"),
                                 ("int4", "float16", 1)])
def test_graphs_check_infer_and_lint_clean(exports, key):
    """Valid ONNX; lint clean for the TensorRT target; the onnxruntime target differs only in the prefill
    graph's free token dimension (TensorRT wants fixed shapes)."""
    _, out = exports(key)
    m = load_manifest(out)
    for name in ("decode", "prefill"):
        model = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
        assert {f.domain + "." + f.name for f in model.functions} == {"rwkv7.wkv7"}
        assert any(n.domain == "rwkv7" and n.op_type == "wkv7" for n in model.graph.node)
        assert next(o.version for o in model.opset_import if o.domain == "") == 21
        any_tokens = key[-1] != "tensorrt" and name == "prefill"
        assert m["graphs"][name]["any_tokens"] == any_tokens
        tokens = model.graph.input[0].type.tensor_type.shape.dim[1]
        assert (tokens.dim_param == "T") if any_tokens else (tokens.dim_value == m["graphs"][name]["tokens_per_call"])
        for target in TARGETS:
            errors = [i for i in lint_model(model, target) if i.level != "note"]
            if any_tokens:  # the free T: the tokens input, and each layer's Scan over it
                assert "graph input 'tokens' has a dynamic shape; export fixed shapes" in [e.message for e in errors]
                assert all("dynamic shape" in e.message or "no static shape" in e.message for e in errors), errors
            else:
                assert not errors, errors
        names = [i.name for i in model.graph.input]
        assert names[0] == "tokens" and names[1:4] == ["att_x.0", "wkv.0", "ffn_x.0"]
        outs = [o.name for o in model.graph.output]
        assert outs[0] == "logits" and outs[1:4] == ["att_x_out.0", "wkv_out.0", "ffn_x_out.0"]
        assert m["graphs"][name]["tokens_per_call"] == (1 if name == "decode" else CHUNK)
    if key[0] != "dense":
        ops = {n.op_type for n in onnx.load(str(out / "decode.onnx")).graph.node}
        assert "DequantizeLinear" in ops
        assert m["quant"]["formats"] == ({"int8": 12} if key[0] == "int8" else {"int4/g32": 12})


def test_manifest_and_describe(exports):
    model, out = exports(("int4", "float16", 1))
    m = load_manifest(out)
    assert m["model"]["source_sha256"] and len(m["model"]["source_sha256"]) == 64
    assert m["precision"]["state"] == "float32" and m["precision"]["matmul"] == "float16"
    assert m["graphs"]["decode"]["inputs"][0] == {"name": "tokens", "dtype": "int64", "shape": [1, 1]}
    wkv0 = next(i for i in m["graphs"]["prefill"]["inputs"] if i["name"] == "wkv.0")
    assert wkv0 == {"name": "wkv.0", "dtype": "float32", "shape": [1, EMBD // HEAD, HEAD, HEAD]}
    assert {"onnx", "torch", "onnxruntime", "edge_rwkv"} <= set(m["tools"])
    text = describe(out)
    assert "decode.onnx" in text and "prefill.onnx" in text and "int4/g32" in text and "rwkv7.wkv7" in text


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_int4_weights_are_the_stored_levels_transposed(exports):
    """Wᵀ [K, out] INT4 blocked along K (axis 0) → MatMul: the stored levels and scales, transposed."""
    model, out = exports(("int4", "float16", 1))
    src = read_source(model)
    q = src.quant["blocks.1.ffn.value.weight"]
    onnx_model = onnx.load(str(out / "decode.onnx"))  # external data read from weights.bin
    init = _init(onnx_model, "blocks.1.ffn.value.weight.qweight_t")
    assert init.data_type == onnx.TensorProto.INT4 and list(init.dims) == [q.shape[1], q.shape[0]]
    levels = onnx.numpy_helper.to_array(init).astype(np.int8)
    np.testing.assert_array_equal(levels, formats.unpack_int4_ref(q.qweight).T)
    scale = onnx.numpy_helper.to_array(_init(onnx_model, "blocks.1.ffn.value.weight.scale_t"))
    np.testing.assert_array_equal(scale, q.scale.T)
    dq = next(n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == init.name)
    assert _attrs(dq) == {"axis": 0, "block_size": 32} and len(dq.input) == 2  # symmetric: no zero point
    mm = next(n for n in onnx_model.graph.node if dq.output[0] in n.input)
    assert mm.op_type == "MatMul" and mm.input[1] == dq.output[0]


def test_int8_weights_and_embedding_stay_int8(exports):
    model, out = exports(("int8-head", "float16", 1))
    src = read_source(model)
    onnx_model = onnx.load(str(out / "decode.onnx"))
    q = src.quant["head.weight"]
    init = _init(onnx_model, "head.weight.qweight_t")
    assert init.data_type == onnx.TensorProto.INT8
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(init), q.qweight.T)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(_init(onnx_model, "head.weight.scale")), q.scale)
    dq = next(n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == init.name)
    assert _attrs(dq) == {"axis": 1}
    emb = _init(onnx_model, "emb.weight.qweight")
    assert emb.data_type == onnx.TensorProto.INT8 and list(emb.dims) == [VOCAB, EMBD]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(emb), src.quant["emb.weight"].qweight)
    gather = next(n for n in onnx_model.graph.node if n.input[:1] == ["emb.weight.qweight"])
    assert gather.op_type == "Gather"  # rows are gathered, the table is never dequantized as a whole
    assert load_manifest(out)["precision"]["embedding"].startswith("int8")


@pytest.mark.parametrize("kind", ["int8-head", "int4-head"])
def test_tensorrt_target_int8_embedding_lints_clean(exports, kind):
    """TensorRT's parser takes INT8 only through a DequantizeLinear: the tensorrt target writes the int8
    embedding as DequantizeLinear(table, per-row scales, axis 0) → Gather, and its graphs lint clean, while
    the onnxruntime target (Gather of int8 rows, then scale) is what the lint refuses."""
    model, out = exports((kind, "float16", 1, "tensorrt"))
    _, ort_out = exports((kind, "float16", 1))
    src = read_source(model)
    m = load_manifest(out)
    assert m["target"] == "tensorrt" and load_manifest(ort_out)["target"] == "onnxruntime"
    assert m["quant"]["tensors"]["emb.weight"]["onnx"].startswith("DequantizeLinear")
    for name in ("decode", "prefill"):
        model_trt = onnx.load(str(out / f"{name}.onnx"))
        for target in TARGETS:
            assert [i for i in lint_model(model_trt, target) if i.level != "note"] == []
            assert m["lint"][name][target] == []
        ort_errors = [i for i in lint_model(onnx.load(str(ort_out / "decode.onnx"), load_external_data=False), "10.3")
                      if i.level == "error"]
        assert ort_errors and all(i.node.startswith("emb.") for i in ort_errors), ort_errors
        table = _init(model_trt, "emb.weight.qweight")
        assert table.data_type == onnx.TensorProto.INT8 and list(table.dims) == [VOCAB, EMBD]
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(table), src.quant["emb.weight"].qweight)
        scale = onnx.numpy_helper.to_array(_init(model_trt, "emb.weight.scale_rows"))
        np.testing.assert_array_equal(scale, src.quant["emb.weight"].scale.reshape(-1))  # as stored (fp16)
        dq = next(n for n in model_trt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == table.name)
        assert _attrs(dq) == {"axis": 0} and len(dq.input) == 2
        gather = next(n for n in model_trt.graph.node if dq.output[0] in n.input)
        assert gather.op_type == "Gather" and gather.input == [dq.output[0], "tokens"] and _attrs(gather) == {"axis": 0}
    # onnxruntime runs the TensorRT layout too, with the same numbers
    rep = verify_export(model, out, tokens=CHUNK + 3, seed=4)
    assert rep["max_rel"] <= TOL_FP16 and rep["max_rel_chunked"] <= TOL_FP16, rep
    assert "laid out for tensorrt" in describe(out)


def test_engines_only_from_a_tensorrt_target(exports):
    from edge_rwkv.export.tensorrt import build_engines

    _, out = exports(("dense", "float16", 1))
    with pytest.raises(InputError, match="laid out for onnxruntime.*--format tensorrt"):
        build_engines(out)
    assert not list(out.glob("*.engine"))


def _optimized_ops(path, session_config, tmp_path):
    import onnxruntime as ort

    from edge_rwkv.export.ort_runner import session_options

    opts = session_options(session_config)
    opts.optimized_model_filepath = str(tmp_path / (path.stem + ".opt.onnx"))
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]


@pytest.mark.parametrize("kind", ["int4", "int8-head"])
def test_onnxruntime_fuses_every_quantized_matmul(exports, tmp_path, kind):
    """onnxruntime runs no DequantizeLinear per call: the pattern fuses into MatMulNBits, and under the
    manifest's session config int4 stays MatMulNBits while int8 is dequantized once at session creation."""
    model, out = exports((kind, "float16", 1))
    m = load_manifest(out)
    n_matrices = sum(1 for k in m["quant"]["tensors"] if k != "emb.weight")
    fused = _optimized_ops(out / "prefill.onnx", m["onnxruntime"]["faster"], tmp_path)
    assert "DequantizeLinear" not in fused and fused.count("MatMulNBits") == n_matrices  # the layout fuses
    ops = _optimized_ops(out / "decode.onnx", m["onnxruntime"]["session_config"], tmp_path)
    assert "DequantizeLinear" not in ops
    if kind == "int4":
        assert m["onnxruntime"]["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "1"}
        assert ops.count("MatMulNBits") == n_matrices
    else:
        assert m["onnxruntime"]["session_config"] == {"session.disable_quant_qdq": "1"}
        assert "MatMulNBits" not in ops


# --------------------------------------------------------------------------- parity

def _steps(graph: OrtGraph, ids, state):
    logits = []
    for t in range(ids.shape[1]):
        lg, state = graph.step(ids[:, t:t + 1], state)
        logits.append(lg)
    return torch.stack(logits, 1), state


def test_fp32_decode_matches_torch_runtime(exports):
    model, out = exports(("dense", "float32", 1))
    m = edge_rwkv.load(model, dtype="float32")
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    ref, ref_state = m.forward(ids, m.new_state())
    got, state = _steps(OrtGraph(out / "decode.onnx"), ids, m.new_state())
    assert compare(ref, got) <= TOL_FP32
    for p in ("att_x", "wkv", "ffn_x"):
        torch.testing.assert_close(getattr(state, p), getattr(ref_state, p), atol=1e-4, rtol=1e-4)
    assert state.fingerprint == m.fingerprint and state.tokens == 11
    # chunked: two prefill calls of CHUNK tokens, then decode steps; continues from a saved state
    got_c, state_c = OrtModel(out).forward(ids, m.new_state())
    assert compare(ref[:, -1], got_c) <= TOL_FP32


@pytest.mark.parametrize("key,tol", [
    (("dense", "float16", 1), TOL_FP16),
    (("int8", "float16", 1), TOL_FP16),
    (("int4", "float16", 1), TOL_FP16),
    (("int8-awq", "float32", 1), TOL_FP32),     # input_scale; exact same weights, fp32 math
    (("int4", "float32", 1), TOL_FP32),          # int4, fp32 math
    (("int8-head", "float16", 1), TOL_FP16),     # int8 head and embedding too
    (("dense", "float32", 2), TOL_FP32),         # fixed batch 2
])
def test_onnxruntime_matches_torch_reference(exports, key, tol):
    model, out = exports(key)
    rep = verify_export(model, out, tokens=2 * CHUNK + 3, seed=4)
    assert rep["batch"] == key[2]
    assert rep["max_rel"] <= tol and rep["max_rel_chunked"] <= tol, rep
    assert rep["max_rel_one_session"] <= tol, rep  # the onnxruntime target: one session of the any-T prefill graph
    assert rep["state_max_abs"] <= (1e-4 if tol == TOL_FP32 else 5e-2), rep
    assert rep["argmax_agree"] == rep["argmax_total"] == (2 * CHUNK + 3) * key[2], rep


def test_argmax_rule_counts_only_near_ties_picking_the_runner_up():
    from edge_rwkv.export.verify import ARGMAX_TIE_STD, argmax_agreement

    ref = torch.linspace(-1, 1, 50)  # std ≈ 0.59; the best logit is the last one
    std = float(ref.std())
    assert argmax_agreement(ref, ref) == "match"
    tied = ref.clone()
    tied[10] = ref[-1] - 0.5 * ARGMAX_TIE_STD * std  # runner-up within the tolerance
    flipped = tied.clone()
    flipped[10], flipped[-1] = tied[-1], tied[10]  # ours picks the runner-up
    assert argmax_agreement(tied, flipped) == "near_tie"
    apart = ref.clone()
    apart[10] = ref[-1] - 2 * ARGMAX_TIE_STD * std  # runner-up outside the tolerance
    swapped = apart.clone()
    swapped[10], swapped[-1] = apart[-1], apart[10]
    assert argmax_agreement(apart, swapped) == "miss"
    third = tied.clone()
    third[20] = tied[-1] + 1.0  # within-tolerance tie, but ours picks neither of the two best
    assert argmax_agreement(tied, third) == "miss"


def test_quantized_reference_is_the_runtime_on_dequantized_weights(exports):
    """The quantized reference equals the plain runtime given the dequantized matrices as dense weights."""
    from edge_rwkv.export.reference import reference_model
    from edge_rwkv.model import build_model

    model, _ = exports(("int8-awq", "float32", 1))
    src = read_source(model)
    net, fp = reference_model(src, "float32")
    dense = dict(src.tensors)
    dense.update({k: q.dequantize() for k, q in src.quant.items()})
    plain = build_model(src.config, dense, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    z = State.zeros(LAYERS, 1, EMBD, EMBD // HEAD, HEAD, "cpu", fp)
    a, _ = net.forward(ids, z)
    b, _ = plain.forward(ids, z)
    assert compare(b, a) <= 1e-5


def test_prefill_chunk_equals_decode_steps(exports):
    model, out = exports(("dense", "float32", 1))
    src = read_source(model)
    c = src.config
    g = torch.Generator().manual_seed(7)
    start = State(torch.randn(LAYERS, 1, EMBD, generator=g), torch.randn(LAYERS, 1, c.n_head, HEAD, HEAD, generator=g) * 0.1,
                  torch.randn(LAYERS, 1, EMBD, generator=g))
    ids = torch.randint(0, VOCAB, (1, CHUNK), generator=g)
    lg_chunk, st_chunk = OrtGraph(out / "prefill.onnx").step(ids, start)
    lg_steps, st_steps = _steps(OrtGraph(out / "decode.onnx"), ids, start)
    assert compare(lg_steps[:, -1], lg_chunk) <= 1e-5
    for p in ("att_x", "wkv", "ffn_x"):
        torch.testing.assert_close(getattr(st_chunk, p), getattr(st_steps, p), atol=1e-5, rtol=1e-5)


def test_one_session_runs_a_whole_sequence(exports):
    """The onnxruntime target's prefill graph takes any number of tokens: OrtModel(one_copy=True) runs chunks,
    the remainder and single tokens in that one session, with the two-session runner's logits and state."""
    model, out = exports(("int4", "float16", 1))
    m = edge_rwkv.load(model, dtype="float32")
    ids = torch.randint(0, VOCAB, (1, 2 * CHUNK + 3), generator=torch.Generator().manual_seed(8))
    two, one = OrtModel(out, one_copy=False), OrtModel(out, one_copy=True)
    assert one.decode.session is one.prefill.session and one.decode.tokens == 1 and one.prefill.tokens == CHUNK
    assert two.decode.session is not two.prefill.session
    auto = OrtModel(out)  # the default: one session wherever the export allows it
    assert auto.decode.session is auto.prefill.session
    ref, ref_state = two.forward(ids, m.new_state())
    got, state = one.forward(ids, m.new_state())
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    for p in ("att_x", "wkv", "ffn_x"):
        torch.testing.assert_close(getattr(state, p), getattr(ref_state, p), atol=1e-5, rtol=0)
    assert state.tokens == ref_state.tokens == ids.shape[1]
    # any T in one call: 3 tokens at once == 3 decode steps
    lg3, st3 = one.prefill.step(ids[:, :3], m.new_state())
    lg1, st1 = _steps(two.decode, ids[:, :3], m.new_state())
    np.testing.assert_allclose(lg3.numpy(), lg1[:, -1].numpy(), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match=r"takes tokens of shape \[1, 1\]"):
        two.decode.step(ids[:, :2], m.new_state())
    _, trt_out = exports(("int4", "float16", 1, "tensorrt"))
    with pytest.raises(InputError, match="one_copy needs a prefill graph that takes any number of tokens"):
        OrtModel(trt_out, one_copy=True)
    fixed = OrtModel(trt_out)  # fixed shapes: two sessions
    assert fixed.decode.session is not fixed.prefill.session


def test_one_weights_file_shared_by_both_graphs(exports):
    from edge_rwkv.export.weights import ALIGN, INLINE_MAX_BYTES

    _, out = exports(("int4", "float16", 1))
    m = load_manifest(out)
    assert m["external_data"] == "weights.bin"
    where = {}
    for name in ("decode", "prefill"):
        model = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                assert len(t.raw_data) <= INLINE_MAX_BYTES, t.name
                continue
            ext = {e.key: e.value for e in t.external_data}
            assert ext["location"] == "weights.bin" and int(ext["offset"]) % ALIGN == 0
            where.setdefault(t.name, set()).add((int(ext["offset"]), int(ext["length"])))
    assert all(len(v) == 1 for v in where.values())  # both graphs point at the same bytes
    spans = sorted(next(iter(v)) for v in where.values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # each tensor stored once
    size = (out / "weights.bin").stat().st_size
    assert size == spans[-1][0] + spans[-1][1]
    assert sum(n for _, n in spans) > size - ALIGN * len(spans)  # nothing but alignment padding besides
    assert "weights.bin" in describe(out)


def test_graphs_are_built_without_holding_weights(tmp_path, monkeypatch):
    """Initializers go to weights.bin as they are made; the second graph reuses them without rebuilding."""
    from edge_rwkv.export import onnx_graph
    from edge_rwkv.export.onnx_graph import GraphSpec, build_graph
    from edge_rwkv.export.weights import ALIGN, INLINE_MAX_BYTES, WeightsFile

    src = read_source(_quantized_artifact(tmp_path / "q.safetensors", "int4"))
    made = []
    real = onnx_graph.transposed_levels
    monkeypatch.setattr(onnx_graph, "transposed_levels", lambda q: made.append(q.name) or real(q))
    weights = WeightsFile(tmp_path / "w.bin")
    graphs = [build_graph(src, GraphSpec(1, t, "float16"), weights=weights) for t in (1, CHUNK)]
    weights.close()
    assert sorted(made) == sorted(src.quant)  # each quantized matrix transposed once, for both graphs
    for g in graphs:
        for t in g.graph.initializer:
            assert not t.raw_data if t.data_location == onnx.TensorProto.EXTERNAL else len(t.raw_data) <= INLINE_MAX_BYTES
    assert all(offset % ALIGN == 0 for offset, *_ in weights.index.values())
    with pytest.raises(RuntimeError, match="differs between graphs"):  # one name, one tensor
        weights.add(next(iter(weights.index)), np.zeros(3, np.float32), [3], onnx.TensorProto.FLOAT)


def test_manifest_lists_every_file_with_its_hash(exports):
    from edge_rwkv.fileio import sha256_file

    _, out = exports(("dense", "float16", 1))
    m = load_manifest(out)
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk == {"decode.onnx", "prefill.onnx", "weights.bin"}
    for name, f in m["files"].items():
        assert f == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert m["tokenizer"] is None  # a 97-token vocabulary is not the World tokenizer's
    assert m["initial_state"]["kind"] == "zeros" and "prefill" in m["chaining"]["rule"]
    for g in m["graphs"].values():
        assert g["inlined_nodes"] > g["nodes"]


def test_world_vocabulary_ships_with_the_export(tmp_path):
    from safetensors.torch import save_file

    from edge_rwkv.fileio import sha256_file
    from edge_rwkv.tokenizer import default_tokenizer

    path = tmp_path / "world.safetensors"
    save_file(random_checkpoint(1, 64, 32, vocab_size=65536, seed=1), str(path))
    out = tmp_path / "out"
    m = export_onnx(path, out, ExportOptions(chunk=CHUNK, progress=False), log=lambda s: None)
    t = m["tokenizer"]
    assert t["name"] == "rwkv_vocab_v20230424" and t["end_of_text_id"] == 0 and t["vocab_size"] == 65536
    vocab = out / t["file"]
    assert m["files"][t["file"]]["sha256"] == sha256_file(vocab)
    assert vocab.read_bytes() == open(default_tokenizer()._enc.vocab_filepath, "rb").read()


def test_prefill_graph_size_does_not_grow_with_the_chunk(official):
    from edge_rwkv.export.manifest import inlined_node_count
    from edge_rwkv.export.onnx_graph import GraphSpec, build_graph

    src = read_source(official)
    small, big = (build_graph(src, GraphSpec(1, t, "float32")) for t in (4, 256))
    assert len(small.graph.node) == len(big.graph.node)
    assert inlined_node_count(small) == inlined_node_count(big)
    fn = big.functions[0]
    assert (fn.domain, fn.name) == ("rwkv7", "wkv7") and any(n.op_type == "Scan" for n in fn.node)


def test_token_ids_are_checked(exports):
    from edge_rwkv.export.ort_runner import IoBoundGraph

    model, out = exports(("dense", "float32", 1))
    m = edge_rwkv.load(model, dtype="float32")
    g = OrtGraph(out / "decode.onnx")
    for bad in (-1, VOCAB):
        with pytest.raises(InputError, match=f"token id {bad} is outside the vocabulary"):
            g.step([[bad]], m.new_state())
        with pytest.raises(InputError, match="outside the vocabulary"):
            IoBoundGraph(g).step([[bad]])
        with pytest.raises(InputError, match="outside the vocabulary"):
            OrtModel(out).forward([1, 2, bad], m.new_state())


def test_io_bound_loop_equals_the_state_runner(exports):
    """Two swapped state buffers under IO binding give the same logits as feeding State objects."""
    from edge_rwkv.export.ort_runner import IoBoundGraph

    model, out = exports(("int4", "float16", 1))
    m = edge_rwkv.load(model, dtype="float32")
    ids = torch.randint(0, VOCAB, (1, CHUNK + 3), generator=torch.Generator().manual_seed(5))
    decode = OrtGraph(out / "decode.onnx")
    ref, _ = _steps(decode, ids, m.new_state())
    fast = IoBoundGraph(decode)
    got = np.stack([fast.step(ids[:, t:t + 1].numpy())[0].copy() for t in range(ids.shape[1])])
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=0, atol=1e-6)
    fast.reset()
    np.testing.assert_allclose(fast.step(ids[:, :1].numpy())[0], ref[0, 0].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", [("int8-head", "float16", 1), ("int8-head", "float16", 1, "tensorrt")])
def test_integration_guide_example_runs(exports, key):
    """The Python example of export/INTEGRATION.md, run as written on an export, agrees with our runner: with one
    session where the prefill graph takes any number of tokens (onnxruntime target), else two."""
    import re
    from pathlib import Path

    import edge_rwkv.export as export_pkg

    guide = (Path(export_pkg.__file__).parent / "INTEGRATION.md").read_text()
    code = re.search(r"```python\n(.*?)```", guide, re.S).group(1)
    model, out = exports(key)
    ns = {"FOLDER": str(out), "PROMPT_IDS": [3, 1, 4, 1, 5, 9, 2], "MAX_NEW": 5}
    exec(compile(code, "INTEGRATION.md", "exec"), ns)
    assert ns["ONE_SESSION"] == (len(key) == 3) and (ns["sessions"]["decode"] is ns["sessions"]["prefill"]) == ns["ONE_SESSION"]
    ref_logits, st = OrtModel(out).forward(torch.tensor([ns["PROMPT_IDS"]]), edge_rwkv.load(model).new_state())
    assert ns["generated"][0] == int(ref_logits[0].argmax())
    assert len(ns["generated"]) == 5


# --------------------------------------------------------------------------- lint catches problems

def test_lint_reports_offending_nodes():
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    w4 = h.make_tensor("w4", TP.INT4, [4, 3], bytes(6), raw=True)  # odd last dim, not blocked
    nodes = [
        h.make_node("DequantizeLinear", ["w4", "s4"], ["wd"], name="bad_dq", axis=0),
        h.make_node("Gemm", ["x", "wd"], ["y"], name="mm", transB=1),
        h.make_node("Shape", ["y"], ["shp"], name="dyn_shape"),
        h.make_node("Reshape", ["y", "shp"], ["y2"], name="dyn_reshape"),
        h.make_node("NonZero", ["y2"], ["nz"], name="nonzero"),
        h.make_node("Cast", ["nz"], ["out"], name="cast_out", to=TP.FLOAT),
    ]
    graph = h.make_graph(nodes, "bad", [h.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("out", TP.FLOAT, [2, None])],
                         [w4, nh.from_array(np.ones(4, np.float32), "s4")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    issues = [i for i in lint_model(model, "10.3") if i.level == "error"]
    by_node = {}
    for i in issues:
        by_node.setdefault(i.node, []).append(i.message)
    assert any("blocked" in m for m in by_node["bad_dq"])
    assert any("even" in m for m in by_node["bad_dq"])
    assert any("build-time constant" in m for m in by_node["dyn_reshape"])
    assert any("support list" in m for m in by_node["nonzero"])
    assert any("int64" in m for m in by_node["dyn_shape"])
    assert any("dynamic shape" in i.message for i in issues)
    assert "node 'bad_dq' (DequantizeLinear)" in str(next(i for i in issues if i.node == "bad_dq"))


def test_lint_checks_the_weight_only_axes():
    """Blocked along K and per output channel N, for MatMul's B [K, N] and Gemm(transB)'s B [N, K]."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    def issues(axis, block, op_attrs, shape=(64, 32)):
        K, N = shape
        w = h.make_tensor("w", TP.INT4 if block else TP.INT8, list(shape), bytes(K * N // (2 if block else 1)), raw=True)
        if block:
            sshape = [K // block, N] if axis == 0 else [K, N // block]
        else:
            sshape = [shape[axis]]
        dq = h.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq", axis=axis, **({"block_size": block} if block else {}))
        op = "Gemm" if op_attrs else "MatMul"
        x_dim = shape[1] if op_attrs else shape[0]
        out_dim = shape[0] if op_attrs else shape[1]
        g = h.make_graph([dq, h.make_node(op, ["x", "wd"], ["y"], name="mm", **op_attrs)], "g",
                         [h.make_tensor_value_info("x", TP.FLOAT, [1, x_dim])], [h.make_tensor_value_info("y", TP.FLOAT, [1, out_dim])],
                         [w, nh.from_array(np.ones(sshape, np.float32), "s")])
        return [i.message for i in lint_model(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), "10.13") if i.level == "error"]

    assert issues(0, 32, {}) == [] and issues(1, None, {}) == []  # our layout: Wᵀ [K, N]
    assert any("reduction axis K" in m for m in issues(1, 16, {}))
    assert any("output channels" in m for m in issues(0, None, {}))
    assert issues(1, 32, {"transB": 1}) == [] and issues(0, None, {"transB": 1}) == []  # W [N, K] under transB
    assert any("reduction axis K" in m for m in issues(0, 16, {"transB": 1}))


def test_lint_checks_scan_bodies(exports):
    _, out = exports(("dense", "float32", 1))
    model = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    scan = next(n for n in model.functions[0].node if n.op_type == "Scan")
    body = next(a for a in scan.attribute if a.name == "body").g
    body.node.append(onnx.helper.make_node("NonZero", [body.node[0].output[0]], ["nz_unused"], name="bad_in_scan"))
    issues = [i for i in lint_model(model, "10.3") if i.level == "error"]
    bad = [i.node for i in issues if i.op == "NonZero"]
    assert len(bad) == LAYERS and all(n.startswith("bad_in_scan") for n in bad)  # one Scan per layer


def test_lint_checks_function_bodies(exports):
    _, out = exports(("dense", "float32", 1))
    model = onnx.load(str(out / "decode.onnx"))
    fn = model.functions[0]
    bad = onnx.helper.make_node("NonZero", [fn.node[0].output[0]], ["nz_unused"], name="bad_in_function")
    fn.node.append(bad)
    issues = [i for i in lint_model(model, "10.13") if i.level == "error"]
    assert any(i.op == "NonZero" for i in issues), issues


# --------------------------------------------------------------------------- errors

def test_missing_model(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        export_onnx(tmp_path / "nope.safetensors", tmp_path / "out", ExportOptions(progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw,msg", [({"chunk": 1}, "--chunk"), ({"chunk": 0}, "--chunk"), ({"chunk": 5000}, "--chunk"),
                                    ({"batch": 0}, "--batch"), ({"dtype": "int8"}, "--dtype"), ({"chunk": "8"}, "--chunk"),
                                    ({"target": "tflite"}, "export target must be one of onnxruntime, tensorrt")])
def test_bad_options(tmp_path, official, kw, msg):
    with pytest.raises(InputError, match=msg):
        export_onnx(official, tmp_path / "out", ExportOptions(progress=False, **kw))
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir(tmp_path, official):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "decode.engine").write_bytes(b"stale")
    with pytest.raises(InputError, match="not empty.*--force"):
        export_onnx(official, out, ExportOptions(chunk=CHUNK, progress=False))
    export_onnx(official, out, ExportOptions(chunk=CHUNK, force=True, progress=False), log=lambda s: None)
    assert (out / "notes.txt").read_text() == "keep me"  # only our own files are replaced
    assert not (out / "decode.engine").exists()  # a stale engine must not sit beside new graphs
    assert (out / "manifest.json").is_file()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        export_onnx(official, f, ExportOptions(chunk=CHUNK, progress=False))


def test_bad_quantized_artifact(tmp_path):
    path = _quantized_artifact(tmp_path / "q.safetensors", "int4")
    from safetensors.torch import load_file, save_file
    import json
    from edge_rwkv.safetensors_header import read

    meta = read(path).metadata
    t = load_file(str(path))
    t["blocks.0.att.key.weight"] = t["blocks.0.att.key.weight"][:, :-1].contiguous()  # truncated packed data
    save_file(t, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="blocks.0.att.key.weight"):
        read_source(path)
    assert json.loads(meta["edge_rwkv"])["quant"]["tensors"]


def test_tensorrt_missing_message_and_trtexec_line(exports):
    from edge_rwkv.export.tensorrt import TensorRTUnavailable, build_engines, tensorrt_available, trtexec_commands

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    _, out = exports(("dense", "float16", 1, "tensorrt"))
    with pytest.raises(TensorRTUnavailable) as e:
        build_engines(out)
    msg = str(e.value)
    assert "TensorRT" in msg and "trtexec" in msg and "--stronglyTyped" in msg
    lines = trtexec_commands(out)
    assert len(lines) == 2
    assert lines[0].startswith("trtexec ") and f"--onnx={out / 'decode.onnx'}" in lines[0]
    assert f"--saveEngine={out / 'decode.engine'}" in lines[0] and "--stronglyTyped" in lines[0]
    assert "prefill.onnx" in lines[1]
    assert not list(out.glob("*.engine"))  # nothing pretends to be an engine
