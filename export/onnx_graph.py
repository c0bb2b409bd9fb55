"""RWKV-7 as fixed-shape ONNX graphs, written node by node with `onnx.helper` (no tracing).

One graph per (batch B, tokens per call T): T=1 is the decode step, T>1 a prefill chunk.

    inputs   tokens       int64 [B, T]
             att_x.{i}    fp32  [B, C]        per layer i: token-shift input of the time mix
             wkv.{i}      fp32  [B, H, N, N]  WKV state (rows = values, columns = keys)
             ffn_x.{i}    fp32  [B, C]        token-shift input of the channel mix
    outputs  logits       fp32  [B, V]        last token of the call
             att_x_out.{i}, wkv_out.{i}, ffn_x_out.{i}   the next state, same shapes as the inputs

Precision follows edge_rwkv.model: matrices (linears, LoRA factors, embedding) in the weight dtype
(fp16 or fp32); residual stream, norms, gates, decay and state in fp32, with explicit Casts at every
boundary. `v_first` (layer 0's value) stays inside the graph. ln0 is folded into the embedding table.

The WKV recurrence is a model-local function `rwkv7.wkv7` (see `wkv_function`): its body is plain
ONNX unrolled over the graph's fixed T, so onnxruntime runs it and a TensorRT plugin of the same name
can take its place. Quantized weights enter as `DequantizeLinear` (int8 per output channel, axis 0;
int4 blocked along K, opset 21) feeding `Gemm(transB=1)`.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_rwkv.model import GROUP_NORM_EPS, LN_EPS, layer_norm

from .source import ExportSource, StoredQuant

OPSET = 21
IR_VERSION = 10
WKV_DOMAIN = "rwkv7"
WKV_NAME = "wkv7"
WKV_DOMAIN_VERSION = 1
DECAY_SCALE = math.exp(-0.5)

WEIGHT_DTYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}
_NP = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}
_TORCH = {TensorProto.FLOAT16: torch.float16, TensorProto.FLOAT: torch.float32}


def state_names(n_layer: int) -> tuple[list[str], list[str]]:
    """(state input names, state output names) in a fixed order: per layer att_x, wkv, ffn_x."""
    ins, outs = [], []
    for i in range(n_layer):
        for part in ("att_x", "wkv", "ffn_x"):
            ins.append(f"{part}.{i}")
            outs.append(f"{part}_out.{i}")
    return ins, outs


# --------------------------------------------------------------------------- the WKV function

def wkv_function(T: int) -> onnx.FunctionProto:
    """`rwkv7.wkv7(r, w, k, v, a, b, state) -> (y, state_out)`, unrolled over T steps.

    r, w, k, v, a, b: fp32 [B, T, H, N]; state fp32 [B, H, N, N]; y fp32 [B, T, H, N].
    Per head:  S ← S·diag(d) + (S·a) bᵀ + v kᵀ,  y = S r,  d = exp(-e^-0.5 · sigmoid(w)).
    """
    nodes = []

    def n(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    f32 = TensorProto.FLOAT
    # Explicit fp32: a plugin implementing this function receives fp32 whatever the weight dtype.
    r, w, k, v, a, b, s = (n("Cast", [x], [f"{x}_f32"], to=f32) for x in ("r", "w", "k", "v", "a", "b", "state"))
    n("Constant", [], ["neg_decay_scale"], value=numpy_helper.from_array(np.array(-DECAY_SCALE, np.float32)))
    sw = n("Sigmoid", [w], ["w_sig"])
    d = n("Exp", [n("Mul", [sw, "neg_decay_scale"], ["w_log"])], ["decay"])
    # Columns [B,H,N,T] (split on the last axis → [B,H,N,1]) and rows [B,H,T,N] (→ [B,H,1,N]).
    cols, rows = {}, {}
    for name, x, as_col in (("r", r, True), ("a", a, True), ("v", v, True),
                            ("d", d, False), ("b", b, False), ("k", k, False)):
        perm = [0, 2, 3, 1] if as_col else [0, 2, 1, 3]
        xt = n("Transpose", [x], [f"{name}_t"], perm=perm)
        axis = 3 if as_col else 2
        if T == 1:
            parts = [xt]
        else:
            parts = [f"{name}_{t}" for t in range(T)]
            nodes.append(helper.make_node("Split", [xt], parts, axis=axis, num_outputs=T))
        (cols if as_col else rows)[name] = parts
    ys = []
    for t in range(T):
        sa = n("MatMul", [s, cols["a"][t]], [f"sa_{t}"])
        s = n("Add", [n("Add", [n("Mul", [s, rows["d"][t]], [f"sd_{t}"]),
                                n("Mul", [sa, rows["b"][t]], [f"sab_{t}"])], [f"s1_{t}"]),
                      n("Mul", [cols["v"][t], rows["k"][t]], [f"vk_{t}"])], [f"S_{t}"])
        ys.append(n("MatMul", [s, cols["r"][t]], [f"y_{t}"]))
    y_cols = ys[0] if T == 1 else n("Concat", ys, ["y_cols"], axis=3)
    n("Transpose", [y_cols], ["y"], perm=[0, 3, 1, 2])
    n("Identity", [s], ["state_out"])
    return helper.make_function(
        WKV_DOMAIN, WKV_NAME, ["r", "w", "k", "v", "a", "b", "state"], ["y", "state_out"], nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"RWKV-7 WKV recurrence over T={T} tokens; fp32 state and decay exp(-e^-0.5*sigmoid(w)).")


# --------------------------------------------------------------------------- graph builder

class _Builder:
    def __init__(self, wdt: int):
        self.wdt = wdt
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.types: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        c = self._count.get(hint, 0)
        self._count[hint] = c + 1
        return hint if c == 0 else f"{hint}_{c}"

    def init(self, name: str, arr: np.ndarray | onnx.TensorProto) -> str:
        if name in self.inits:
            return name
        t = arr if isinstance(arr, onnx.TensorProto) else numpy_helper.from_array(np.ascontiguousarray(arr), name)
        t.name = name
        self.inits[name] = t
        self.types[name] = t.data_type
        return name

    def const_i64(self, values, hint="shape") -> str:
        arr = np.asarray(values, dtype=np.int64)
        name = f"const.{hint}." + "_".join(str(int(v)) for v in arr.reshape(-1))
        return self.init(name, arr)

    def const_f32(self, value: float, hint: str) -> str:
        return self.init(f"const.{hint}", np.array(value, dtype=np.float32))

    def node(self, op: str, ins: list[str], hint: str, out_type: int | None = None, out: str | None = None,
             domain: str = "", n_out: int = 1, **attrs):
        outs = [out or self.fresh(hint)] if n_out == 1 else [self.fresh(f"{hint}.{j}") for j in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=self.fresh(f"{hint}.{op}"), domain=domain, **attrs))
        t = out_type if out_type is not None else self.types.get(ins[0])
        for o in outs:
            if t is not None:
                self.types[o] = t
        return outs[0] if n_out == 1 else outs

    def cast(self, x: str, to: int, hint: str) -> str:
        if self.types.get(x) == to:
            return x
        return self.node("Cast", [x], hint, out_type=to, to=to)

    def reshape(self, x: str, shape, hint: str, out: str | None = None) -> str:
        return self.node("Reshape", [x, self.const_i64(shape)], hint, out=out)


class GraphSpec:
    """What one exported graph is: batch, tokens per call, weight dtype."""

    def __init__(self, batch: int, tokens: int, dtype: str):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unsupported export dtype {dtype!r}; use float16 or float32")
        if batch < 1 or tokens < 1:
            raise ValueError("batch and tokens per call must be positive")
        self.batch, self.tokens, self.dtype = int(batch), int(tokens), dtype

    @property
    def name(self) -> str:
        return "decode" if self.tokens == 1 else "prefill"


def build_graph(src: ExportSource, spec: GraphSpec, progress=None) -> onnx.ModelProto:
    """The ONNX model for `spec` from `src`'s weights (quantized ones taken as stored)."""
    cfg = src.config
    B, T, C, H, N, V = spec.batch, spec.tokens, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    M = B * T
    f32, wdt = TensorProto.FLOAT, WEIGHT_DTYPES[spec.dtype]
    g = _Builder(wdt)
    tdt = _TORCH[wdt]

    def vec(name: str) -> str:
        return g.init(name, src.tensors[name].detach().float().reshape(-1).numpy())

    def mat(name: str) -> str:
        """A dense matrix in the weight dtype (LoRA factors: used as x @ W)."""
        return g.init(name, src.tensors[name].detach().to(tdt).contiguous().numpy())

    def linear(x: str, name: str, hint: str) -> str:
        """x [M, K] → x @ Wᵀ [M, out] in the weight dtype (quantized weights dequantized in-graph)."""
        q = src.quant.get(name)
        if q is None:
            w = g.init(name, src.tensors[name].detach().to(tdt).contiguous().numpy())
            return g.node("Gemm", [g.cast(x, wdt, hint + ".in"), w], hint, transB=1)
        return quantized_linear(g, x, q, hint)

    def lora(x: str, a: str, bname: str, hint: str, inner: str | None = None) -> str:
        h = g.node("MatMul", [g.cast(x, wdt, hint + ".in"), mat(a)], hint + ".down")
        if inner:
            h = g.node(inner, [h], hint + "." + inner.lower())
        return g.cast(g.node("MatMul", [h, mat(bname)], hint + ".up"), f32, hint)

    def ln(x: str, wname: str, bname: str, hint: str, eps=LN_EPS) -> str:
        return g.node("LayerNormalization", [x, vec(wname), vec(bname)], hint, axis=-1, epsilon=eps)

    def token_shift(x: str, prev: str, state_out: str, hint: str) -> str:
        """Previous token's row for each row of x [M, C]; writes the last row of each sequence to state_out."""
        if T == 1:
            g.node("Identity", [x], hint + ".last", out=state_out)
            return prev
        x3 = g.reshape(x, [B, T, C], hint + ".btc")
        body = g.node("Slice", [x3, g.const_i64([0]), g.const_i64([T - 1]), g.const_i64([1])], hint + ".body")
        shifted = g.node("Concat", [g.reshape(prev, [B, 1, C], hint + ".prev"), body], hint + ".cat", axis=1)
        last = g.node("Slice", [x3, g.const_i64([T - 1]), g.const_i64([T]), g.const_i64([1])], hint + ".last3")
        g.reshape(last, [B, C], hint + ".last", out=state_out)
        return g.reshape(shifted, [M, C], hint + ".shifted")

    # ---- graph inputs
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [B, T])]
    outputs = [helper.make_tensor_value_info("logits", f32, [B, V])]
    g.types["tokens"] = TensorProto.INT64
    for i in range(cfg.n_layer):
        for part, shape in (("att_x", [B, C]), ("wkv", [B, H, N, N]), ("ffn_x", [B, C])):
            inputs.append(helper.make_tensor_value_info(f"{part}.{i}", f32, shape))
            outputs.append(helper.make_tensor_value_info(f"{part}_out.{i}", f32, shape))
            g.types[f"{part}.{i}"] = f32

    # ---- embedding with ln0 folded in (as the runtime does), in the weight dtype
    emb = src.dense_or_dequantized("emb.weight")
    ln0 = (src.tensors["blocks.0.ln0.weight"].float().reshape(-1), src.tensors["blocks.0.ln0.bias"].float().reshape(-1))
    table = layer_norm(emb.float(), ln0).to(tdt).contiguous().numpy()
    g.init("emb.folded_ln0", table)
    x = g.node("Gather", ["emb.folded_ln0", "tokens"], "emb.gather", out_type=wdt, axis=0)
    x = g.cast(g.reshape(x, [M, C], "emb.rows"), f32, "x0")

    v_first = None
    one = g.const_f32(1.0, "one")
    layers = range(cfg.n_layer)
    if progress is not None:
        layers = progress(layers)
    for i in layers:
        p, a = f"blocks.{i}.", f"blocks.{i}.att."
        L = f"L{i}"
        # ---------------- time mix
        h = ln(x, p + "ln1.weight", p + "ln1.bias", f"{L}.ln1")
        shifted = token_shift(h, f"att_x.{i}", f"att_x_out.{i}", f"{L}.att.shift")
        xx = g.node("Sub", [shifted, h], f"{L}.att.xx")
        mixed = {}
        for nm in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            mixed[nm] = g.node("Add", [h, g.node("Mul", [xx, vec(a + nm)], f"{L}.att.{nm}.d")], f"{L}.att.{nm}")
        r = g.cast(linear(mixed["x_r"], a + "receptance.weight", f"{L}.att.r"), f32, f"{L}.att.r.f32")
        k = g.cast(linear(mixed["x_k"], a + "key.weight", f"{L}.att.k"), f32, f"{L}.att.k.f32")
        v = g.cast(linear(mixed["x_v"], a + "value.weight", f"{L}.att.v"), f32, f"{L}.att.v.f32")
        w = g.node("Add", [vec(a + "w0"), lora(mixed["x_w"], a + "w1", a + "w2", f"{L}.att.wlora", "Tanh")], f"{L}.att.w")
        aa = g.node("Sigmoid", [g.node("Add", [vec(a + "a0"), lora(mixed["x_a"], a + "a1", a + "a2", f"{L}.att.alora")],
                                       f"{L}.att.a.logit")], f"{L}.att.a")
        gate = lora(mixed["x_g"], a + "g1", a + "g2", f"{L}.att.glora", "Sigmoid")
        # kk = normalize(k * k_k) per head (F.normalize: x / max(‖x‖₂, 1e-12))
        kkh = g.reshape(g.node("Mul", [k, vec(a + "k_k")], f"{L}.att.kk.raw"), [M, H, N], f"{L}.att.kk.heads")
        norm = g.node("Sqrt", [g.node("ReduceSum", [g.node("Mul", [kkh, kkh], f"{L}.att.kk.sq"), g.const_i64([2])],
                                      f"{L}.att.kk.ss", keepdims=1)], f"{L}.att.kk.norm")
        norm = g.node("Max", [norm, g.const_f32(1e-12, "normalize_eps")], f"{L}.att.kk.clamp")
        kk = g.reshape(g.node("Div", [kkh, norm], f"{L}.att.kk.unit"), [M, C], f"{L}.att.kk")
        # k = k * (1 + (a - 1) * k_a)
        k = g.node("Mul", [k, g.node("Add", [one, g.node("Mul", [g.node("Sub", [aa, one], f"{L}.att.am1"), vec(a + "k_a")],
                                                          f"{L}.att.am1ka")], f"{L}.att.kscale")], f"{L}.att.k.adj")
        if i == 0:
            v_first = v
        else:
            vg = g.node("Sigmoid", [g.node("Add", [vec(a + "v0"), lora(mixed["x_v"], a + "v1", a + "v2", f"{L}.att.vlora")],
                                          f"{L}.att.vgate.logit")], f"{L}.att.vgate")
            v = g.node("Add", [v, g.node("Mul", [g.node("Sub", [v_first, v], f"{L}.att.vdiff"), vg], f"{L}.att.vmix")],
                       f"{L}.att.v.mixed")
        heads4 = lambda t, nm: g.reshape(t, [B, T, H, N], f"{L}.wkv.{nm}")  # noqa: E731
        wkv_in = [heads4(r, "r"), heads4(w, "w"), heads4(k, "k"), heads4(v, "v"),
                  heads4(g.node("Neg", [kk], f"{L}.att.a_in"), "a"),
                  heads4(g.node("Mul", [kk, aa], f"{L}.att.b_in"), "b"), f"wkv.{i}"]
        y = g.fresh(f"{L}.wkv.y")
        g.nodes.append(helper.make_node(WKV_NAME, wkv_in, [y, f"wkv_out.{i}"], name=f"{L}.wkv", domain=WKV_DOMAIN))
        g.types[y] = g.types[f"wkv_out.{i}"] = f32
        # group norm per head (LayerNormalization over N, then the per-channel affine)
        if "const.ones_n" not in g.inits:
            g.init("const.ones_n", np.ones(N, np.float32)), g.init("const.zeros_n", np.zeros(N, np.float32))
        yn = g.node("LayerNormalization", [g.reshape(y, [M, H, N], f"{L}.gn.heads"), "const.ones_n", "const.zeros_n"],
                    f"{L}.gn", axis=-1, epsilon=GROUP_NORM_EPS)
        yn = g.node("Add", [g.node("Mul", [g.reshape(yn, [M, C], f"{L}.gn.rows"), vec(a + "ln_x.weight")], f"{L}.gn.w"),
                            vec(a + "ln_x.bias")], f"{L}.gn.out")
        # bonus: ((r * k * r_k).sum over N) * v, per head
        rk = g.init(a + "r_k", src.tensors[a + "r_k"].detach().float().numpy())
        rh, kh, vh = (g.reshape(t, [M, H, N], f"{L}.bonus.{nm}") for t, nm in ((r, "r"), (k, "k"), (v, "v")))
        s = g.node("ReduceSum", [g.node("Mul", [g.node("Mul", [rh, kh], f"{L}.bonus.rk"), rk], f"{L}.bonus.rkr"),
                                 g.const_i64([2])], f"{L}.bonus.sum", keepdims=1)
        bonus = g.reshape(g.node("Mul", [s, vh], f"{L}.bonus.v"), [M, C], f"{L}.bonus")
        yy = g.node("Mul", [g.node("Add", [yn, bonus], f"{L}.att.y"), gate], f"{L}.att.yg")
        x = g.node("Add", [x, g.cast(linear(yy, a + "output.weight", f"{L}.att.o"), f32, f"{L}.att.o.f32")], f"{L}.x.att")
        # ---------------- channel mix
        h = ln(x, p + "ln2.weight", p + "ln2.bias", f"{L}.ln2")
        shifted = token_shift(h, f"ffn_x.{i}", f"ffn_x_out.{i}", f"{L}.ffn.shift")
        xk = g.node("Add", [h, g.node("Mul", [g.node("Sub", [shifted, h], f"{L}.ffn.xx"), vec(p + "ffn.x_k")],
                                      f"{L}.ffn.xk.d")], f"{L}.ffn.xk")
        kr = g.node("Relu", [linear(xk, p + "ffn.key.weight", f"{L}.ffn.k")], f"{L}.ffn.relu")
        k2 = g.node("Mul", [kr, kr], f"{L}.ffn.sq")
        x = g.node("Add", [x, g.cast(linear(k2, p + "ffn.value.weight", f"{L}.ffn.v"), f32, f"{L}.ffn.v.f32")], f"{L}.x.ffn")

    # ---- head on the last token of each sequence
    if T > 1:
        last = g.node("Slice", [g.reshape(x, [B, T, C], "head.btc"), g.const_i64([T - 1]), g.const_i64([T]),
                                g.const_i64([1])], "head.last3")
        x = g.reshape(last, [B, C], "head.last")
    h = ln(x, "ln_out.weight", "ln_out.bias", "ln_out")
    logits = g.cast(linear(h, "head.weight", "head"), f32, "head.f32")
    assert g.nodes[-1].output[0] == logits  # the Cast (fp16) or the Gemm (fp32) that produced it
    g.nodes[-1].output[0] = "logits"

    graph = helper.make_graph(g.nodes, f"rwkv7_{spec.name}_b{B}_t{T}", inputs, outputs, list(g.inits.values()))
    model = helper.make_model(
        graph, functions=[wkv_function(T)],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(WKV_DOMAIN, WKV_DOMAIN_VERSION)],
        producer_name="edge-rwkv", doc_string=__doc__.split("\n\n")[0])
    model.ir_version = IR_VERSION
    return model


