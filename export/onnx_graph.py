"""RWKV-7 as fixed-shape ONNX graphs, written node by node with `onnx.helper` (no tracing).

One graph per (batch B, tokens per call T): T=1 is the decode step, T>1 a prefill chunk; a graph built
with `any_tokens` leaves T free (onnxruntime: one session then runs chunks and single tokens alike).

    inputs   tokens       int64 [B, T]
             att_x.{i}    fp32  [B, C]        per layer i: token-shift input of the time mix
             wkv.{i}      fp32  [B, H, N, N]  WKV state (rows = values, columns = keys)
             ffn_x.{i}    fp32  [B, C]        token-shift input of the channel mix
    outputs  logits       fp32  [B, V]        last token of the call
             att_x_out.{i}, wkv_out.{i}, ffn_x_out.{i}   the next state, same shapes as the inputs

Precision follows edge_rwkv.model: matrices (linears, LoRA factors, embedding) in the weight dtype
(fp16 or fp32); residual stream, norms, gates, decay and state in fp32, with explicit Casts at every
boundary. `v_first` (layer 0's value) stays inside the graph. ln0 is folded into a dense embedding
table; an int8 embedding stays int8 (for onnxruntime rows gathered, then scaled; for TensorRT the
table dequantized, then gathered), normalized in fp32.

The WKV recurrence is a model-local function `rwkv7.wkv7` (see `wkv_function`): its body is plain
ONNX (one step at T=1, a `Scan` over time at T>1, so the graph does not grow with the chunk), so
onnxruntime runs it and a TensorRT plugin of the same name can take its place. Quantized weights
enter as `DequantizeLinear` of the transposed stored levels Wᵀ [K, out] (int8 per output channel,
axis 1; int4 blocked along K, axis 0, opset 21) feeding `MatMul`: the weight-only pattern that
onnxruntime fuses into MatMulNBits and TensorRT builds as weight-only INT4/INT8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_rwkv.model import EMB_CHUNK_ROWS, GROUP_NORM_EPS, LN_EPS, layer_norm
from edge_rwkv.quant.formats import pack_int4_torch, unpack_int4_torch

from .source import ExportSource, StoredQuant
from .weights import INLINE_MAX_BYTES

OPSET = 21
IR_VERSION = 10
WKV_DOMAIN = "rwkv7"
WKV_NAME = "wkv7"
WKV_DOMAIN_VERSION = 1
DECAY_SCALE = math.exp(-0.5)
TRANSPOSE_ROWS = 4096  # rows of a quantized matrix unpacked at a time while transposing it (even)

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

def _wkv_step(n, s: str, r: str, d: str, k: str, v: str, a: str, b: str, axes3: str, axes2: str, sfx: str = ""):
    """One token for every head: vectors [B, H, N] → (new state [B, H, N, N], y [B, H, N, 1])."""
    col = lambda x, nm: n("Unsqueeze", [x, axes3], [f"{nm}_col{sfx}"])  # noqa: E731  [B,H,N,1]
    row = lambda x, nm: n("Unsqueeze", [x, axes2], [f"{nm}_row{sfx}"])  # noqa: E731  [B,H,1,N]
    sa = n("MatMul", [s, col(a, "a")], [f"sa{sfx}"])
    s1 = n("Add", [n("Mul", [s, row(d, "d")], [f"sd{sfx}"]), n("Mul", [sa, row(b, "b")], [f"sab{sfx}"])], [f"s1{sfx}"])
    s2 = n("Add", [s1, n("Mul", [col(v, "v"), row(k, "k")], [f"vk{sfx}"])], [f"S{sfx}"])
    return s2, n("MatMul", [s2, col(r, "r")], [f"y_col{sfx}"])


def _scan_body(axes_nodes) -> onnx.GraphProto:
    """Scan body over time: (S; r_t, d_t, k_t, v_t, a_t, b_t [B, H, N]) → (S'; y_t [B, H, N])."""
    nodes = list(axes_nodes)  # the Constant axes the step needs, defined inside the body

    def n(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    s_new, y_col = _wkv_step(n, "S_in", "r_t", "d_t", "k_t", "v_t", "a_t", "b_t", "axes3", "axes2", "_t")
    n("Identity", [s_new], ["S_out"])
    n("Squeeze", [y_col, "axes3"], ["y_t"])
    f32 = TensorProto.FLOAT
    return helper.make_graph(
        nodes, "wkv7_step",
        [helper.make_tensor_value_info(x, f32, None) for x in ("S_in", "r_t", "d_t", "k_t", "v_t", "a_t", "b_t")],
        [helper.make_tensor_value_info("S_out", f32, None), helper.make_tensor_value_info("y_t", f32, None)])


def wkv_function(T: int) -> onnx.FunctionProto:
    """`rwkv7.wkv7(r, w, k, v, a, b, state) -> (y, state_out)` over T tokens.

    r, w, k, v, a, b: fp32 [B, T, H, N]; state fp32 [B, H, N, N]; y fp32 [B, T, H, N].
    Per head:  S ← S·diag(d) + (S·a) bᵀ + v kᵀ,  y = S r,  d = exp(-e^-0.5 · sigmoid(w)).
    T = 1 is one step of plain ops; T > 1 (or T = None, any length) a `Scan` over the time axis whose body
    is that step, so the node count does not grow with T (onnxruntime's session creation and TensorRT's
    parse stay small).
    """
    nodes = []

    def n(op, ins, outs, **attrs):
        nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]

    f32 = TensorProto.FLOAT
    # Explicit fp32: a plugin implementing this function receives fp32 whatever the weight dtype.
    r, w, k, v, a, b, s = (n("Cast", [x], [f"{x}_f32"], to=f32) for x in ("r", "w", "k", "v", "a", "b", "state"))
    n("Constant", [], ["neg_decay_scale"], value=numpy_helper.from_array(np.array(-DECAY_SCALE, np.float32)))
    d = n("Exp", [n("Mul", [n("Sigmoid", [w], ["w_sig"]), "neg_decay_scale"], ["w_log"])], ["decay"])
    axes = [helper.make_node("Constant", [], [nm], value=numpy_helper.from_array(np.array([ax], np.int64)))
            for nm, ax in (("axes1", 1), ("axes2", 2), ("axes3", 3))]
    if T == 1:
        nodes.extend(axes)
        vecs = [n("Squeeze", [x, "axes1"], [f"{nm}_1"]) for nm, x in zip("rdkvab", (r, d, k, v, a, b))]
        s_new, y_col = _wkv_step(n, s, *vecs, "axes3", "axes2")
        n("Unsqueeze", [n("Squeeze", [y_col, "axes3"], ["y_vec"]), "axes1"], ["y"])
        n("Identity", [s_new], ["state_out"])
    else:
        seq = [n("Transpose", [x], [f"{nm}_seq"], perm=[1, 0, 2, 3]) for nm, x in zip("rdkvab", (r, d, k, v, a, b))]
        # the step needs axes 2 and 3 only (an unused constant in the body would draw onnxruntime warnings)
        n("Scan", [s, *seq], ["state_out", "y_seq"], body=_scan_body(axes[1:]), num_scan_inputs=6)
        n("Transpose", ["y_seq"], ["y"], perm=[1, 0, 2, 3])
    return helper.make_function(
        WKV_DOMAIN, WKV_NAME, ["r", "w", "k", "v", "a", "b", "state"], ["y", "state_out"], nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        doc_string=f"RWKV-7 WKV recurrence over T={T} tokens; fp32 state and decay exp(-e^-0.5*sigmoid(w)).")


# --------------------------------------------------------------------------- graph builder

@dataclass
class Packed:
    """Tensor bytes with their ONNX dims and type (INT4: two levels a byte, so not a numpy dtype)."""

    data: np.ndarray
    dims: list[int]
    data_type: int


class _Builder:
    def __init__(self, wdt: int, weights=None):
        self.wdt = wdt
        self.weights = weights  # WeightsFile: large initializers go to disk as they are made
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.types: dict[str, int] = {}
        self._count: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        c = self._count.get(hint, 0)
        self._count[hint] = c + 1
        return hint if c == 0 else f"{hint}_{c}"

    def init(self, name: str, arr) -> str:
        """An initializer from an array or a Packed; or from a callable making one, called only when the
        tensor is not yet in the weights file (the second graph does not rebuild what the first wrote).
        Large tensors go to the weights file straight from their buffer (no serialized copy)."""
        if name in self.inits:
            return name
        if callable(arr) and self.weights is not None and self.weights.has(name):
            t = self.weights.reference(name)
        else:
            arr = arr() if callable(arr) else arr
            packed = arr if isinstance(arr, Packed) else Packed(np.asarray(arr), list(np.shape(arr)),
                                                                 helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype))
            if self.weights is not None and packed.data.nbytes > INLINE_MAX_BYTES:
                t = self.weights.add(name, packed.data, packed.dims, packed.data_type)
            elif packed.data_type == TensorProto.INT4:
                t = helper.make_tensor(name, TensorProto.INT4, packed.dims, packed.data.tobytes(), raw=True)
            else:
                t = numpy_helper.from_array(np.ascontiguousarray(packed.data), name)
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
    """What one exported graph is: batch, tokens per call, weight dtype, the runtime it is laid out for
    ("onnxruntime" or "tensorrt": see `embedding`), and whether its token dimension is free (`any_tokens`:
    the graph takes [B, T] for any T ≥ 1, `tokens` being the size its runners feed per call)."""

    def __init__(self, batch: int, tokens: int, dtype: str, target: str = "onnxruntime", any_tokens: bool = False):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unsupported export dtype {dtype!r}; use float16 or float32")
        if batch < 1 or tokens < 1:
            raise ValueError("batch and tokens per call must be positive")
        if target not in ("onnxruntime", "tensorrt"):
            raise ValueError(f"unknown export target {target!r}; use onnxruntime or tensorrt")
        self.batch, self.tokens, self.dtype, self.target = int(batch), int(tokens), dtype, target
        self.any_tokens = bool(any_tokens)

    @property
    def name(self) -> str:
        return "decode" if self.tokens == 1 else "prefill"


