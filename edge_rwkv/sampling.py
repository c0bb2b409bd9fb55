"""Turning logits into the next token: temperature, top-k, top-p and RWKV-style repetition penalties."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.85
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # subtracted once a token has appeared
    frequency_penalty: float = 0.0  # subtracted per (decayed) occurrence
    penalty_decay: float = 0.996  # occurrence counts fade each step, as in the reference chat demos
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ban_end_of_text: bool = False
    require_text: bool = False  # no stop (end of text, a stop string's tokens) before some visible text

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be ≥ 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be ≥ 0, got {self.top_k}"),
            (0 < self.penalty_decay <= 1, f"penalty_decay must be in (0, 1], got {self.penalty_decay}"),
            (self.max_tokens >= 0, f"max_tokens must be ≥ 0, got {self.max_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)
        object.__setattr__(self, "stop", tuple(self.stop))

    def with_(self, **kw) -> "SamplingParams":
        return replace(self, **kw)


@dataclass
class Sampler:
    """Per-sequence sampling state: its RNG and the decayed occurrence counts of emitted tokens."""

    params: SamplingParams
    occurrence: dict[int, float] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.generator is None:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.occurrence and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(list(self.occurrence), dtype=torch.long)
            counts = torch.tensor(list(self.occurrence.values()), dtype=logits.dtype)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + counts * p.frequency_penalty
        if p.ban_end_of_text:
            logits = logits.clone()
            logits[0] = float("-inf")
        return logits

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no repetition penalty: the token is an argmax (end-of-text masked when banned),
        which a batch engine can take for many rows at once on the device."""
        p = self.params
        return p.temperature == 0 and not (p.presence_penalty or p.frequency_penalty)

    def sample(self, logits: torch.Tensor) -> int:
        """logits [V] (any device) → token id; updates the occurrence counts."""
        token = sample_token(self.penalize(logits.float().cpu()), self.params, self.generator)
        self.observe(token)
        return token

    def observe(self, token: int) -> None:
        decay = self.params.penalty_decay
        for t in self.occurrence:
            self.occurrence[t] *= decay
        self.occurrence[token] = self.occurrence.get(token, 0.0) + 1.0


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_k and p.top_k < probs.numel():
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if p.top_p < 1:
        sorted_probs, _ = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # smallest set whose mass reaches top_p: keep every token at least as likely as the cut-off one
        cut = int(torch.searchsorted(cumulative, torch.tensor(p.top_p * float(cumulative[-1]))))
        cutoff = sorted_probs[min(cut, sorted_probs.numel() - 1)]
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