def quantized_linear(g: _Builder, x: str, q: StoredQuant, hint: str) -> str:
    """(x * input_scale) @ dequant(W)ᵀ with W's stored levels and scales (no re-quantization)."""
    wdt = g.wdt
    if q.input_scale is not None:
        x = g.node("Mul", [g.cast(x, TensorProto.FLOAT, hint + ".in32"),
                           g.init(q.name + ".input_scale", q.input_scale.astype(np.float32))], hint + ".insc")
    xin = g.cast(x, wdt, hint + ".in")
    # Scales in the compute dtype: fp16 as stored, or widened exactly to fp32 for an fp32 export.
    scale = g.init(q.name + ".scale", q.scale.astype(_NP[wdt]))
    out, k = q.shape
    if q.format == "int8":
        qw = g.init(q.name + ".qweight", q.qweight.astype(np.int8))
        wd = g.node("DequantizeLinear", [qw, scale], hint + ".dq", out_type=wdt, axis=0)
    else:
        t = helper.make_tensor(q.name + ".qweight", TensorProto.INT4, [out, k], q.qweight.tobytes(), raw=True)
        qw = g.init(q.name + ".qweight", t)
        wd = g.node("DequantizeLinear", [qw, scale], hint + ".dq", out_type=wdt, axis=1, block_size=q.group)
    return g.node("Gemm", [xin, wd], hint, out_type=wdt, transB=1)
