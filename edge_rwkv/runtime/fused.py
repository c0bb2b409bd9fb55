"""One decode step (T=1) as a short, fixed sequence of launches: what the CUDA graph replays.

`RWKV7.forward` spends ~80 small torch ops per layer on a single token; here a layer is

    norm_mix (6 mixes) → r,k,v products → LoRA down (v,w,a batched | g) → tanh / sigmoid →
    LoRA up (v,w,a batched | g) → time_mix_wkv → output product → norm_mix (1 mix) →
    ffn key → relu² → ffn value

with the small-vector work in two fused Numba kernels (cuda_kernels/decode_step.py), the residual
add folded into the next norm, the state updated in place, and every intermediate in a buffer
allocated once. Same math as `RWKV7.forward`; tests hold them equal.

fp16 networks (the GPU default) go further at B ≤ 4: their matrices are packed for the segmented GEMV
(cuda_kernels/gemv_seg.py) and a layer is eight launches — norm_mix, r/k/v + LoRA-downs (tanh / sigmoid
applied), LoRA-ups, time_mix_wkv, output, norm_mix, ffn key + relu², ffn value — with the head one more.

Otherwise, preparing a network stacks the v/w/a LoRA matrices (zero-padded to one rank) and, for dense
weights, Wr/Wk/Wv into one [3, C, C] tensor; the layers' own tensors are rebound to views of the
stacks, so no weight is held twice and `RWKV7.forward` keeps working unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import RWKV7, DenseLinear, Layer
from ..state import State


@dataclass
class SegLayer:
    """A layer's fp16 weights laid out for the segmented GEMV (cuda_kernels/gemv_seg.py).

    buf1 rows: Wr, Wk, Wv, v1ᵀ, w1ᵀ, a1ᵀ, g1ᵀ (all K = C) — one launch reads the six token-shifted
    inputs and writes r | k | v | LoRA-down (tanh on w, sigmoid on g) into one row of n1 columns.
    buf2: v2ᵀ, w2ᵀ, a2ᵀ, g2ᵀ (C rows each, K = their rank) — one launch writes the v | w | a | g
    LoRA outputs ([B, 4C]). The output and FFN matrices keep their own tensors, one segment each."""
    buf1: torch.Tensor
    n1: int
    rkv: bool  # Wr, Wk, Wv are in buf1 (dense fp16); else they are quantized and run on their own
    rkv_prep: object  # quantized Wr, Wk, Wv stacked for one int8-activation GEMV (or None)
    downs: list  # (name, first row in buf1 = first column of stage 1's output, rank, activation)
    buf2: torch.Tensor
    ups: list  # (name, first element in buf2, rank)


@dataclass
class PackedLayer:
    mix: torch.Tensor  # [6, C] fp32 in slot order r k v w a g
    rkv: torch.Tensor | None  # [3, C, C] (Wr, Wk, Wv) when all three are dense
    lora1: torch.Tensor | None  # [3, C, R] v1, w1, a1 (zero-padded to R columns); None with seg
    lora2: torch.Tensor | None  # [3, R, C]
    v0: torch.Tensor  # [C] (zeros for layer 0, unused there)
    ffn_mix: torch.Tensor  # [1, C]
    seg: SegLayer | None = None


MIX_OF_SLOT = (0, 2, 3, 1, 4, 5)  # slot order r k v w a g, as indices into the model order r w k v a g
LORA_RANK_ALIGN = 16


def _is_dense(lin) -> bool:
    return isinstance(lin, DenseLinear)


def _stack_lora(mats: list[torch.Tensor | None], pad_dim: int, like: torch.Tensor) -> torch.Tensor:
    """Stack [C,r_i] (pad_dim=1) or [r_i,C] (pad_dim=0) matrices, zero-padded to one rank; None → zeros."""
    rank = max(m.shape[pad_dim] for m in mats if m is not None)
    rank = -(-rank // LORA_RANK_ALIGN) * LORA_RANK_ALIGN
    C = like.shape[1 - pad_dim]
    shape = (C, rank) if pad_dim == 1 else (rank, C)
    out = torch.zeros((len(mats),) + shape, dtype=like.dtype, device=like.device)
    for i, m in enumerate(mats):
        if m is None:
            continue
        if pad_dim == 1:
            out[i, :, :m.shape[1]] = m
        else:
            out[i, :m.shape[0], :] = m
    return out


def _dense16(lin) -> bool:
    return _is_dense(lin) and lin.weight.dtype == torch.float16


def seg_supported(net: RWKV7) -> bool:
    """fp16 LoRA matrices with widths the segmented GEMV takes (ranks and widths multiples of 8).
    Dense fp16 r/k/v/output/FFN matrices join the segments; quantized ones keep their own GEMVs."""
    from ..cuda_kernels._runtime import simulator
    from ..cuda_kernels.gemv_seg import ROWS_PER_BLOCK

    align = max(8, ROWS_PER_BLOCK)  # 16-byte loads of fp16; whole row blocks per segment
    if net.dtype != torch.float16 or net.cfg.n_embd % align or not (net.device.type == "cuda" or simulator()):
        return False
    for L in net.layers:
        if any(m is not None and (m.dtype != torch.float16 or m.shape[1] % align) for m in (L.v1, L.w1, L.a1, L.g1)):
            return False
        if L.ffn_key.out_features % align:
            return False
    return True


def pack_layer_seg(L: Layer) -> PackedLayer:
    """Copy a layer's fp16 r/k/v and LoRA matrices into the segmented-GEMV buffers; rebinds L's
    tensors to views of them (nothing held twice; the model's forward is unchanged)."""
    C = L.mix.shape[1]
    dev = L.mix.device
    acts = {"v": "none", "w": "tanh", "a": "none", "g": "sigmoid"}
    present = [n for n in "vwag" if getattr(L, n + "1") is not None]
    rkv = all(_dense16(x) for x in (L.receptance, L.key, L.value))
    n_rkv = 3 * C if rkv else 0
    n1 = n_rkv + sum(getattr(L, n + "1").shape[1] for n in present)
    buf1 = torch.empty(n1, C, dtype=torch.float16, device=dev)
    if rkv:
        for i, lin in enumerate((L.receptance, L.key, L.value)):
            buf1[i * C:(i + 1) * C] = lin.weight
            lin.weight = buf1[i * C:(i + 1) * C]
    downs, r0 = [], n_rkv
    for n in present:
        R = getattr(L, n + "1").shape[1]
        buf1[r0:r0 + R] = getattr(L, n + "1").t()
        setattr(L, n + "1", buf1[r0:r0 + R].t())
        downs.append((n, r0, R, acts[n]))
        r0 += R
    buf2 = torch.empty(sum(C * getattr(L, n + "2").shape[0] for n in present), dtype=torch.float16, device=dev)
    ups, off = [], 0
    for n in present:
        R = getattr(L, n + "2").shape[0]
        view = buf2[off:off + C * R].view(C, R)
        view.copy_(getattr(L, n + "2").t())
        setattr(L, n + "2", view.t())
        ups.append((n, off, R))
        off += C * R
    for lin in (L.output, L.ffn_key, L.ffn_value):
        if _dense16(lin):
            lin.weight = lin.weight.contiguous()
    v0 = L.v0 if L.v0 is not None else torch.zeros(C, dtype=torch.float32, device=dev)
    seg = SegLayer(buf1, n1, rkv, None if rkv else _stack_quantized_rkv(L), downs, buf2, ups)
    return PackedLayer(L.mix[list(MIX_OF_SLOT)].contiguous(), buf1[:3 * C].view(3, C, C) if rkv else None,
                       None, None, v0, L.ffn_mix.view(1, C), seg)


def _stack_quantized_rkv(L: Layer):
    """Quantized Wr, Wk, Wv of one format stacked into one weight (the three QuantLinears rebound
    to views of it), prepared for gemv_a8 with groups=3: one x-rounding launch and one GEMV instead
    of three of each. None where they differ or carry activation scales, or off CUDA."""
    from ..quant.linear import QuantLinear

    lins = (L.receptance, L.key, L.value)
    if not all(isinstance(x, QuantLinear) and x.input_scale is None and x.qweight.is_cuda for x in lins):
        return None
    if len({(x.spec.format, x.spec.group, x.in_features, x.out_features) for x in lins}) != 1:
        return None
    from ..cuda_kernels import gemv_int4, gemv_int8

    n = lins[0].out_features
    qw, sc = torch.cat([x.qweight for x in lins]), torch.cat([x.scale for x in lins])
    for i, x in enumerate(lins):
        x.qweight, x.scale = qw[i * n:(i + 1) * n], sc[i * n:(i + 1) * n]
    if lins[0].spec.format == "int4":
        return gemv_int4.PreparedInt4(qw, sc, lins[0].spec.group)
    return gemv_int8.PreparedInt8(qw, sc)


@dataclass
class A8Plan:
    """Which of a layer's quantized products take int8 activations rounded by the kernel that produces
    them (norm_mix for r/k/v and the FFN key, time_mix_wkv for the output): the rounding buffers they
    read, or None where the product runs otherwise. Saves a rounding launch per product."""
    rkv: object = None  # gemv_a8.RoundedX of 3B rows (mixes r, k, v)
    output: object = None  # RoundedX of B rows (the attention output)
    ffn_key: object = None  # RoundedX of B rows (the FFN mix)


@dataclass
class SegTables:
    """One layer's segment tables for a batch of B rows (inputs are [slot, B, C] buffers)."""
    stage1: object  # gemv_seg.SegTable
    stage2: tuple
    output: tuple | None  # None: a quantized matrix (its own GEMV)
    ffn_key: tuple | None
    ffn_value: tuple | None


def seg_tables(L: Layer, seg: SegLayer, B: int) -> SegTables:
    """Tables for B rows. Stage 1 writes r, k, v, then each LoRA-down as contiguous [B, width]
    blocks of one flat buffer; stage 2 writes the v, w, a, g LoRA outputs as [4, B, C]."""
    from ..cuda_kernels.gemv_seg import Segment, build_table

    C = L.mix.shape[1]
    slot = {"v": 2, "w": 3, "a": 4, "g": 5}
    s1 = [Segment(seg.buf1[i * C:(i + 1) * C], i * B * C, C, i * B * C) for i in range(3 if seg.rkv else 0)]
    down_at = {}
    for n, r0, R, act in seg.downs:
        down_at[n] = B * r0  # rows before it: 3C + earlier ranks, each B wide
        s1.append(Segment(seg.buf1[r0:r0 + R], slot[n] * B * C, C, down_at[n], act))
    R_of = {n: R for n, _, R, _ in seg.downs}
    s2 = [Segment(seg.buf2[off:off + C * R].view(C, R), down_at[n], R_of[n], "vwag".index(n) * B * C)
          for n, off, R in seg.ups]

    def single(lin, act="none"):
        if not _dense16(lin):
            return None
        w = lin.weight
        return build_table(w, [Segment(w, 0, w.shape[1], 0, act)])

    return SegTables(build_table(seg.buf1, s1), build_table(seg.buf2, s2), single(L.output),
                     single(L.ffn_key, "relu2"), single(L.ffn_value))


def pack_layer(L: Layer) -> PackedLayer:
    """Stacked views for the fused step; rebinds L's tensors to views of the stacks (no copy kept)."""
    C = L.mix.shape[1]
    mix = L.mix[list(MIX_OF_SLOT)].contiguous()
    rkv = None
    lins = (L.receptance, L.key, L.value)
    if all(_is_dense(x) for x in lins) and len({x.weight.dtype for x in lins}) == 1:
        rkv = torch.stack([x.weight for x in lins])
        for i, x in enumerate(lins):
            x.weight = rkv[i]
    lora1 = _stack_lora([L.v1, L.w1, L.a1], 1, L.w1)
    lora2 = _stack_lora([L.v2, L.w2, L.a2], 0, L.w2)
    L.w1, L.a1 = lora1[1, :, :L.w1.shape[1]], lora1[2, :, :L.a1.shape[1]]
    L.w2, L.a2 = lora2[1, :L.w2.shape[0]], lora2[2, :L.a2.shape[0]]
    if L.v1 is not None:
        L.v1, L.v2 = lora1[0, :, :L.v1.shape[1]], lora2[0, :L.v2.shape[0]]
    v0 = L.v0 if L.v0 is not None else torch.zeros(C, dtype=torch.float32, device=L.mix.device)
    return PackedLayer(mix, rkv, lora1, lora2, v0, L.ffn_mix.view(1, C))


class FusedStep:
    """`step(tokens [B,1], state, live) -> logits [B,V]` for a fixed batch B.

    `state` (B rows) is updated in place for the rows where `live` [B] int32 is non-zero; the other
    rows are computed (static shapes) but their state is left as it was.

    fp16 networks at B ≤ gemv_seg.MAX_ROWS take the segmented GEMV: a dense layer is then 8 launches
    (norm_mix, stage 1, stage 2, time_mix_wkv, output, norm_mix, ffn key + relu², ffn value) instead
    of 15; a quantized one runs its LoRA that way and its matrices through the int8-activation GEMVs
    (Wr/Wk/Wv stacked). Larger batches use cuBLAS (bmm / matmul) over the same weight buffers. The
    logits returned on that path are a buffer the next call overwrites (the graph's static output).
    """

    def __init__(self, net: RWKV7, batch: int, packed: list[PackedLayer]):
        from ..cuda_kernels import decode_step

        self.k = decode_step
        self.net, self.batch = net, batch
        cfg, dev, dt = net.cfg, net.device, net.dtype
        B, C = batch, cfg.n_embd
        self.packed = packed
        acc = torch.float64 if dt == torch.float64 else torch.float32
        # the residual stream, in two buffers: each norm_mix reads one and writes x + dx to the other
        self.res = (torch.zeros(B, C, dtype=acc, device=dev), torch.zeros(B, C, dtype=acc, device=dev))
        self._cur = 0
        self.v_first = torch.zeros(B, C, dtype=acc, device=dev)
        self.xin = torch.zeros(6, B, C, dtype=dt, device=dev)
        self.att = torch.zeros(B, C, dtype=dt, device=dev)
        self.xk = torch.zeros(1, B, C, dtype=dt, device=dev)
        self.final_prev = torch.zeros(B, C, dtype=acc, device=dev)
        self.zero_mix = torch.zeros(1, C, dtype=torch.float32, device=dev)
        self.hn = torch.zeros(1, B, C, dtype=dt, device=dev)
        self.tables = None
        if self.packed[0].seg is not None:
            from ..cuda_kernels import gemv_seg

            if B <= gemv_seg.MAX_ROWS:
                self._init_seg(B, C, dev)
            else:
                self.lora = torch.zeros(3, B, C, dtype=dt, device=dev)

    def _init_seg(self, B: int, C: int, dev) -> None:
        from ..cuda_kernels.gemv_seg import ROWS_PER_BLOCK, Segment, build_table

        net = self.net
        self.out1 = torch.zeros(B * max(p.seg.n1 for p in self.packed), dtype=torch.float16, device=dev)
        self.out2 = torch.zeros(4, B, C, dtype=torch.float16, device=dev)
        self.rkv_out = torch.zeros(3, B, C, dtype=torch.float16, device=dev)  # stacked quantized r, k, v
        self.dx = torch.zeros(B, C, dtype=torch.float16, device=dev)
        self.h = torch.zeros(B, net.layers[0].ffn_key.out_features, dtype=torch.float16, device=dev)
        self.tables = [seg_tables(L, p.seg, B) for L, p in zip(net.layers, self.packed)]
        self.a8 = self._a8_plans(B, C, dev)
        # quantized r/k/v: their GEMV and the LoRA launches read the same norm_mix output and nothing of
        # each other, so the LoRA runs on a second stream beside the GEMV (a CUDA graph keeps the fork)
        self.side = torch.cuda.Stream(dev) if dev.type == "cuda" and any(a.rkv is not None for a in self.a8) else None
        head = net.head
        self.head_table = None
        if _is_dense(head) and head.weight.dtype == torch.float16 and head.weight.shape[0] % ROWS_PER_BLOCK == 0:
            head.weight = head.weight.contiguous()
            self.head_table = build_table(head.weight, [Segment(head.weight, 0, C, 0)])
            self.logits = torch.zeros(B, head.weight.shape[0], dtype=torch.float32, device=dev)

    def _a8_plans(self, B: int, C: int, dev) -> list[A8Plan]:
        """Per layer, the rounded-activation buffers of its int8-activation products (shared by all layers:
        each is written and read within one layer)."""
        from ..cuda_kernels.gemv_a8 import BLOCK, RoundedX, pairs_for

        if C % BLOCK:
            return [A8Plan() for _ in self.packed]
        bufs = {}

        def rounded(name: str, rows: int, prep):
            if prep is None:
                return None
            if name not in bufs:
                bufs[name] = RoundedX.empty(rows, C, False, dev)
            b = bufs[name]
            return RoundedX(b.xq, b.xs, b.xz, rows, C, pairs_for(prep))

        plans = []
        for L, p, t in zip(self.net.layers, self.packed, self.tables):
            rkv = p.seg.rkv_prep if not p.seg.rkv and p.seg.rkv_prep is not None and all(
                x.int8_activations for x in (L.receptance, L.key, L.value)) else None
            out = _a8_views(L.output, B) if t.output is None and L.output.in_features == C else None
            key = _a8_views(L.ffn_key, B) if t.ffn_key is None else None
            if self.net.cfg.head_size % BLOCK:
                out = None  # time_mix_wkv rounds a head's output by whole warps
            plans.append(A8Plan(rounded("rkv", 3 * B, rkv), rounded("att", B, out), rounded("ffn", B, key)))
        return plans

    def __call__(self, tokens: torch.Tensor, state: State, live: torch.Tensor) -> torch.Tensor:
        net, k, P = self.net, self.k, self.packed
        B = self.batch
        self._cur = 0
        self.res[0].copy_(net.emb[tokens.view(B)])
        dx = self.res[0]
        for i, (L, p) in enumerate(zip(net.layers, P)):
            rkv_rounded = self.a8[i].rkv if self.tables is not None else None
            self._norm_mix(dx, L.ln1, state.att_x[i], live, p.mix, self.xin, add=i > 0, rounded=rkv_rounded,
                           rounded_mixes=3)
            if self.tables is not None:
                dx = self._layer_seg(i, L, p, state, live)
                continue
            r, kk, v, lo, g = self._time_mix_inputs(L, p)
            k.time_mix_wkv(r, kk, v, lo, g, L.w0, L.a0, p.v0, L.k_k, L.k_a, L.r_k, L.ln_x[0], L.ln_x[1],
                           i == 0, self.v_first, state.wkv[i], live, self.att)
            dx = L.output(self.att)
            self._norm_mix(dx, L.ln2, state.ffn_x[i], live, p.ffn_mix, self.xk, add=True)
            h = torch.relu(L.ffn_key(self.xk[0]))
            dx = L.ffn_value(h * h)
        self._norm_mix(dx, net.ln_out, self.final_prev, live, self.zero_mix, self.hn, add=True)
        if self.tables is not None and self.head_table is not None:
            from ..cuda_kernels.gemv_seg import seg_gemv

            seg_gemv(net.head.weight, self.head_table, self.hn, self.logits, B)
            return self.logits
        return net.head(self.hn[0]).float()

    def _layer_seg(self, i: int, L: Layer, p: PackedLayer, state: State, live: torch.Tensor) -> torch.Tensor:
        """One layer through the segmented GEMV (after its first norm_mix); returns the FFN output."""
        from ..cuda_kernels.gemv_a8 import gemv_a8_rounded

        k, t, a8, C, B = self.k, self.tables[i], self.a8[i], L.mix.shape[1], self.batch
        if a8.rkv is not None:
            r, kk, v = self._rkv_beside_lora(p, t, a8)
        else:
            self._lora(p, t)
            if p.seg.rkv:
                r, kk, v = (self.out1[j * B * C:(j + 1) * B * C].view(B, C) for j in range(3))
            else:
                r, kk, v = L.receptance(self.xin[0]), L.key(self.xin[1]), L.value(self.xin[2])
        k.time_mix_wkv(r, kk, v, self.out2[:3], self.out2[3], L.w0, L.a0, p.v0, L.k_k, L.k_a, L.r_k,
                       L.ln_x[0], L.ln_x[1], i == 0, self.v_first, state.wkv[i], live, self.att, rounded=a8.output)
        if a8.output is not None:
            dx = gemv_a8_rounded(a8.output, _a8_views(L.output, B), self.dx)
        else:
            dx = self._product(L.output, t.output, self.att, self.dx)
        self._norm_mix(dx, L.ln2, state.ffn_x[i], live, p.ffn_mix, self.xk, add=True, rounded=a8.ffn_key,
                       rounded_mixes=1)
        if t.ffn_key is not None:
            h = self._product(L.ffn_key, t.ffn_key, self.xk, self.h)
        elif a8.ffn_key is not None:  # quantized: x rounded by the norm_mix above, relu² at the GEMV's store
            h = gemv_a8_rounded(a8.ffn_key, _a8_views(L.ffn_key, B), self.h, act="relu2")
        else:
            h = torch.relu(L.ffn_key(self.xk[0]))
            h = h * h
        return self._product(L.ffn_value, t.ffn_value, h, self.dx)

    def _rkv_beside_lora(self, p: PackedLayer, t: SegTables, a8: A8Plan):
        """Quantized r, k, v in one int8-activation GEMV (x rounded by the norm_mix before it), with the
        LoRA launches on the side stream meanwhile where there is one."""
        from ..cuda_kernels.gemv_a8 import gemv_a8_rounded

        if self.side is None:
            self._lora(p, t)
            return gemv_a8_rounded(a8.rkv, p.seg.rkv_prep, self.rkv_out, groups=3)
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self._lora(p, t)
        rkv = gemv_a8_rounded(a8.rkv, p.seg.rkv_prep, self.rkv_out, groups=3)
        main.wait_stream(self.side)
        return rkv

    def _lora(self, p: PackedLayer, t: SegTables) -> None:
        """Stage 1 (r/k/v when dense, the LoRA downs) and stage 2 (the LoRA ups) of the segmented GEMV."""
        from ..cuda_kernels.gemv_seg import seg_gemv

        seg_gemv(p.seg.buf1, t.stage1, self.xin, self.out1, self.batch)
        seg_gemv(p.seg.buf2, t.stage2, self.out1, self.out2, self.batch)

    def _norm_mix(self, dx, ln, prev, live, mix, out, add: bool, rounded=None, rounded_mixes: int = 0) -> None:
        """The residual add, LayerNorm and token-shift mixes (the first `rounded_mixes` also rounded to
        int8 into `rounded`); flips the residual buffer."""
        src, dst = self.res[self._cur], self.res[1 - self._cur]
        self.k.norm_mix(src, dst, dx, ln[0], ln[1], prev, live, mix, out, add=add, rounded=rounded,
                        rounded_mixes=rounded_mixes)
        self._cur = 1 - self._cur

    def _product(self, lin, table, x, out):
        """A dense fp16 matrix through the segmented GEMV (into `out`), else the linear itself."""
        if table is None:
            return lin(x.view(self.batch, -1))
        from ..cuda_kernels.gemv_seg import seg_gemv

        seg_gemv(lin.weight, table, x, out, self.batch)
        return out

    def _time_mix_inputs(self, L: Layer, p: PackedLayer):
        """r, k, v, the (v, w, a) LoRA outputs [3,B,C] and the gate, through cuBLAS."""
        xr, xk, xv, xw, xa, xg = self.xin
        if p.rkv is not None:
            r, kk, v = torch.bmm(self.xin[0:3], p.rkv.transpose(1, 2))
        else:
            r, kk, v = L.receptance(xr), L.key(xk), L.value(xv)
        if p.lora1 is not None:
            lo = torch.bmm(self.xin[2:5], p.lora1)  # [3,B,R]: v, w, a
            lo[1].tanh_()
            lo = torch.bmm(lo, p.lora2)  # [3,B,C]
        else:  # segmented-GEMV layout (ranks differ): one product each
            lo = self.lora
            if L.v1 is not None:
                torch.matmul(xv @ L.v1, L.v2, out=lo[0])
            torch.matmul(torch.tanh(xw @ L.w1), L.w2, out=lo[1])
            torch.matmul(xa @ L.a1, L.a2, out=lo[2])
        g = torch.sigmoid(xg @ L.g1) @ L.g2
        return r, kk, v, lo, g


def _a8_views(lin, rows: int):
    """A quantized linear's int8-activation GEMV views for `rows` rows, or None (see QuantLinear.a8_views)."""
    views = getattr(lin, "a8_views", None)
    return views(rows) if views is not None else None


def pack_layers(net: RWKV7) -> list[PackedLayer]:
    """The layers' weights laid out for FusedStep (once per model: the runner keeps the result)."""
    pack = pack_layer_seg if seg_supported(net) else pack_layer
    return [pack(L) for L in net.layers]


def fused_step_supported(net: RWKV7) -> str | None:
    """None when FusedStep can run this network here, else the reason."""
    from ..cuda_kernels._runtime import kernel_device_ok

    if not kernel_device_ok(net.ln_out[0]):  # a plain tensor (the embedding may be Int8Rows)
        return "tensors not on a device the Numba kernels run on"
    if net.cfg.head_size not in (4, 8, 16, 32, 64):
        return f"head size {net.cfg.head_size}"
    if net.dtype == torch.bfloat16:
        return "bf16 weights (Numba has no bf16 arrays)"
    if net.cfg.deep_embed:
        return "RWKV-7a DeepEmbed (the fused step covers plain x070)"
    return None
