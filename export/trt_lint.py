"""Lint an ONNX graph against TensorRT's ONNX parser support, without TensorRT.

The operator/type table is transcribed from onnx-tensorrt `docs/operators.md` (10.x branch: the
ops this project can emit plus common neighbours). Targets: TensorRT 10.3 (JetPack 6) and 10.13+
(JetPack 7). Rules beyond the table, each reported with the offending node:

* every op is in the support list for the target, with a supported type on its data input;
* model-local functions are expanded (TensorRT inlines them unless a plugin of the same name is
  registered, which ≥ 10.7 prefers) and their bodies are checked like the main graph;
* `DequantizeLinear`: x and scale are initializers, no non-zero zero point; blocked form only on
  2-D weights, scale of the same rank, one blocked axis that divides evenly; INT4 weights blocked,
  with an even last dimension; the result feeds a Gemm/MatMul as its weight B (weight-only
  quantization), blocked along B's reduction axis K, per-channel scales along its output axis N; or
  it is the data of a Gather (a quantized lookup table) with one scale per gathered row;
* shape/axes operands (Reshape, Slice, Squeeze, Unsqueeze, Reduce*, Split, Expand, Tile) are
  build-time constants; no Loop/Scan with a trip count known only at run time (a Scan's length is its
  scan inputs' leading dimension: they must have static shapes); Scan/Loop/If bodies are checked
  node by node like the main graph;
* no int64 tensor computed at run time (int64 only as graph-input token ids feeding Gather, and as
  constant shapes/axes); every graph input/output shape static.

Use: `python -m edge_rwkv.export.trt_lint MODEL.onnx [--target 10.3]` or `lint_model(model, target)`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import onnx
from onnx import TensorProto

TARGETS = {
    # target: (label, highest opset named in the parser's operators.md for that release line)
    "10.3": ("TensorRT 10.3 (JetPack 6.x)", 20),
    "10.13": ("TensorRT 10.13+ (JetPack 7.x)", 23),
}

_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_ALL = _FI + ("BOOL",)
SUPPORTED: dict[str, tuple[str, ...]] = {
    "Abs": _FI, "Add": _FI, "And": ("BOOL",), "ArgMax": _FI, "ArgMin": _FI,
    "Cast": _FI + ("UINT8", "BOOL"), "CastLike": _FI + ("UINT8", "BOOL"), "Ceil": _F, "Clip": _F,
    "Concat": _ALL, "Constant": _ALL + ("FP8", "INT4"), "ConstantOfShape": _ALL + ("FP8", "INT4"),
    "Conv": _F, "Cos": _F, "CumSum": _F, "DequantizeLinear": ("INT8", "FP8", "INT4"),
    "Div": _FI, "Einsum": _F, "Elu": _F, "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _ALL,
    "Flatten": _ALL, "Floor": _F, "Gather": _ALL, "GatherElements": _ALL, "GatherND": _ALL,
    "Gelu": _FI + ("INT8",), "Gemm": _F, "Greater": _FI, "GreaterOrEqual": _FI,
    "GroupNormalization": _F, "HardSigmoid": _F, "Identity": _ALL, "If": _ALL,
    "InstanceNormalization": _F, "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI,
    "LessOrEqual": _FI, "Log": _F, "LogSoftmax": _F, "Loop": _ALL, "LpNormalization": _F,
    "MatMul": _F, "Max": _FI, "Mean": _FI, "Min": _FI, "Mod": _FI, "Mul": _FI, "Neg": _FI, "Not": ("BOOL",),
    "Or": ("BOOL",), "Pad": _FI, "Pow": _FI, "PRelu": _F, "QuantizeLinear": _F, "Range": _FI,
    "Reciprocal": _F, "ReduceL2": _FI, "ReduceMax": _FI, "ReduceMean": _FI, "ReduceMin": _FI,
    "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI, "Reshape": _ALL,
    "RMSNormalization": _F, "Scan": _F, "ScatterElements": _FI, "ScatterND": _FI, "Shape": _ALL,
    "Sigmoid": _F, "Sign": _FI, "Sin": _F, "Slice": _ALL, "Softmax": _F, "Softplus": _F,
    "Split": _ALL, "Sqrt": _F, "Squeeze": _ALL, "Sub": _FI, "Sum": _FI, "Tanh": _F, "Tile": _ALL,
    "TopK": _FI, "Transpose": _ALL, "Trilu": _ALL, "Unsqueeze": _ALL, "Where": _ALL, "Xor": ("BOOL",),
}
# Ops that appeared in the parser after the 10.3 release line (not available on JetPack 6).
ADDED_AFTER_10_3 = {"RMSNormalization": "10.15", "RotaryEmbedding": "10.15", "TensorScatter": "10.15",
                    "Attention": "10.15"}
# Operand positions that must be build-time constants.
CONST_OPERANDS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,),
                  "Expand": (1,), "Tile": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
                  "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,),
                  "TopK": (1,), "CumSum": (1,)}
_TYPE = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
         TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8",
         TensorProto.UINT8: "UINT8", TensorProto.INT4: "INT4", TensorProto.BOOL: "BOOL",
         TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.DOUBLE: "DOUBLE"}


@dataclass
class LintIssue:
    level: str  # "error" | "warning" | "note"
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op})" if self.node else (self.op or "model")
        return f"{self.level}: {where}: {self.message}"


def _type_map(g: onnx.GraphProto) -> tuple[dict[str, int], dict[str, list[int]]]:
    types, shapes = {}, {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    for t in g.initializer:
        types[t.name], shapes[t.name] = t.data_type, list(t.dims)
    return types, shapes


def lint_model(model: onnx.ModelProto, target: str = "10.3") -> list[LintIssue]:
    """Issues that would stop (errors) or worry (warnings) TensorRT `target`'s ONNX parser."""
    if target not in TARGETS:
        raise ValueError(f"unknown TensorRT target {target!r}; known: {', '.join(TARGETS)}")
    label, max_opset = TARGETS[target]
    issues: list[LintIssue] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > max_opset:
        issues.append(LintIssue("note", "", "", f"model opset {opset} is above the highest opset ({max_opset}) named in "
                                f"{label}'s operator list; the parser reads newer opsets with a warning "
                                f"(opset 21 is needed for blocked DequantizeLinear)"))
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            issues.append(LintIssue("error", "", "", f"graph {'input' if vi in model.graph.input else 'output'} "
                                    f"'{vi.name}' has a dynamic shape; export fixed shapes"))
    functions = {(f.domain, f.name) for f in model.functions}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            if (n.domain, n.op_type) not in functions:
                issues.append(LintIssue("error", n.name, f"{n.domain}.{n.op_type}",
                                        "custom op without a model-local function: TensorRT needs a plugin of this name"))
    for dom, name in sorted(functions):
        issues.append(LintIssue("note", "", f"{dom}.{name}", "model-local function: TensorRT expands its body"
                                + (" unless a plugin of the same name is registered (preferred since 10.7)"
                                   if target != "10.3" else " (10.3 has no plugin-over-function preference)")))

    from onnx import inliner, shape_inference

    flat = inliner.inline_local_functions(model)
    try:
        flat = shape_inference.infer_shapes(flat, strict_mode=True)
    except Exception as e:  # noqa: BLE001 — report, do not crash the lint
        issues.append(LintIssue("error", "", "", f"shape inference failed: {e}"))
        return issues
    types, shapes = _type_map(flat.graph)
    _lint_graph(flat.graph, target, label, types, shapes, set(), issues, top=True)
    return issues


