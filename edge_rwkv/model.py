"""RWKV-7 (x070) in torch: the reference math and the CPU path. Pure: no file I/O, no globals.
RWKV-7a (x070 plus DeepEmbed: a per-token scale on every FFN key, see DeepEmbed) runs here too.

Weights arrive under official names (checkpoint.py is the only place that knows other spellings).
Matrices run through `Linear` objects so that quantized formats swap in without touching the math.
Precision: matrices in the model dtype; norms, gates, decay, residual stream and state in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .state import State
from .wkv import wkv7_reference

LN_EPS = 1e-5
GROUP_NORM_EPS = 64e-5


class Linear(Protocol):
    """y = x @ Wᵀ for a stored W [out, in]; returns x's dtype."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Rows:
    """A lookup table [V, C] held as int8 rows with one fp32 scale per row; `table[idx]` gives the
    dequantized rows [*idx.shape, C] in `dtype`.

    For the embedding on a GPU: a quarter of its fp32 (half of its fp16) footprint — 0.27 GB instead of
    0.54 GB at V=65536, C=4096 — while a token reads one row either way. Indexing is plain torch (no host
    sync), so it is captured in a CUDA graph like the dense table it replaces.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Rows: values must be int8 [V, C], got {q.dtype} {tuple(q.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0], 1):
            raise ValueError(f"Int8Rows: scale must be fp32 [{q.shape[0]}, 1], got {scale.dtype} {tuple(scale.shape)}")
        if scale.device != q.device:
            raise ValueError(f"Int8Rows: values on {q.device} but scales on {scale.device}")
        self.q, self.scale, self.dtype = q, scale, dtype

    @classmethod
    def quantize(cls, table: torch.Tensor, dtype: torch.dtype) -> "Int8Rows":
        return cls(*quantize_rows(table), dtype)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.q[idx].float() * self.scale[idx]).to(self.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def row_bytes(self) -> int:
        """Bytes one lookup reads: a row of values and its scale."""
        return self.q.shape[1] * self.q.element_size() + self.scale.element_size()


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [V, C], fp32 scale [V, 1]): per-row absmax / 127, round to nearest; |error| ≤ scale / 2."""
    t = t.float()
    scale = t.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, no 0/0
    q = torch.round(t / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class DeepEmbed:
    """RWKV-7a's per-token FFN scale: k ← k · ((x s1) E[token] s2 + s0), with E[token] a D×D matrix.

    `table` [V, D·D] is s_emb with the ln0-normed embedding's projection (s_emb_x) folded in once, as the
    reference demo does; x is the FFN's normed input (before the token shift)."""

    table: torch.Tensor  # [V, D*D] in the model dtype (the big part: V·D² per layer)
    s1: torch.Tensor  # [C, D] fp32
    s2: torch.Tensor  # [D, F] fp32
    s0: torch.Tensor  # [F] fp32

    def scale(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x [B,T,C], tokens [B,T] → the FFN-key scale [B,T,F], in fp32 like the other gates (the rank D
        is small, so this costs little next to the FFN matrices)."""
        D = self.s1.shape[1]
        h = x.float() @ self.s1  # [B,T,D]
        e = self.table[tokens].view(*tokens.shape, D, D).float()
        h = (h.unsqueeze(-2) @ e).squeeze(-2)  # [B,T,D]
        return h @ self.s2 + self.s0


@dataclass
class Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    mix: torch.Tensor  # [6, C] fp32: x_r, x_w, x_k, x_v, x_a, x_g
    w0: torch.Tensor
    a0: torch.Tensor
    v0: torch.Tensor | None
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor  # [H, N]
    w1: torch.Tensor
    w2: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    g1: torch.Tensor
    g2: torch.Tensor
    ln_x: tuple[torch.Tensor, torch.Tensor]
    receptance: Linear
    key: Linear
    value: Linear
    output: Linear
    ffn_mix: torch.Tensor  # [C]
    ffn_key: Linear
    ffn_value: Linear
    deep: DeepEmbed | None = None  # RWKV-7a only


WKVFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class RWKV7:
    """The network. `forward` maps tokens [B,T] and a State to fp32 logits and the next State."""

    def __init__(self, cfg: ModelConfig, emb: torch.Tensor | Int8Rows, layers: list[Layer], ln_out, head: Linear,
                 dtype: torch.dtype, wkv: WKVFn = wkv7_reference):
        self.cfg, self.emb, self.layers, self.ln_out, self.head = cfg, emb, layers, ln_out, head
        self.dtype = dtype
        self.wkv = wkv

    @property
    def device(self) -> torch.device:
        return self.emb.device

    def forward(self, tokens: torch.Tensor, state: State, all_logits: bool = True):
        """tokens [B,T] int64 → logits [B,T,V] (or [B,V] for the last token) fp32, new State."""
        x = self.emb[tokens].float()
        att_x, wkv_s, ffn_x = [], [], []
        v_first = None
        for i in range(len(self.layers)):
            x, ax, s, fx, v_first = self.block(i, x, state.att_x[i], state.wkv[i], state.ffn_x[i], v_first, tokens)
            att_x.append(ax), wkv_s.append(s), ffn_x.append(fx)
        if not all_logits:
            x = x[:, -1]
        logits = self.logits(x)
        new_state = State(torch.stack(att_x), torch.stack(wkv_s), torch.stack(ffn_x), state.fingerprint)
        return logits, new_state

    def block(self, i: int, x, att_x, wkv, ffn_x, v_first, tokens):
        """Layer i on the residual stream x [B,T,C] from its state rows → (x, att_x, wkv, ffn_x, v_first).
        A unit of its own so training can checkpoint (recompute) activations layer by layer."""
        layer = self.layers[i]
        dx, ax, s, v_first = self.time_mix(layer, layer_norm(x, layer.ln1), att_x, wkv, v_first, i == 0)
        x = x + dx
        dx, fx = channel_mix(layer, layer_norm(x, layer.ln2), ffn_x, self.dtype, tokens)
        return x + dx, ax, s, fx, v_first

    def logits(self, x) -> torch.Tensor:
        """fp32 logits of final residual-stream rows x [..., C]."""
        return self.head(layer_norm(x, self.ln_out).to(self.dtype)).float()

    def time_mix(self, L: Layer, x, prev_x, S, v_first, first_layer: bool):
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        shifted = torch.cat([prev_x[:, None], x[:, :-1]], dim=1)
        xx = shifted - x
        xr, xw, xk, xv, xa, xg = (x + xx * L.mix[j] for j in range(6))
        dt = self.dtype
        r = L.receptance(xr.to(dt)).float()
        k = L.key(xk.to(dt)).float()
        v = L.value(xv.to(dt)).float()
        w = L.w0 + lora(xw, L.w1, L.w2, torch.tanh)
        a = torch.sigmoid(L.a0 + lora(xa, L.a1, L.a2))
        g = lora(xg, L.g1, L.g2, torch.sigmoid, outer=None)
        kk = F.normalize((k * L.k_k).view(B, T, H, N), dim=-1).view(B, T, C)
        k = k * (1 + (a - 1) * L.k_a)
        if first_layer:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(L.v0 + lora(xv, L.v1, L.v2))
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, S = self.wkv(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a), S)
        y = F.group_norm(y.reshape(B * T, C), H, L.ln_x[0], L.ln_x[1], eps=GROUP_NORM_EPS).view(B, T, C)
        bonus = (heads(r) * heads(k) * L.r_k).sum(-1, keepdim=True) * heads(v)
        y = y + bonus.reshape(B, T, C)
        out = L.output((y * g).to(dt)).float()
        return out, x[:, -1], S, v_first


def lora(x, w1, w2, inner=None, outer=None):
    h = x.to(w1.dtype) @ w1
    if inner is not None:
        h = inner(h)
    return (h @ w2).float()


def layer_norm(x, wb):
    return F.layer_norm(x.float(), (x.shape[-1],), wb[0], wb[1], eps=LN_EPS)


def channel_mix(L: Layer, x, prev_x, dtype, tokens=None):
    shifted = torch.cat([prev_x[:, None], x[:, :-1]], dim=1)
    xk = x + (shifted - x) * L.ffn_mix
    k = torch.relu(L.ffn_key(xk.to(dtype))) ** 2
    if L.deep is not None:
        k = (k.float() * L.deep.scale(x, tokens)).to(k.dtype)
    return L.ffn_value(k).float(), x[:, -1]


# --------------------------------------------------------------------------- building from tensors

EMB_CHUNK_ROWS = 8192  # rows folded at a time: the fp32 transient stays ≤ 128 MB at C=4096


def folded_embedding(emb: torch.Tensor, ln0, dtype: torch.dtype, device, int8: bool) -> torch.Tensor | Int8Rows:
    """layer_norm(emb, ln0) as the lookup table: dense in `dtype`, or Int8Rows (`int8`).

    ln0 applies to the embedding only, so it is folded in once (as the reference implementation does).
    The table is built chunk by chunk so the whole fp32 table (1 GiB at V=65536, C=4096) never sits on
    the device: on a Jetson that transient would come out of the same memory as the weights."""
    V, C = emb.shape
    if int8:
        q = torch.empty(V, C, dtype=torch.int8, device=device)
        scale = torch.empty(V, 1, dtype=torch.float32, device=device)
    else:
        table = torch.empty(V, C, dtype=dtype, device=device)
    for s in range(0, V, EMB_CHUNK_ROWS):
        e = min(V, s + EMB_CHUNK_ROWS)
        rows = layer_norm(emb[s:e].to(device), ln0)
        if int8:
            q[s:e], scale[s:e] = quantize_rows(rows)
        else:
            table[s:e] = rows
    return Int8Rows(q, scale, dtype) if int8 else table


def deep_embed_table(s_emb: torch.Tensor, s_emb_x: torch.Tensor, emb: torch.Tensor, ln0, dtype, device) -> torch.Tensor:
    """s_emb + layer_norm(emb, ln0) @ s_emb_xᵀ in `dtype`, chunk by chunk (fp32 transients stay small)."""
    V = s_emb.shape[0]
    out = torch.empty(V, s_emb.shape[1], dtype=dtype, device=device)
    proj = s_emb_x.to(device=device, dtype=torch.float32)
    for s in range(0, V, EMB_CHUNK_ROWS):
        e = min(V, s + EMB_CHUNK_ROWS)
        normed = layer_norm(emb[s:e].to(device), ln0)
        out[s:e] = (s_emb[s:e].to(device=device, dtype=torch.float32) + normed @ proj.T).to(dtype)
    return out


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device,
                make_linear: Callable[[str], Linear] | None = None, wkv: WKVFn = wkv7_reference,
                int8_embedding: bool = False, release_source: bool = False) -> RWKV7:
    """Assemble the network from official-name tensors. `make_linear(name)` may return quantized linears;
    `int8_embedding` keeps the (ln0-folded) embedding as Int8Rows instead of a dense `dtype` table.
    `release_source` removes each tensor from `tensors` once it is placed, so a tensor converted to another
    dtype or device never coexists with all the originals (unified memory: one DRAM for both)."""
    def take(name):
        return tensors.pop(name) if release_source else tensors[name]

    def vec(name):
        return take(name).reshape(-1).to(device=device, dtype=torch.float32)

    def mat(name):
        return take(name).to(device=device, dtype=dtype)

    def f32(name):
        return tensors[name].to(device=device, dtype=torch.float32)

    def dense(name):
        return DenseLinear(mat(name))

    linear = make_linear or dense
    ln0 = (vec("blocks.0.ln0.weight"), vec("blocks.0.ln0.bias"))
    source_emb = tensors["emb.weight"]  # DeepEmbed (7a) layers read it again after the table is folded
    emb = folded_embedding(take("emb.weight"), ln0, dtype, device, int8_embedding)
    layers = []
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        a = p + "att."
        has_v = i > 0
        layers.append(Layer(
            ln1=(vec(p + "ln1.weight"), vec(p + "ln1.bias")),
            ln2=(vec(p + "ln2.weight"), vec(p + "ln2.bias")),
            mix=torch.stack([vec(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]),
            w0=vec(a + "w0"), a0=vec(a + "a0"), v0=vec(a + "v0") if has_v else None,
            k_k=vec(a + "k_k"), k_a=vec(a + "k_a"),
            r_k=take(a + "r_k").to(device=device, dtype=torch.float32),
            w1=mat(a + "w1"), w2=mat(a + "w2"), a1=mat(a + "a1"), a2=mat(a + "a2"),
            v1=mat(a + "v1") if has_v else None, v2=mat(a + "v2") if has_v else None,
            g1=mat(a + "g1"), g2=mat(a + "g2"),
            ln_x=(vec(a + "ln_x.weight"), vec(a + "ln_x.bias")),
            receptance=linear(a + "receptance.weight"), key=linear(a + "key.weight"),
            value=linear(a + "value.weight"), output=linear(a + "output.weight"),
            ffn_mix=vec(p + "ffn.x_k"),
            ffn_key=linear(p + "ffn.key.weight"), ffn_value=linear(p + "ffn.value.weight"),
            deep=DeepEmbed(deep_embed_table(tensors[p + "ffn.s_emb.weight"], tensors[p + "ffn.s_emb_x.weight"],
                                            source_emb, ln0, dtype, device),
                           f32(p + "ffn.s1"), f32(p + "ffn.s2"), vec(p + "ffn.s0")) if cfg.deep_embed else None,
        ))
    return RWKV7(cfg, emb, layers, (vec("ln_out.weight"), vec("ln_out.bias")), linear("head.weight"), dtype, wkv)
