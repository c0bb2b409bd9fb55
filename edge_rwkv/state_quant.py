"""Optional int8 storage of the WKV state (for saving; the running state stays fp32).

The wkv part ([L,B,H,N,N] fp32, ~97% of a state) is stored as int8 with symmetric fp16 scales;
att_x / ffn_x (2·C per layer) stay fp32. Scale granularity:

  "head_row" (default): one scale per (layer, batch row, head, value row)   → scale [L,B,H,N]
  "row":                one scale per (layer, batch row, value row), shared by the heads → [L,B,N]

Quantizer: scale = fp16(absmax/127 · (1 + 2⁻¹⁰)) floored at 2⁻¹⁴ (so fp16 rounding never makes the
scale too small and nothing clips), q = clamp(round(x/scale), -127, 127). Every element then obeys
|x − q·scale| ≤ scale/2 (`error_bound`). absmax above 127·65504 cannot be represented and is refused.

Quantized state file (format_version 2): safetensors with `att_x` F32 [L,B,C], `ffn_x` F32 [L,B,C],
`wkv_q` I8 [L,B,H,N,N], `wkv_scale` F16 (shape by granularity), and metadata key
`edge_rwkv_qstate` holding JSON {"format": "edge-rwkv-qstate", "format_version": 1,
"quant": "int8", "granularity", "fingerprint", "n_layer", "batch", "n_embd", "n_head", "head_size",
"tokens", "sha256": digest of the header (this JSON without "sha256") and the four tensors' bytes in the
order att_x, ffn_x, wkv_q, wkv_scale}. Version 1 (the digest covers the tensors only) is still read.
Written atomically (fileio.atomic_write_bytes); read with every size, shape, dtype and the checksum
checked before use.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .errors import StateError
from .fileio import atomic_write_bytes
from .schema import Obj, Str
from .state import STATE_FIELDS, State, _digest as state_digest, check_tensor_entries, read_header_meta, read_state_file

QSTATE_FORMAT = "edge-rwkv-qstate"
QSTATE_VERSION = 2
READS_VERSIONS = (1, 2)
_META_KEY = "edge_rwkv_qstate"
GRANULARITIES = ("head_row", "row")
SCALE_FLOOR = 2.0**-14
SCALE_MAX = 65504.0
QMAX = 127
_ORDER = ("att_x", "ffn_x", "wkv_q", "wkv_scale")
QSTATE_SCHEMA = Obj({**STATE_FIELDS, "quant": Str(16, choices=("int8",)), "granularity": Str(16, choices=GRANULARITIES)})


@dataclass
class QuantizedState:
    att_x: torch.Tensor  # [L,B,C] fp32
    ffn_x: torch.Tensor  # [L,B,C] fp32
    wkv_q: torch.Tensor  # [L,B,H,N,N] int8
    wkv_scale: torch.Tensor  # [L,B,H,N] ("head_row") or [L,B,N] ("row") fp16
    granularity: str = "head_row"
    fingerprint: str = ""
    tokens: int = 0

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in _ORDER)

    def dims(self) -> dict:
        L, B, H, N, _ = self.wkv_q.shape
        return {"n_layer": L, "batch": B, "n_embd": self.att_x.shape[2], "n_head": H, "head_size": N}

    def scales_full(self) -> torch.Tensor:
        """Scale of every wkv element's row, broadcastable to [L,B,H,N,1], fp32."""
        s = self.wkv_scale.float()
        if self.granularity == "row":
            s = s[:, :, None, :]
        return s[..., None]

    def error_bound(self) -> torch.Tensor:
        """Per-element bound on |wkv − dequantized wkv| (half a quantization step)."""
        return (self.scales_full() / 2).expand(self.wkv_q.shape)


def _check_granularity(g: str) -> None:
    if g not in GRANULARITIES:
        raise StateError(f"unknown state quantization granularity {g!r}; use one of {GRANULARITIES}")


def quantize_state(state: State, granularity: str = "head_row") -> QuantizedState:
    """int8 wkv with fp16 symmetric scales; att_x / ffn_x kept fp32. The input is not modified."""
    _check_granularity(granularity)
    wkv = state.wkv.detach().float()
    if not torch.isfinite(wkv).all():
        raise StateError("cannot quantize a state holding NaN or infinity")
    amax = wkv.abs().amax(dim=-1)  # [L,B,H,N]
    if granularity == "row":
        amax = amax.amax(dim=2)  # [L,B,N]
    if amax.numel() and float(amax.max()) > QMAX * SCALE_MAX:
        raise StateError(f"state values up to {float(amax.max()):.3g} exceed what int8 with fp16 scales can hold")
    scale16 = (amax / QMAX * (1 + 2.0**-10)).clamp(min=SCALE_FLOOR, max=SCALE_MAX).to(torch.float16)
    q = QuantizedState(state.att_x.detach().float().clone(), state.ffn_x.detach().float().clone(),
                       torch.empty(0), scale16, granularity, state.fingerprint, int(state.tokens))
    q.wkv_q = torch.round(wkv / q.scales_full()).clamp_(-QMAX, QMAX).to(torch.int8)
    return q


def dequantize_state(q: QuantizedState) -> State:
    wkv = q.wkv_q.float() * q.scales_full()
    return State(q.att_x.float().clone(), wkv, q.ffn_x.float().clone(), q.fingerprint, int(q.tokens))


