"""What export reads: a model file's config, its dense tensors and its quantized weights as stored.

Quantized weights are taken straight from the artifact (no re-quantization). A quantized tensor `X`
(official name, listed in the metadata's `quant.tensors`) is stored as parts beside its name:

    quantized values  `X.qweight` (or `X` itself)  int8 [out, K]  |  int4: uint8 [out, K/2]
                                                    (low nibble = even k, high nibble = odd k,
                                                     two's complement, values in [-8, 7])
    scales            `X.scale`   fp16  int8: [out]  |  int4: [out, K/group]
    optional          `X.input_scale` fp16 [K]: the layer computes (x * input_scale) @ dequant(W)ᵀ

Spec keys accepted: "format" ("int8" | "int4") and the int4 group as "group" or "group_size".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_rwkv.checkpoint import check_keys_and_shapes, check_values, expected_shapes, read_tensors, sniff_format
from edge_rwkv.config import ModelConfig
from edge_rwkv.errors import CheckpointError
from edge_rwkv.fileio import sha256_file

QUANT_FORMATS = ("int8", "int4")


@dataclass
class StoredQuant:
    """One quantized weight exactly as stored: W ≈ q * scale (per row, or per row and K-group)."""

    name: str
    format: str  # "int8" | "int4"
    shape: tuple[int, int]  # logical [out, K]
    qweight: np.ndarray  # int8 [out, K] | uint8 [out, K/2]
    scale: np.ndarray  # fp16 [out] | [out, K/group]
    group: int | None = None
    input_scale: np.ndarray | None = None  # fp16 [K]

    def unpacked(self) -> np.ndarray:
        """Integer levels int8 [out, K] (int4 nibbles sign-extended)."""
        if self.format == "int8":
            return self.qweight
        p = self.qweight.astype(np.int16)
        lo, hi = p & 0xF, p >> 4
        q = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int8)
        q[:, 0::2] = np.where(lo >= 8, lo - 16, lo)
        q[:, 1::2] = np.where(hi >= 8, hi - 16, hi)
        return q

    def dequantize(self, fold_input_scale: bool = True) -> torch.Tensor:
        """Effective W [out, K] fp32 (exact products of the stored levels and fp16 scales)."""
        q = torch.from_numpy(self.unpacked().astype(np.float32))
        s = torch.from_numpy(self.scale.astype(np.float32))
        if self.format == "int8":
            w = q * s[:, None]
        else:
            w = q * torch.repeat_interleave(s, self.group, dim=1)
        if fold_input_scale and self.input_scale is not None:
            w = w * torch.from_numpy(self.input_scale.astype(np.float32))[None, :]
        return w


@dataclass
class ExportSource:
    path: str
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # dense tensors under official names
    quant: dict[str, StoredQuant] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def quant_formats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self.quant.values():
            key = q.format if q.format == "int8" else f"int4/g{q.group}"
            out[key] = out.get(key, 0) + 1
        return out

    def dense_or_dequantized(self, name: str) -> torch.Tensor:
        if name in self.quant:
            return self.quant[name].dequantize()
        return self.tensors[name]

    def stored_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.tensors.values())
        for q in self.quant.values():
            n += q.qweight.nbytes + q.scale.nbytes + (q.input_scale.nbytes if q.input_scale is not None else 0)
        return n


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _spec_group(spec: dict, name: str, path: str) -> int | None:
    g = spec.get("group", spec.get("group_size"))
    if g is None:
        return None
    if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
        raise CheckpointError(f"{path}: quantized tensor '{name}' has an invalid group {g!r}")
    return g


def resolve_quantized(name: str, spec, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                      path: str) -> tuple[StoredQuant, set[str]]:
    """Check one quantized weight's stored parts against its format; return it and the keys it used."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: quantization spec of '{name}' must be an object, got {spec!r}")
    fmt = spec.get("format")
    if fmt not in QUANT_FORMATS:
        raise CheckpointError(f"{path}: '{name}' uses quantization format {fmt!r}; export supports {list(QUANT_FORMATS)}")
    if len(shape) != 2:
        raise CheckpointError(f"{path}: quantized tensor '{name}' is not a matrix (shape {list(shape)})")
    out, k = int(shape[0]), int(shape[1])
    qkey = name + ".qweight" if name + ".qweight" in tensors else name
    if qkey not in tensors:
        raise CheckpointError(f"{path}: quantized tensor '{name}' has no stored values ('{name}.qweight')")
    if name + ".scale" not in tensors:
        raise CheckpointError(f"{path}: quantized tensor '{name}' has no scales ('{name}.scale')")
    used = {qkey, name + ".scale"}
    qw, sc = tensors[qkey], tensors[name + ".scale"]
    group = _spec_group(spec, name, path)
    if fmt == "int8":
        want_q, want_qdt, want_s = (out, k), torch.int8, (out,)
        group = None
    else:
        if group is None:
            raise CheckpointError(f"{path}: int4 tensor '{name}' has no group size in its spec")
        if k % group or k % 2:
            raise CheckpointError(f"{path}: int4 tensor '{name}': K={k} is not a multiple of group {group}")
        want_q, want_qdt, want_s = (out, k // 2), torch.uint8, (out, k // group)
    if qw.dtype != want_qdt or tuple(qw.shape) != want_q:
        raise CheckpointError(f"{path}: '{qkey}' is {str(qw.dtype).replace('torch.', '')} {list(qw.shape)}, "
                              f"expected {str(want_qdt).replace('torch.', '')} {list(want_q)} for {fmt}")
    if sc.dtype != torch.float16 or tuple(sc.shape) != want_s:
        raise CheckpointError(f"{path}: '{name}.scale' is {str(sc.dtype).replace('torch.', '')} {list(sc.shape)}, "
                              f"expected float16 {list(want_s)}")
    ins = None
    if name + ".input_scale" in tensors:
        t = tensors[name + ".input_scale"]
        if t.dtype != torch.float16 or tuple(t.shape) != (k,):
            raise CheckpointError(f"{path}: '{name}.input_scale' must be float16 [{k}], got "
                                  f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")
        ins = _np(t)
        used.add(name + ".input_scale")
    elif spec.get("input_scale"):
        raise CheckpointError(f"{path}: spec of '{name}' says input_scale but '{name}.input_scale' is missing")
    for part, arr in (("scale", sc), ("input_scale", tensors.get(name + ".input_scale"))):
        if arr is not None and not bool(torch.isfinite(arr.float()).all()):
            raise CheckpointError(f"{path}: '{name}.{part}' contains NaN/Inf")
    return StoredQuant(name, fmt, (out, k), _np(qw), _np(sc), group, ins), used


def _looks_like_safetensors(p: Path) -> bool:
    """An 8-byte little-endian header length that fits the file, followed by '{'.

    Checked before `sniff_format`, which takes any file whose first byte is 0x80 for a pickle — and a
    safetensors header length whose low byte is 0x80 (1 file in 256) starts with that byte too."""
    import struct

    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (hlen,) = struct.unpack("<Q", head[:8])
    return 2 <= hlen <= size - 8 and head[8:9] == b"{"


def _read_any(p: Path, progress: bool):
    """(tensors under canonical names, artifact metadata) — load_checkpoint's reading, robust to the sniff."""
    from edge_rwkv.checkpoint import _read_safetensors, canonical_name

    if p.is_file() and _looks_like_safetensors(p):
        raw, meta = _read_safetensors(p)
        tensors = {}
        for k, v in raw.items():
            name = canonical_name(k)
            if name in tensors:
                raise CheckpointError(f"{p}: tensor '{name}' appears twice (as '{k}' and another spelling)")
            tensors[name] = v
        return tensors, meta
    return read_tensors(p)


def read_source(path: str | os.PathLike, progress: bool = False) -> ExportSource:
    """Read and fully validate a model file for export (official .pth, safetensors or artifact)."""
    from edge_rwkv import artifact
    from edge_rwkv.checkpoint import derive_config

    p = Path(path)
    if not (p.is_file() and _looks_like_safetensors(p)):
        sniff_format(p)  # clear errors for missing files, folders and foreign formats
    tensors, meta = _read_any(p, progress)
    digest = sha256_file(p)
    specs = artifact.quantized_names(meta) if meta else {}
    if not meta:
        cfg = derive_config(tensors, str(p))
        check_keys_and_shapes({k: tuple(v.shape) for k, v in tensors.items()}, cfg, str(p))
        check_values(tensors, str(p), progress=progress)
        return ExportSource(str(p), cfg, tensors, {}, {}, digest)
    cfg = artifact.config_from_metadata(meta, str(p))
    if not specs:
        artifact.check_artifact(tensors, meta, cfg, str(p), progress=progress)
        return ExportSource(str(p), cfg, tensors, {}, meta, digest)
    want = expected_shapes(cfg)
    quant, used = {}, set()
    for name, spec in specs.items():
        if name not in want:
            raise CheckpointError(f"{p}: quantized tensor '{name}' is not part of the model")
        if name in tensors and name + ".qweight" in tensors:
            raise CheckpointError(f"{p}: tensor '{name}' is listed as quantized but is also stored dense")
        if name in tensors and tensors[name].is_floating_point():
            raise CheckpointError(f"{p}: tensor '{name}' is listed as quantized but is stored as floats")
        q, keys = resolve_quantized(name, spec, tensors, want[name], str(p))
        if q.shape != tuple(want[name]):
            raise CheckpointError(f"{p}: quantized tensor '{name}' has shape {list(q.shape)}, expected {list(want[name])}")
        quant[name], used = q, used | keys
    dense = {k: v for k, v in tensors.items() if k not in used}
    shapes = {k: tuple(v.shape) for k, v in dense.items()}
    shapes.update({k: tuple(want[k]) for k in quant})
    check_keys_and_shapes(shapes, cfg, str(p))
    check_values(dense, str(p), progress=progress)
    return ExportSource(str(p), cfg, dense, quant, meta, digest)
