"""Which tensors of an RWKV-7 checkpoint are quantized, and how: one predicate.

Quantized: the big matrices ``blocks.N.att.{receptance,key,value,output}.weight`` [C, C],
``blocks.N.ffn.key.weight`` [F, C], ``blocks.N.ffn.value.weight`` [C, F]; optionally
``head.weight`` [V, C] and ``emb.weight`` [V, C] (a lookup table: int8 at most, its per-row scale is
a per-token scale). Everything else (LoRA factors, mix / decay vectors, norms) stays fp16, and so,
by default, does ``blocks.0.att.output.weight`` (layer 0's output projection is the most sensitive).

An int4 request for a matrix whose K is not a multiple of the group falls back to int8 for that
tensor; the per-tensor spec lands in the artifact metadata, so ``info`` shows it, and it is logged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from edge_rwkv.errors import CheckpointError

from .formats import DEFAULT_INT4_GROUP, INT4_GROUPS, QuantSpec, int4_spec, int8_spec

log = logging.getLogger("edge_rwkv.quant")

_BIG = re.compile(r"^blocks\.(\d+)\.(att\.(receptance|key|value|output)|ffn\.(key|value))\.weight$")
POLICY_VERSION = 1


@dataclass(frozen=True)
class QuantPolicy:
    """The policy's settings, as recorded in the artifact metadata (``to_dict``), and its one predicate
    ``format_for``. bits: 16 (nothing quantized), 8 or 4; group: int4 group along K (32/64/128)."""

    bits: int = 8
    group: int = DEFAULT_INT4_GROUP
    quantize_head: bool = False
    quantize_embedding: bool = False
    keep_layer0_output: bool = True
    method: str = "rtn"  # rtn | awq | gptq (calibrate.METHODS)
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise CheckpointError(f"quantization bits must be 4, 8 or 16, got {self.bits!r}")
        if self.bits == 4 and self.group not in INT4_GROUPS:
            raise CheckpointError(f"int4 group must be one of {INT4_GROUPS}, got {self.group!r}")
        if self.method not in ("rtn", "awq", "gptq"):
            raise CheckpointError(f"unknown calibration method {self.method!r} (rtn, awq, gptq)")
        if self.version != POLICY_VERSION:
            raise CheckpointError(f"quantization policy version {self.version!r} not supported "
                                  f"(supported: {POLICY_VERSION})")

    def format_for(self, name: str, shape) -> QuantSpec | None:
        """The spec to store tensor ``name`` of ``shape`` with, or None to keep it in fp16."""
        if self.bits == 16 or len(tuple(shape)) != 2:
            return None
        if name == "emb.weight":
            return int8_spec() if self.quantize_embedding else None
        if name == "head.weight":
            if not self.quantize_head:
                return None
        else:
            m = _BIG.match(name)
            if m is None:
                return None
            if self.keep_layer0_output and m.group(1) == "0" and m.group(3) == "output":
                return None
        if self.bits == 8:
            return int8_spec()
        k = int(tuple(shape)[1])
        if k % self.group:
            log.warning("%s: K=%d is not a multiple of int4 group %d; stored as int8", name, k, self.group)
            return int8_spec()
        return int4_spec(self.group)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantPolicy":
        if not isinstance(d, Mapping):
            raise CheckpointError(f"quantization policy must be a JSON object, got {type(d).__name__}")
        fields = set(cls.__dataclass_fields__)
        extra = set(d) - fields
        if extra:
            raise CheckpointError(f"quantization policy has unknown keys {sorted(extra)}")
        return cls(**dict(d))
