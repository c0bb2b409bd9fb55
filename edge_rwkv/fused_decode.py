"""One decode step (T=1) as a short, fixed sequence of launches: what the CUDA graph replays.

`RWKV7.forward` spends ~80 small torch ops per layer on a single token; here a layer is

    norm_mix (6 mixes) → r,k,v products → LoRA down (v,w,a batched | g) → tanh / sigmoid →
    LoRA up (v,w,a batched | g) → time_mix_wkv → output product → norm_mix (1 mix) →
    ffn key → relu² → ffn value

with the small-vector work in two fused Numba kernels (cuda_kernels/decode_step.py), the residual
add folded into the next norm, the state updated in place, and every intermediate in a buffer
allocated once. Same math as `RWKV7.forward`; tests hold them equal.

Preparing a network stacks the v/w/a LoRA matrices (zero-padded to one rank) and, for dense
weights, Wr/Wk/Wv into one [3, C, C] tensor; the layers' own tensors are rebound to views of the
stacks, so no weight is held twice and `RWKV7.forward` keeps working unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import RWKV7, DenseLinear, Layer
from .state import State


@dataclass
class PackedLayer:
    mix: torch.Tensor  # [6, C] fp32 in slot order r k v w a g
    rkv: torch.Tensor | None  # [3, C, C] (Wr, Wk, Wv) when all three are dense
    lora1: torch.Tensor  # [3, C, R] v1, w1, a1 (zero-padded to R columns)
    lora2: torch.Tensor  # [3, R, C]
    v0: torch.Tensor  # [C] (zeros for layer 0, unused there)
    ffn_mix: torch.Tensor  # [1, C]


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
    """

    def __init__(self, net: RWKV7, batch: int):
        from .cuda_kernels import decode_step

        self.k = decode_step
        self.net, self.batch = net, batch
        cfg, dev, dt = net.cfg, net.device, net.dtype
        B, C = batch, cfg.n_embd
        if not hasattr(net, "_packed"):
            net._packed = [pack_layer(L) for L in net.layers]
        self.packed = net._packed
        acc = torch.float64 if dt == torch.float64 else torch.float32
        self.x = torch.zeros(B, C, dtype=acc, device=dev)
        self.v_first = torch.zeros(B, C, dtype=acc, device=dev)
        self.xin = torch.zeros(6, B, C, dtype=dt, device=dev)
        self.att = torch.zeros(B, C, dtype=dt, device=dev)
        self.xk = torch.zeros(1, B, C, dtype=dt, device=dev)
        self.final_prev = torch.zeros(B, C, dtype=acc, device=dev)
        self.zero_mix = torch.zeros(1, C, dtype=torch.float32, device=dev)
        self.hn = torch.zeros(1, B, C, dtype=dt, device=dev)

    def __call__(self, tokens: torch.Tensor, state: State, live: torch.Tensor) -> torch.Tensor:
        net, k, P = self.net, self.k, self.packed
        B = self.batch
        self.x.copy_(net.emb[tokens.view(B)])
        dx = self.x
        for i, (L, p) in enumerate(zip(net.layers, P)):
            k.norm_mix(self.x, dx, L.ln1[0], L.ln1[1], state.att_x[i], live, p.mix, self.xin, add=i > 0)
            xr, xk, xv, _, _, xg = self.xin  # w, a go through the batched LoRA below
            if p.rkv is not None:
                r, kk, v = torch.bmm(self.xin[0:3], p.rkv.transpose(1, 2))
            else:
                r, kk, v = L.receptance(xr), L.key(xk), L.value(xv)
            lo = torch.bmm(self.xin[2:5], p.lora1)  # [3,B,R]: v, w, a
            lo[1].tanh_()
            lo = torch.bmm(lo, p.lora2)  # [3,B,C]
            g = torch.sigmoid(xg @ L.g1) @ L.g2
            k.time_mix_wkv(r, kk, v, lo, g, L.w0, L.a0, p.v0, L.k_k, L.k_a, L.r_k, L.ln_x[0], L.ln_x[1],
                           i == 0, self.v_first, state.wkv[i], live, self.att)
            dx = L.output(self.att)
            k.norm_mix(self.x, dx, L.ln2[0], L.ln2[1], state.ffn_x[i], live, p.ffn_mix, self.xk, add=True)
            h = torch.relu(L.ffn_key(self.xk[0]))
            dx = L.ffn_value(h * h)
        k.norm_mix(self.x, dx, net.ln_out[0], net.ln_out[1], self.final_prev, live, self.zero_mix, self.hn, add=True)
        return net.head(self.hn[0]).float()


def fused_step_supported(net: RWKV7) -> str | None:
    """None when FusedStep can run this network here, else the reason."""
    from .cuda_kernels._runtime import kernel_device_ok

    if not kernel_device_ok(net.emb):
        return "tensors not on a device the Numba kernels run on"
    if net.cfg.head_size not in (4, 8, 16, 32, 64):
        return f"head size {net.cfg.head_size}"
    if net.dtype == torch.bfloat16:
        return "bf16 weights (Numba has no bf16 arrays)"
    return None