def _subgraphs(n: onnx.NodeProto):
    for attr in n.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _lint_graph(g: onnx.GraphProto, target: str, label: str, types: dict, shapes: dict, outer_consts: set,
                issues: list, top: bool) -> None:
    """Check every node of `g` (and, recursively, of its Scan/Loop/If bodies)."""
    inits = {t.name: t for t in g.initializer}
    const_outputs = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = outer_consts | set(inits) | const_outputs
    is_const = lambda name: name in consts  # noqa: E731
    graph_inputs = {i.name for i in g.input} if top else set()

    for n in g.node:
        op, name = n.op_type, n.name or (n.output[0] if n.output else "?")
        err = lambda msg, lvl="error": issues.append(LintIssue(lvl, name, op, msg))  # noqa: E731
        if n.domain not in ("", "ai.onnx"):
            continue  # reported above
        if op not in SUPPORTED:
            err(f"not in {label}'s ONNX operator support list")
            continue
        if target == "10.3" and op in ADDED_AFTER_10_3:
            err(f"added to the parser in TensorRT {ADDED_AFTER_10_3[op]}, not available in {label}")
        data = n.input[0] if n.input else None
        t = _TYPE.get(types.get(data, -1)) if data else None
        if op == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            for tt in (t, _TYPE.get(to)):
                if tt is not None and tt not in SUPPORTED[op]:
                    err(f"Cast involving {tt} is not supported")
        elif op == "Gather":
            if t not in SUPPORTED[op]:
                err(f"data type {t} not supported" + (" (TensorRT takes INT8 only as the output of a "
                                                      "DequantizeLinear)" if t == "INT8" else ""))
            it = _TYPE.get(types.get(n.input[1], -1))
            if it not in ("INT32", "INT64"):
                err(f"indices of type {it}")
        elif t is not None and op not in ("DequantizeLinear", "Scan", "Loop", "If") and t not in SUPPORTED[op]:
            err(f"input type {t} is not supported (supported: {', '.join(SUPPORTED[op])})")
        for pos in CONST_OPERANDS.get(op, ()):
            if pos < len(n.input) and n.input[pos] and not is_const(n.input[pos]):
                err(f"operand {pos} ('{n.input[pos]}') must be a build-time constant")
        if op == "LayerNormalization" and len([o for o in n.output if o]) > 1:
            err("only the first output (Y) is supported")
        if op == "Loop":
            if not n.input or not n.input[0] or not is_const(n.input[0]):
                err("trip count is not a build-time constant (dynamic Loop length)")
        if op == "Scan":
            n_scan = next(a.i for a in n.attribute if a.name == "num_scan_inputs")
            for x in n.input[len(n.input) - n_scan:]:
                if any(d < 0 for d in shapes.get(x, [-1])):
                    err(f"scan input '{x}' has no static shape: the Scan length must be known at build time")
        if op == "DequantizeLinear":
            _lint_dq(n, t, types, shapes, inits, consumers, err)
        for o in n.output:
            if o and types.get(o) == TensorProto.INT64 and op not in ("Constant",) and not is_const(o):
                err(f"computes int64 tensor '{o}' at run time; keep int64 to token ids and constant shapes")
        if op != "Gather":
            for i in n.input:
                if i in graph_inputs and types.get(i) == TensorProto.INT64:
                    err(f"int64 graph input '{i}' used outside Gather indices", "warning")
        for sub in _subgraphs(n):
            sub_types, sub_shapes = _type_map(sub)
            _lint_graph(sub, target, label, {**types, **sub_types}, {**shapes, **sub_shapes}, consts, issues, top=False)