def build_graph(src: ExportSource, spec: GraphSpec, progress=None, weights=None) -> onnx.ModelProto:
    """The ONNX model for `spec` from `src`'s weights (quantized ones taken as stored). With `weights`
    (a WeightsFile), large initializers are written there as they are made and the model only points at them."""
    cfg = src.config
    B, C, H, N, V = spec.batch, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    # T = None: any number of tokens per call (the `T` dimension is free; reshapes infer it with -1).
    T = None if spec.any_tokens else spec.tokens
    M, Tr = (-1, -1) if T is None else (B * T, T)
    f32, wdt = TensorProto.FLOAT, WEIGHT_DTYPES[spec.dtype]
    g = _Builder(wdt, weights)
    tdt = _TORCH[wdt]

    def vec(name: str) -> str:
        return g.init(name, lambda: src.tensors[name].detach().float().reshape(-1).numpy())

    def mat(name: str) -> str:
        """A dense matrix in the weight dtype (LoRA factors: used as x @ W)."""
        return g.init(name, lambda: src.tensors[name].detach().to(tdt).contiguous().numpy())

    def linear(x: str, name: str, hint: str) -> str:
        """x [M, K] → x @ Wᵀ [M, out] in the weight dtype (quantized weights dequantized in-graph)."""
        q = src.quant.get(name)
        if q is None:
            w = g.init(name, lambda: src.tensors[name].detach().to(tdt).contiguous().numpy())
            return g.node("Gemm", [g.cast(x, wdt, hint + ".in"), w], hint, transB=1)
        return quantized_linear(g, x, q, hint)

    def lora(x: str, a: str, bname: str, hint: str, inner: str | None = None) -> str:
        h = g.node("MatMul", [g.cast(x, wdt, hint + ".in"), mat(a)], hint + ".down")
        if inner:
            h = g.node(inner, [h], hint + "." + inner.lower())
        return g.cast(g.node("MatMul", [h, mat(bname)], hint + ".up"), f32, hint)

    def ln(x: str, wname: str, bname: str, hint: str, eps=LN_EPS) -> str:
        return g.node("LayerNormalization", [x, vec(wname), vec(bname)], hint, axis=-1, epsilon=eps)

    def last_token_range(T_) -> tuple[str, str]:
        """Slice starts/ends of the last token along the time axis."""
        return (g.const_i64([-1]), g.const_i64([np.iinfo(np.int64).max])) if T_ is None else \
            (g.const_i64([T_ - 1]), g.const_i64([T_]))

    def token_shift(x: str, prev: str, state_out: str, hint: str) -> str:
        """Previous token's row for each row of x [M, C]; writes the last row of each sequence to state_out."""
        if T == 1:
            g.node("Identity", [x], hint + ".last", out=state_out)
            return prev
        x3 = g.reshape(x, [B, Tr, C], hint + ".btc")
        body = g.node("Slice", [x3, g.const_i64([0]), g.const_i64([-1 if T is None else T - 1]), g.const_i64([1])],
                      hint + ".body")
        shifted = g.node("Concat", [g.reshape(prev, [B, 1, C], hint + ".prev"), body], hint + ".cat", axis=1)
        last = g.node("Slice", [x3, *last_token_range(T), g.const_i64([1])], hint + ".last3")
        g.reshape(last, [B, C], hint + ".last", out=state_out)
        return g.reshape(shifted, [M, C], hint + ".shifted")

    # ---- graph inputs
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [B, "T" if T is None else T])]
    outputs = [helper.make_tensor_value_info("logits", f32, [B, V])]
    g.types["tokens"] = TensorProto.INT64
    for i in range(cfg.n_layer):
        for part, shape in (("att_x", [B, C]), ("wkv", [B, H, N, N]), ("ffn_x", [B, C])):
            inputs.append(helper.make_tensor_value_info(f"{part}.{i}", f32, shape))
            outputs.append(helper.make_tensor_value_info(f"{part}_out.{i}", f32, shape))
            g.types[f"{part}.{i}"] = f32

    x = embedding(g, src, M, C, spec.target)

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
        heads4 = lambda t, nm: g.reshape(t, [B, Tr, H, N], f"{L}.wkv.{nm}")  # noqa: E731
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
        rk = g.init(a + "r_k", lambda: src.tensors[a + "r_k"].detach().float().numpy())
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
    if T != 1:
        last = g.node("Slice", [g.reshape(x, [B, Tr, C], "head.btc"), *last_token_range(T), g.const_i64([1])],
                      "head.last3")
        x = g.reshape(last, [B, C], "head.last")
    h = ln(x, "ln_out.weight", "ln_out.bias", "ln_out")
    logits = g.cast(linear(h, "head.weight", "head"), f32, "head.f32")
    assert g.nodes[-1].output[0] == logits  # the Cast (fp16) or the Gemm (fp32) that produced it
    g.nodes[-1].output[0] = "logits"

    graph = helper.make_graph(g.nodes, f"rwkv7_{spec.name}_b{B}_t{T or 'any'}", inputs, outputs, list(g.inits.values()))
    model = helper.make_model(
        graph, functions=[wkv_function(T)],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(WKV_DOMAIN, WKV_DOMAIN_VERSION)],
        producer_name="edge-rwkv", doc_string=__doc__.split("\n\n")[0])
    model.ir_version = IR_VERSION
    return model


