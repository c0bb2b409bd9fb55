"""The recurrent state: everything a model remembers of a conversation, constant in size.

Per layer: att_x [B,C] and ffn_x [B,C] (last token's normed input, for token shift) and wkv [B,H,N,N].
All fp32, stacked over layers so a batch or a whole state moves as three tensors.

State file (format_version 1): safetensors with tensors `att_x` [L,B,C], `wkv` [L,B,H,N,N], `ffn_x` [L,B,C]
(fp32) and metadata key `edge_rwkv_state` holding JSON:
    {"format": "edge-rwkv-state", "format_version": 1, "fingerprint": model fingerprint,
     "n_layer", "batch", "n_embd", "n_head", "head_size", "tokens": tokens consumed,
     "sha256": hex digest of the three tensors' bytes in the order att_x, wkv, ffn_x}
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StateError
from .fileio import atomic_write_bytes

STATE_FORMAT = "edge-rwkv-state"
STATE_VERSION = 1
_META_KEY = "edge_rwkv_state"
MAX_STATE_FILE = 8 << 30


@dataclass
class State:
    att_x: torch.Tensor  # [L, B, C] fp32
    wkv: torch.Tensor  # [L, B, H, N, N] fp32
    ffn_x: torch.Tensor  # [L, B, C] fp32
    fingerprint: str = ""
    tokens: int = 0  # tokens consumed since the state was new (informational)

    @classmethod
    def zeros(cls, n_layer, batch, n_embd, n_head, head_size, device="cpu", fingerprint=""):
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        return cls(z(n_layer, batch, n_embd), z(n_layer, batch, n_head, head_size, head_size),
                   z(n_layer, batch, n_embd), fingerprint)

    # -- shape facts
    @property
    def n_layer(self) -> int:
        return self.att_x.shape[0]

    @property
    def batch(self) -> int:
        return self.att_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.att_x.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_x, self.wkv, self.ffn_x))

    # -- copies and batch surgery
    def clone(self) -> "State":
        return State(self.att_x.clone(), self.wkv.clone(), self.ffn_x.clone(), self.fingerprint, self.tokens)

    def to(self, device) -> "State":
        return State(self.att_x.to(device), self.wkv.to(device), self.ffn_x.to(device), self.fingerprint, self.tokens)

    def select(self, index) -> "State":
        """Rows of the batch (int, list or slice), as a new State with a batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)  # no index tensor: nothing to copy to the device
        idx = torch.as_tensor(index, device=self.device) if not isinstance(index, slice) else index
        return State(self.att_x[:, idx].clone(), self.wkv[:, idx].clone(), self.ffn_x[:, idx].clone(),
                     self.fingerprint, self.tokens)

    @staticmethod
    def cat(states: list["State"]) -> "State":
        fps = {s.fingerprint for s in states}
        if len(fps) > 1:
            raise StateError("cannot batch states of different models")
        return State(torch.cat([s.att_x for s in states], 1), torch.cat([s.wkv for s in states], 1),
                     torch.cat([s.ffn_x for s in states], 1), fps.pop() if fps else "", max(s.tokens for s in states))

    def copy_(self, other: "State") -> "State":
        """In-place copy (keeps this state's storage: what CUDA-graph static buffers need)."""
        self.att_x.copy_(other.att_x), self.wkv.copy_(other.wkv), self.ffn_x.copy_(other.ffn_x)
        self.fingerprint, self.tokens = other.fingerprint, other.tokens
        return self

    def dims(self) -> dict:
        L, B, H, N, _ = self.wkv.shape
        return {"n_layer": L, "batch": B, "n_embd": self.att_x.shape[2], "n_head": H, "head_size": N}

    # -- files
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {k: getattr(self, k).detach().float().contiguous().cpu() for k in ("att_x", "wkv", "ffn_x")}
        meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "fingerprint": self.fingerprint,
                "tokens": int(self.tokens), "sha256": _digest(tensors), **self.dims()}
        return save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})

    def save(self, path: str | os.PathLike) -> None:
        """Atomic: the file is either the previous one or this state, complete (temp + fsync + rename)."""
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", expect_fingerprint: str | None = None) -> "State":
        return cls.from_bytes(read_state_file(path), str(path), device, expect_fingerprint)

    @classmethod
    def from_bytes(cls, data: bytes, name="<bytes>", device="cpu", expect_fingerprint: str | None = None) -> "State":
        meta = _read_state_meta(data, name)
        tensors = _read_state_tensors(data, name, meta)
        if _digest(tensors) != meta["sha256"]:
            raise StateError(f"{name}: checksum mismatch — the state file is corrupt")
        if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
            raise StateError(f"{name}: state belongs to another model (fingerprint {meta['fingerprint'][:12]}…, "
                             f"this model is {expect_fingerprint[:12]}…)")
        st = cls(tensors["att_x"], tensors["wkv"], tensors["ffn_x"], meta["fingerprint"], int(meta["tokens"]))
        return st.to(device)