def _lint_dq(n, t, types, shapes, inits, consumers, err) -> None:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    x, scale = n.input[0], n.input[1]
    if t not in ("INT8", "INT4", "FP8"):
        err(f"quantized input of type {t} (supported: INT8, INT4, FP8)")
    if x not in inits:
        err("quantized weights must be an initializer (weight-only quantization)")
    if scale not in inits:
        err("scale must be an initializer (build-time constant)")
    if len(n.input) > 2 and n.input[2]:
        zp = inits.get(n.input[2])
        if zp is None or any(onnx.numpy_helper.to_array(zp).reshape(-1) != 0):
            err("zero point must be absent or all zeros (symmetric quantization only)")
    xs, ss = shapes.get(x, []), shapes.get(scale, [])
    block = attrs.get("block_size", 0)
    axis = attrs.get("axis", 1)
    if xs and axis < 0:
        axis += len(xs)
    if block:
        if len(xs) != 2:
            err(f"blocked quantization needs a 2-D weight, got rank {len(xs)}")
        if len(ss) != len(xs):
            err(f"blocked scale must have the weight's rank ({len(xs)}), got {len(ss)}")
        elif xs:
            blocked = [d for d in range(len(xs)) if ss[d] != xs[d]]
            if blocked != [axis]:
                err(f"exactly one blocked axis (axis={axis}) expected, scale {ss} vs weight {xs}")
            elif xs[axis] % block or ss[axis] * block != xs[axis]:
                err(f"block_size {block} does not tile axis {axis} of length {xs[axis]} (scale {ss})")
    else:
        if t == "INT4":
            err("INT4 weights need blocked quantization (block_size)")
        if len(ss) > 1:
            err(f"per-channel scale must be 1-D, got rank {len(ss)}")
        if len(ss) == 1 and xs and ss[0] != xs[axis]:
            err(f"per-channel scale length {ss[0]} does not match weight axis {axis} ({xs[axis]})")
    if t == "INT4" and xs and xs[-1] % 2:
        err(f"INT4 weight's last dimension ({xs[-1]}) must be even")
    for c in consumers.get(n.output[0], []):
        if c.op_type == "Gather" and c.input[0] == n.output[0]:
            _lint_dq_gather(c, axis, block, ss, err)
            continue
        if c.op_type not in ("Gemm", "MatMul", "Transpose"):
            err(f"dequantized weights feed {c.op_type} ('{c.name}'); weight-only quantization expects Gemm/MatMul",
                "warning")
            continue
        if c.op_type == "Transpose" or len(c.input) < 2 or c.input[1] != n.output[0] or len(xs) != 2:
            continue
        # The weight is the B operand: [K, N] for MatMul (and Gemm), [N, K] for Gemm(transB=1). Weight-only
        # INT4 blocks along K (the reduction axis); per-channel scales run along N (the output channels).
        trans_b = c.op_type == "Gemm" and any(a.name == "transB" and a.i for a in c.attribute)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if block and axis != k_axis:
            err(f"blocked along axis {axis} of the weight, not its reduction axis K (axis {k_axis} for "
                f"{c.op_type}{' transB' if trans_b else ''})")
        if not block and len(ss) == 1 and ss[0] != 1 and axis != n_axis:
            err(f"per-channel scales along axis {axis}, not the output channels (axis {n_axis} for "
                f"{c.op_type}{' transB' if trans_b else ''})")


def _lint_dq_gather(c, axis: int, block: int, ss, err) -> None:
    """A quantized lookup table, `DequantizeLinear(table) → Gather`: rows gathered along the axis the scales
    run on (one scale per row), so each gathered row is dequantized by its own scale."""
    g_axis = next((a.i for a in c.attribute if a.name == "axis"), 0)
    if block or len(ss) != 1:
        err(f"a dequantized table feeding Gather ('{c.name}') needs one scale per row (per-axis, 1-D scale)")
    elif axis != g_axis:
        err(f"scales along axis {axis} but Gather ('{c.name}') takes rows along axis {g_axis}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_rwkv.export.trt_lint", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="ONNX file")
    ap.add_argument("--target", choices=sorted(TARGETS), action="append", help="TensorRT version (repeatable)")
    a = ap.parse_args(argv)
    model = onnx.load(a.model, load_external_data=False)
    bad = 0
    for target in a.target or list(TARGETS):
        issues = lint_model(model, target)
        errors = [i for i in issues if i.level == "error"]
        bad += len(errors)
        print(f"{TARGETS[target][0]}: {len(errors)} error(s), "
              f"{sum(i.level == 'warning' for i in issues)} warning(s)")
        for i in issues:
            print(f"  {i}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