def embedding(g: _Builder, src: ExportSource, M: int, C: int, target: str = "onnxruntime") -> str:
    """Rows of the token ids as fp32 [M, C], ln0 applied.

    A dense embedding is stored with ln0 folded in, in the weight dtype (as the runtime does). An int8
    embedding stays int8 with its stored per-row scales, in the layout its target runs well:
    - onnxruntime: the int8 rows and their fp32 scales are gathered, then widened and scaled (a Gather of
      a few rows per call, never a dequantization of the whole table);
    - tensorrt: `DequantizeLinear(int8 table [V, C], scale [V], axis 0) → Gather`, because TensorRT's ONNX
      parser takes INT8 only as a DequantizeLinear input. The scales are in the weight dtype (the stored
      fp16 scales; exact when widened for an fp32 export), so the dequantized rows are in the weight dtype
      like a dense embedding's, then ln0 runs in fp32.
    """
    wdt, f32 = g.wdt, TensorProto.FLOAT
    q = src.quant.get("emb.weight")
    if q is None:
        def folded():
            emb = src.tensors["emb.weight"]
            ln0 = (src.tensors["blocks.0.ln0.weight"].float().reshape(-1), src.tensors["blocks.0.ln0.bias"].float().reshape(-1))
            table = np.empty(tuple(emb.shape), _NP[wdt])
            for s0 in range(0, emb.shape[0], EMB_CHUNK_ROWS):  # the fp32 transient stays one chunk
                table[s0:s0 + EMB_CHUNK_ROWS] = layer_norm(emb[s0:s0 + EMB_CHUNK_ROWS].float(), ln0).to(_TORCH[wdt]).numpy()
            return table

        x = g.node("Gather", [g.init("emb.folded_ln0", folded), "tokens"], "emb.gather", out_type=wdt, axis=0)
        return g.cast(g.reshape(x, [M, C], "emb.rows"), f32, "x0")
    if q.format != "int8" or q.input_scale is not None:
        raise ValueError(f"emb.weight: only a plain int8 embedding can be exported, got {q.format}")
    table = g.init("emb.weight.qweight", lambda: np.asarray(q.qweight, np.int8))
    if target == "tensorrt":
        scale = g.init("emb.weight.scale_rows", lambda: q.scale.astype(_NP[wdt]).reshape(-1))
        deq = g.node("DequantizeLinear", [table, scale], "emb.dq", out_type=wdt, axis=0)
        rows = g.node("Gather", [deq, "tokens"], "emb.gather", out_type=wdt, axis=0)
        x = g.cast(g.reshape(rows, [M, C], "emb.rows"), f32, "emb.rows_f32")
    else:
        rows = g.node("Gather", [table, "tokens"], "emb.gather", out_type=TensorProto.INT8, axis=0)
        scales = g.node("Gather", [g.init("emb.weight.scale", lambda: q.scale.astype(np.float32).reshape(-1, 1)), "tokens"],
                        "emb.gather_scale", out_type=f32, axis=0)
        x = g.node("Mul", [g.cast(rows, f32, "emb.rows_f32"), scales], "emb.dequant")
        x = g.reshape(x, [M, C], "emb.rows")
    ln0 = lambda nm: g.init(f"blocks.0.ln0.{nm}", lambda: src.tensors[f"blocks.0.ln0.{nm}"].float().reshape(-1).numpy())  # noqa: E731
    return g.node("LayerNormalization", [x, ln0("weight"), ln0("bias")], "emb.ln0", axis=-1, epsilon=LN_EPS)


