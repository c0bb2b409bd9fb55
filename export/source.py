"""What export reads: a model file's config, its dense tensors and its quantized weights as stored.

Reading and validation are the runtime's own (`edge_rwkv.checkpoint.load_checkpoint`); quantized
weights come straight from the artifact in the layout quant/formats.py defines (no re-quantization).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_rwkv.artifact import load_quantized, quantized_names, quantized_parts
from edge_rwkv.checkpoint import load_checkpoint, source_sha256
from edge_rwkv.config import ModelConfig
from edge_rwkv.errors import CheckpointError
from edge_rwkv.quant.formats import dequantize_int4_torch, dequantize_int8_torch, unpack_int4_ref



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
        return self.qweight if self.format == "int8" else unpack_int4_ref(self.qweight)

    def dequantize(self, fold_input_scale: bool = True) -> torch.Tensor:
        """Effective W [out, K] fp32 (exact products of the stored levels and fp16 scales)."""
        ins = torch.from_numpy(self.input_scale) if fold_input_scale and self.input_scale is not None else None
        q, s = torch.from_numpy(self.qweight), torch.from_numpy(self.scale)
        if self.format == "int8":
            return dequantize_int8_torch(q, s, torch.float32, ins)
        return dequantize_int4_torch(q, s, self.group, torch.float32, ins)


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


def stored_quant(name: str, qw) -> StoredQuant:
    """A validated quant.formats.QuantizedWeight as export's numpy view of it."""
    ins = _np(qw.input_scale) if qw.input_scale is not None else None
    return StoredQuant(name, qw.spec.format, tuple(qw.shape), _np(qw.qweight), _np(qw.scale), qw.spec.group, ins)


def read_source(path: str | os.PathLike, progress: bool = False) -> ExportSource:
    """Read and fully validate a model file for export (official .pth, safetensors or artifact)."""
    ckpt = load_checkpoint(path, progress=progress)
    if ckpt.config.deep_embed:
        raise CheckpointError(f"{path}: RWKV-7a (DeepEmbed) is not exported: the exported graphs cover plain "
                              "RWKV-7 x070; run it with the torch runtime")
    quant, used = {}, set()
    for name, spec in quantized_names(ckpt.metadata).items():
        quant[name] = stored_quant(name, load_quantized(name, spec, ckpt.tensors, ckpt.path))
        used.update(quantized_parts(name, ckpt.tensors))
    dense = {k: v for k, v in ckpt.tensors.items() if k not in used}
    return ExportSource(ckpt.path, ckpt.config, dense, quant, ckpt.metadata, source_sha256(path))