def roundtrip(state: State, granularity: str = "head_row") -> State:
    """The state as it would come back from an int8 state file."""
    return dequantize_state(quantize_state(state, granularity))


# --------------------------------------------------------------------------- files

def _digest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    return state_digest(tensors, meta, _ORDER)


def to_bytes(q: QuantizedState) -> bytes:
    tensors = {k: getattr(q, k).detach().contiguous().cpu() for k in _ORDER}
    meta = {"format": QSTATE_FORMAT, "format_version": QSTATE_VERSION, "quant": "int8",
            "granularity": q.granularity, "fingerprint": q.fingerprint, "tokens": int(q.tokens), **q.dims()}
    meta["sha256"] = _digest(tensors, meta)
    return safetensors_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def save_quantized(state: State | QuantizedState, path: str | os.PathLike, granularity: str = "head_row") -> int:
    """Quantize (if needed) and write atomically; returns the file size in bytes."""
    q = state if isinstance(state, QuantizedState) else quantize_state(state, granularity)
    data = to_bytes(q)
    atomic_write_bytes(path, data)
    return len(data)


def load_quantized(path: str | os.PathLike, device="cpu", expect_fingerprint: str | None = None,
                   dequantize: bool = True) -> State | QuantizedState:
    """Read an int8 state file; returns an fp32 State (or the QuantizedState with dequantize=False)."""
    q = from_bytes(read_state_file(path), str(path), expect_fingerprint)
    if dequantize:
        return dequantize_state(q).to(device)
    for k in _ORDER:
        setattr(q, k, getattr(q, k).to(device))
    return q


def from_bytes(data: bytes, name: str = "<bytes>", expect_fingerprint: str | None = None) -> QuantizedState:
    meta = _read_meta(data, name)
    try:
        tensors = safetensors_load(data)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
        raise StateError(f"{name}: corrupt or truncated state file ({e})") from None
    if _digest(tensors, meta if meta["format_version"] >= 2 else None) != meta["sha256"]:
        raise StateError(f"{name}: checksum mismatch — the state file is corrupt")
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise StateError(f"{name}: state belongs to another model (fingerprint {meta['fingerprint'][:12]}…, "
                         f"this model is {expect_fingerprint[:12]}…)")
    sc = tensors["wkv_scale"].float()
    if not torch.isfinite(sc).all() or bool((sc <= 0).any()):
        raise StateError(f"{name}: state scales are not all finite and positive")
    if not (torch.isfinite(tensors["att_x"]).all() and torch.isfinite(tensors["ffn_x"]).all()):
        raise StateError(f"{name}: state holds NaN or infinity")
    return QuantizedState(tensors["att_x"], tensors["ffn_x"], tensors["wkv_q"], tensors["wkv_scale"],
                          meta["granularity"], meta["fingerprint"], int(meta["tokens"]))


def _read_meta(data: bytes, name: str) -> dict:
    header, meta = read_header_meta(data, name, _META_KEY, QSTATE_FORMAT, READS_VERSIONS, QSTATE_SCHEMA,
                                   "edge-rwkv int8 state file")
    L, B, C, H, N = (meta[k] for k in ("n_layer", "batch", "n_embd", "n_head", "head_size"))
    check_tensor_entries(header, {
        "att_x": ("F32", [L, B, C]), "ffn_x": ("F32", [L, B, C]), "wkv_q": ("I8", [L, B, H, N, N]),
        "wkv_scale": ("F16", [L, B, H, N] if meta["granularity"] == "head_row" else [L, B, N]),
    }, name)
    return meta


# --------------------------------------------------------------------------- measuring the effect

@torch.inference_mode()
def perplexity_with_roundtrip(net, tokens: list[int], every: int, quantize: bool = True,
                              granularity: str = "head_row", state: State | None = None) -> dict:
    """Next-token perplexity of `tokens` read `every` tokens at a time; with `quantize`, the state goes
    through int8 (quantize → dequantize) after each block, else it stays fp32 (same blocks, the baseline).

    Returns {"nll": mean negative log-likelihood, "ppl", "n": predictions, "logprobs": [n] tensor}."""
    if len(tokens) < 2:
        raise ValueError("need at least two tokens")
    if every < 1:
        raise ValueError("every must be ≥ 1")
    block = every
    cfg = net.cfg
    st = state or State.zeros(cfg.n_layer, 1, cfg.n_embd, cfg.n_head, cfg.head_size, net.device)
    lps = []
    for s in range(0, len(tokens) - 1, block):
        ids = torch.tensor([tokens[s:s + block]], dtype=torch.long, device=net.device)
        targets = torch.tensor(tokens[s + 1:s + 1 + block], dtype=torch.long, device=net.device)
        logits, st = net.forward(ids, st)
        lp = torch.log_softmax(logits[0, :len(targets)].double(), -1)
        lps.append(lp.gather(-1, targets[:, None])[:, 0].cpu())
        if quantize:
            st = roundtrip(st, granularity)
    lp = torch.cat(lps)
    nll = float(-lp.mean())
    return {"nll": nll, "ppl": math.exp(nll), "n": int(lp.numel()), "logprobs": lp}