def is_state_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds an edge-rwkv state file (safetensors whose header carries our state metadata)."""
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_STATE_FILE:
                return False
            header = json.loads(f.read(hlen))
        return isinstance(header, dict) and _META_KEY in (header.get("__metadata__") or {})
    except (OSError, ValueError, struct.error, TypeError, AttributeError):
        return False


def read_state_file(path: str | os.PathLike) -> bytes:
    """A state file's bytes, after checking it exists and is of a plausible size."""
    p = Path(path)
    if not p.is_file():
        raise StateError(f"{p}: no such state file")
    size = p.stat().st_size
    if size > MAX_STATE_FILE:
        raise StateError(f"{p}: {size} bytes is larger than any state file")
    return p.read_bytes()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in ("att_x", "wkv", "ffn_x"):
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def read_header_meta(data: bytes, name: str, meta_key: str, fmt: str, version: int,
                     what: str = "edge-rwkv state file") -> tuple[dict, dict]:
    """(safetensors header, our metadata) of a state-like file, checked for size, format and version."""
    if len(data) < 8:
        raise StateError(f"{name}: truncated state file ({len(data)} bytes)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise StateError(f"{name}: truncated state file (header claims {hlen} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8:8 + hlen])
        meta = json.loads(header["__metadata__"][meta_key])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StateError(f"{name}: not an {what} (no valid metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise StateError(f"{name}: not an {what}")
    if meta.get("format_version") != version:
        raise StateError(f"{name}: {what} format version {meta.get('format_version')!r} is not supported "
                         f"(this runtime reads {version})")
    meta["_header_len"] = hlen
    return header, meta


def _read_state_meta(data: bytes, name: str) -> dict:
    header, meta = read_header_meta(data, name, _META_KEY, STATE_FORMAT, STATE_VERSION)
    dims = ("n_layer", "batch", "n_embd", "n_head", "head_size", "tokens")
    if not all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in dims) or not isinstance(meta.get("sha256"), str):
        raise StateError(f"{name}: state metadata is incomplete or invalid")
    if meta["n_head"] * meta["head_size"] != meta["n_embd"]:
        raise StateError(f"{name}: state metadata is inconsistent (n_head × head_size ≠ n_embd)")
    expected = {
        "att_x": [meta["n_layer"], meta["batch"], meta["n_embd"]],
        "ffn_x": [meta["n_layer"], meta["batch"], meta["n_embd"]],
        "wkv": [meta["n_layer"], meta["batch"], meta["n_head"], meta["head_size"], meta["head_size"]],
    }
    for k, shape in expected.items():
        info = header.get(k)
        if not isinstance(info, dict) or info.get("dtype") != "F32" or info.get("shape") != shape:
            raise StateError(f"{name}: tensor '{k}' is missing or has the wrong shape/dtype (expected F32 {shape})")
    return meta


def _read_state_tensors(data: bytes, name: str, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error type for truncated buffers
        raise StateError(f"{name}: corrupt or truncated state file ({e})") from None
