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
        """logits [V] with this sequence's repetition penalties and end-of-text ban applied (a copy)."""
        return penalized_rows(logits[None], [self])[0]

    def sample(self, logits: torch.Tensor) -> int:
        """logits [V] (any device) → token id; updates the occurrence counts."""
        return sample_batch(logits.float().cpu()[None], [self])[0]

    def observe(self, token: int) -> None:
        decay = self.params.penalty_decay
        for t in self.occurrence:
            self.occurrence[t] *= decay
        self.occurrence[token] = self.occurrence.get(token, 0.0) + 1.0


def sample_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    if p.temperature == 0:
        return int(torch.argmax(logits))
    return sample_rows(logits[None], [p], [_uniform(generator)])[0]


def _uniform(generator: torch.Generator | None) -> float:
    """The one uniform draw a sampled token consumes (so batched and single sampling agree)."""
    return float(torch.rand((), generator=generator))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float]) -> list[int]:
    """Sample one token per row of logits [R,V] (any device; penalties already applied) at once.

    Per row: softmax(logits / temperature), keep the top_k most likely and the smallest top_p mass
    (every token at least as likely as the cut-off one), then invert the CDF at the row's uniform.
    Rows with temperature 0 take the argmax. One pass of batched ops, whatever R is.
    """
    R, V = logits.shape
    dev = logits.device
    x = logits.float()
    if all(q.temperature == 0 for q in params):  # greedy rows need no distribution (nor its sort)
        return x.argmax(-1).tolist()
    greedy = torch.tensor([q.temperature == 0 for q in params], device=dev)
    temps = torch.tensor([q.temperature or 1.0 for q in params], device=dev)
    probs = torch.softmax(x / temps[:, None], dim=-1)
    # a greedy row's top-k / top-p cannot change its argmax: leave them out of the batch's cuts
    ks = [q.top_k if q.temperature != 0 and 0 < q.top_k < V else 0 for q in params]
    if any(ks):
        top = torch.topk(probs, max(ks), dim=-1).values
        k_idx = torch.tensor([max(k, 1) - 1 for k in ks], device=dev)
        kth = top.gather(1, k_idx[:, None])
        kth = torch.where(torch.tensor(ks, device=dev)[:, None] > 0, kth, torch.zeros_like(kth))
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    top_p = torch.tensor([1.0 if q.temperature == 0 else q.top_p for q in params], device=dev, dtype=probs.dtype)
    if bool((top_p < 1).any()):
        cutoff = _top_p_cutoff(probs, top_p)
        cutoff = torch.where(top_p[:, None] < 1, cutoff, torch.zeros_like(cutoff))
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor(uniforms, device=dev, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True).clamp(max=V - 1)[:, 0]
    tokens = torch.where(greedy, x.argmax(-1), drawn)
    return tokens.tolist()


TOP_P_PREFIX = 1024  # most likely tokens sorted first; the whole vocabulary only if a row's mass lies beyond


def _top_p_cutoff(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R,1]: per row, the probability of the least likely token inside the smallest set of most
    likely tokens holding top_p of the row's mass. Sorting all 65,536 probabilities cost ~8 ms a
    token on a CPU — more than a GPU decode step; the top TOP_P_PREFIX, sorted, almost always hold
    the mass, and the full sort runs only for a row (with top_p < 1) whose mass reaches past them."""
    V = probs.shape[1]
    target = (top_p * probs.sum(-1))[:, None]
    sorted_probs = torch.topk(probs, min(V, TOP_P_PREFIX), dim=-1).values  # descending
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    reached = (cumulative[:, -1:] >= target) | (top_p[:, None] >= 1)
    if sorted_probs.shape[1] < V and not bool(reached.all()):
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        cumulative = torch.cumsum(sorted_probs, dim=-1)
    cut = torch.searchsorted(cumulative, target).clamp(max=sorted_probs.shape[1] - 1)
    return sorted_probs.gather(1, cut)


def penalized_rows(logits: torch.Tensor, samplers: list["Sampler"]) -> torch.Tensor:
    """logits [R,V] with each row's repetition penalties and end-of-text ban applied (a copy)."""
    rows, ids, amounts = [], [], []
    for r, smp in enumerate(samplers):
        p = smp.params
        if smp.occurrence and (p.presence_penalty or p.frequency_penalty):
            for t, c in smp.occurrence.items():
                rows.append(r), ids.append(t), amounts.append(p.presence_penalty + c * p.frequency_penalty)
    x = logits.float().clone()
    if rows:
        dev = x.device
        x.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                     -torch.tensor(amounts, device=dev, dtype=x.dtype), accumulate=True)
    banned = [r for r, smp in enumerate(samplers) if smp.params.ban_end_of_text]
    if banned:
        x[torch.tensor(banned, device=x.device), 0] = float("-inf")
    return x


def sample_batch(logits: torch.Tensor, samplers: list["Sampler"]) -> list[int]:
    """One token per row of logits [R,V] for R sequences, each with its own Sampler (settings,
    random generator, occurrence counts): the same draws as `Sampler.sample` row by row, in a few
    batched ops on the logits' device instead of R host round trips."""
    x = penalized_rows(logits, samplers)
    uniforms = [0.0 if smp.params.temperature == 0 else _uniform(smp.generator) for smp in samplers]
    tokens = sample_rows(x, [smp.params for smp in samplers], uniforms)
    for smp, t in zip(samplers, tokens):
        smp.observe(t)
    return tokens
