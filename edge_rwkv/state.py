"""The recurrent state: everything a model remembers of a conversation, constant in size.

Per layer: att_x [B,C] and ffn_x [B,C] (last token's normed input, for token shift) and wkv [B,H,N,N].
All fp32, stacked over layers so a batch or a whole state moves as three tensors.

State file (format_version 2): safetensors with tensors `att_x` [L,B,C], `wkv` [L,B,H,N,N], `ffn_x` [L,B,C]
(fp32) and metadata key `edge_rwkv_state` holding JSON:
    {"format": "edge-rwkv-state", "format_version": 2, "fingerprint": model fingerprint,
     "n_layer", "batch", "n_embd", "n_head", "head_size", "tokens": tokens consumed,
     "sha256": hex digest of the header (this JSON without "sha256", keys sorted, compact) followed
               by the three tensors' bytes in the order att_x, wkv, ffn_x}
Version 1 files (the same, but the digest covers the tensors only) are still read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from . import safetensors_header
from .errors import StateError
from .fileio import atomic_write_bytes
from .safetensors_header import Header, HeaderError, HeaderNotJSON, HeaderTooLarge, HeaderTruncated
from .schema import Int, Obj, SchemaError, Str, load_json

STATE_FORMAT = "edge-rwkv-state"
STATE_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: the checksum covers the tensors only
_META_KEY = "edge_rwkv_state"
MAX_STATE_FILE = 8 << 30
MAX_HEADER = 1 << 20

# The fields every state-like file shares (the int8 state adds its own), with the ranges a real state has.
STATE_FIELDS = {
    "format": Str(64), "format_version": Int(), "fingerprint": Str(256),
    "n_layer": Int(1, 1 << 12), "batch": Int(1, 1 << 16), "n_embd": Int(1, 1 << 16), "n_head": Int(1, 1 << 16),
    "head_size": Int(1, 1 << 12), "tokens": Int(0, (1 << 63) - 1), "sha256": Str(64, pattern="[0-9a-f]{64}"),
}
STATE_SCHEMA = Obj(STATE_FIELDS)


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
        tensors = {k: getattr(self, k).detach().float().contiguous().cpu() for k in ("att_x", "wkv", "ffn_x")}
        meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "fingerprint": self.fingerprint,
                "tokens": int(self.tokens), **self.dims()}
        meta["sha256"] = _digest(tensors, meta)
        return safetensors_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})

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
        if _digest(tensors, meta if meta["format_version"] >= 2 else None) != meta["sha256"]:
            raise StateError(f"{name}: checksum mismatch — the state file is corrupt")
        if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
            raise StateError(f"{name}: state belongs to another model (fingerprint {meta['fingerprint'][:12]}…, "
                             f"this model is {expect_fingerprint[:12]}…)")
        st = cls(tensors["att_x"], tensors["wkv"], tensors["ffn_x"], meta["fingerprint"], int(meta["tokens"]))
        return st.to(device)


def is_state_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds an edge-rwkv state file (safetensors whose header carries our state metadata)."""
    try:
        return _META_KEY in safetensors_header.read(path, MAX_HEADER).metadata
    except (OSError, HeaderError):
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


def _digest(tensors: dict[str, torch.Tensor], meta: dict | None = None, order=("att_x", "wkv", "ffn_x")) -> str:
    """sha256 of the header fields (all but the digest; None: version 1, tensors only) and the tensors."""
    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                            separators=(",", ":")).encode())
    for k in order:
        t = tensors[k].detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_error(e: HeaderError, name: str, what: str) -> StateError:
    if isinstance(e, HeaderTruncated):
        return StateError(f"{name}: truncated state file ({e})")
    if isinstance(e, HeaderTooLarge):
        return StateError(f"{name}: state header is larger than any state's ({e})")
    if isinstance(e, HeaderNotJSON):
        return StateError(f"{name}: not an {what} (no valid metadata)")
    return StateError(f"{name}: {e}")


def read_header_meta(source: bytes | Path, name: str, meta_key: str, fmt: str, versions: tuple[int, ...],
                     schema: Obj, what: str = "edge-rwkv state file") -> tuple[Header, dict]:
    """(safetensors header, our metadata) of a state-like file — its bytes, or its path (then only the
    header is read): format and version first, then every field against `schema` (types and ranges),
    before any tensor is read."""
    try:
        header = (safetensors_header.read(source, MAX_HEADER) if isinstance(source, Path)
                  else safetensors_header.parse(source, max_header=MAX_HEADER))
    except HeaderError as e:
        raise _state_error(e, name, what) from None
    try:
        meta = load_json(header.metadata[meta_key])
    except (SchemaError, KeyError):
        raise StateError(f"{name}: not an {what} (no valid metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise StateError(f"{name}: not an {what}")
    if set(header.metadata) != {meta_key}:  # nothing in the header escapes the checks and the checksum
        raise StateError(f"{name}: unexpected metadata keys in a state file")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in versions:
        raise StateError(f"{name}: {what} format version {version!r} is not supported "
                         f"(this runtime reads {', '.join(map(str, versions))})")
    try:
        schema.check(meta, "")
    except SchemaError as e:
        raise StateError(f"{name}: state metadata is invalid: {e}") from None
    if meta["n_head"] * meta["head_size"] != meta["n_embd"]:
        raise StateError(f"{name}: state metadata is inconsistent (n_head × head_size ≠ n_embd)")
    return header, meta


def check_tensor_entries(header: Header, expected: dict[str, tuple[str, list[int]]], name: str) -> None:
    """Exactly the expected tensors, each of its dtype and shape (the header reader has already checked
    that each one's bytes lie inside the file and match its dtype and shape)."""
    extra = sorted(k for k in header.tensors if k not in expected)
    if extra:
        raise StateError(f"{name}: unexpected tensor(s) {extra[:3]} in a state file")
    for k, (dt, shape) in expected.items():
        info = header.tensors.get(k)
        if info is None or info["dtype"] != dt or info["shape"] != shape:
            raise StateError(f"{name}: tensor '{k}' is missing or has the wrong shape/dtype (expected {dt} {shape})")


def read_state_header(path: str | os.PathLike) -> dict:
    """A state file's metadata (format, version and fields checked; tensors and checksum not read)."""
    p = Path(path)
    return read_header_meta(p, str(p), _META_KEY, STATE_FORMAT, READS_VERSIONS, STATE_SCHEMA)[1]


def _read_state_meta(data: bytes, name: str) -> dict:
    header, meta = read_header_meta(data, name, _META_KEY, STATE_FORMAT, READS_VERSIONS, STATE_SCHEMA)
    L, B, C, H, N = (meta[k] for k in ("n_layer", "batch", "n_embd", "n_head", "head_size"))
    check_tensor_entries(header, {"att_x": ("F32", [L, B, C]), "ffn_x": ("F32", [L, B, C]),
                                  "wkv": ("F32", [L, B, H, N, N])}, name)
    return meta


def _read_state_tensors(data: bytes, name: str, meta: dict) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as e:  # safetensors raises its own error type for truncated buffers
        raise StateError(f"{name}: corrupt or truncated state file ({e})") from None