def transposed_levels(q: StoredQuant) -> Packed:
    """The stored integer levels as Wᵀ [K, out] (int8, or INT4 packed two per byte along `out`)."""
    out, k = q.shape
    if q.format == "int8":
        return Packed(torch.from_numpy(q.qweight).t().contiguous().numpy(), [k, out], TensorProto.INT8)
    packed = np.empty((k, out // 2), np.uint8)
    for r0 in range(0, out, TRANSPOSE_ROWS):  # a block of rows at a time: the unpacked transient stays small
        rows = unpack_int4_torch(torch.from_numpy(q.qweight[r0:r0 + TRANSPOSE_ROWS]))
        packed[:, r0 // 2:(r0 + rows.shape[0]) // 2] = pack_int4_torch(rows.t().contiguous()).numpy()
    return Packed(packed, [k, out], TensorProto.INT4)


def quantized_linear(g: _Builder, x: str, q: StoredQuant, hint: str) -> str:
    """(x * input_scale) @ dequant(W)ᵀ with W's stored levels and scales (no re-quantization).

    Laid out as `MatMul(x, DequantizeLinear(Wᵀ))` with Wᵀ [K, out]: int4 blocked along K (axis 0,
    block_size = group, scale [K/group, out]), int8 per output channel (axis 1, scale [out]). This is
    the weight-only pattern onnxruntime fuses into MatMulNBits (the weights stay packed; nothing is
    dequantized per call) and TensorRT's weight-only INT4/INT8 pattern (DQ on a constant → MatMul).
    """
    wdt = g.wdt
    if q.input_scale is not None:
        x = g.node("Mul", [g.cast(x, TensorProto.FLOAT, hint + ".in32"),
                           g.init(q.name + ".input_scale", q.input_scale.astype(np.float32))], hint + ".insc")
    xin = g.cast(x, wdt, hint + ".in")
    qw = g.init(q.name + ".qweight_t", lambda: transposed_levels(q))
    # Scales in the compute dtype: fp16 as stored, or widened exactly to fp32 for an fp32 export.
    if q.format == "int8":
        scale = g.init(q.name + ".scale", lambda: q.scale.astype(_NP[wdt]))
        wd = g.node("DequantizeLinear", [qw, scale], hint + ".dq", out_type=wdt, axis=1)
    else:
        scale = g.init(q.name + ".scale_t", lambda: np.ascontiguousarray(q.scale.T.astype(_NP[wdt])))
        wd = g.node("DequantizeLinear", [qw, scale], hint + ".dq", out_type=wdt, axis=0, block_size=q.group)
    return g.node("MatMul", [xin, wd], hint, out_type=wdt)
