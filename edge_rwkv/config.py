"""Model configuration, derived from tensor shapes alone."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    dim_ffn: int
    decay_lora: int
    aaa_lora: int
    mv_lora: int
    gate_lora: int
    deep_embed: int = 0  # RWKV-7a DeepEmbed rank D (per-token D×D tables in every FFN); 0 for plain x070

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.deep_embed:  # plain x070 configs (and the fingerprints hashed from them) stay as they were
            del d["deep_embed"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = cls.__dataclass_fields__
        missing = [k for k, f in fields.items() if k not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        return cls(**{k: int(d[k]) for k in fields if k in d})

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of one recurrent state: att_x + ffn_x (fp32) and the fp32 WKV matrices."""
        per_layer = 2 * self.n_embd * 4 + self.n_head * self.head_size * self.head_size * 4
        return batch * self.n_layer * per_layer
