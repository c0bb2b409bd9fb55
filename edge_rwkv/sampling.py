"""Turning logits into the next token, batched on the logits' device: temperature, top-k, top-p,
RWKV-style repetition penalties with decay, end-of-text bans, and one random stream per sequence.

`RowSampler` holds the settings of R rows (the batch engine's slots) as device tensors and draws one
token for any subset of rows in a fixed sequence of batched ops: nothing is read back to the host
(the caller copies the token ids once per step for the whole batch). A row's random numbers are a
counter-based hash of (its seed, how many draws it made), so a sequence draws the same tokens for
the same seed whether it runs alone or among others, and on any device the hash runs on.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import torch

from .errors import InputError
from .tokenizer import END_OF_TEXT


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
            (self.seed is None or (isinstance(self.seed, int) and -(1 << 63) <= self.seed < (1 << 64)),
             f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)
        object.__setattr__(self, "stop", tuple(self.stop))

    def with_(self, **kw) -> "SamplingParams":
        return replace(self, **kw)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


# ----------------------------------------------------------------------------- random numbers
# splitmix64 (Steele, Lea & Flood 2014) over (seed, counter), in int64 arithmetic that wraps like
# uint64; logical right shifts are arithmetic shifts with the sign bits masked off.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed64(c: int) -> int:
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1) for each (seed, counter) pair of int64 tensors: a pure function of the pair."""
    z = seed + (counter + 1) * _signed64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed64(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0 ** -53


def seed_value(seed: int | None) -> int:
    """The int64 a row's stream starts from: the given seed (taken mod 2^64) or a fresh random one."""
    return _signed64(secrets.randbits(64) if seed is None else seed)


# ----------------------------------------------------------------------------- the batched draw
TOP_P_PREFIX = 1024  # on a CPU: most likely tokens sorted first; the whole vocabulary only if a row's mass lies beyond


def _top_p_cutoff(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R,1]: per row, the probability of the least likely token inside the smallest set of most
    likely tokens holding top_p of the row's mass.

    On a GPU the whole row is sorted (tens of µs, and no host round trip). On a CPU, sorting all
    65,536 probabilities costs ~8 ms: the top TOP_P_PREFIX, sorted, almost always hold the mass, and
    the full sort runs only for a row whose mass reaches past them (a check the CPU can afford)."""
    V = probs.shape[1]
    target = (top_p * probs.sum(-1))[:, None]
    if probs.device.type == "cpu" and V > TOP_P_PREFIX:
        sorted_probs = torch.topk(probs, TOP_P_PREFIX, dim=-1).values  # descending
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        if not bool(((cumulative[:, -1:] >= target) | (top_p[:, None] >= 1)).all()):
            sorted_probs = None
    else:
        sorted_probs = None
    if sorted_probs is None:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        cumulative = torch.cumsum(sorted_probs, dim=-1)
    cut = torch.searchsorted(cumulative, target).clamp(max=sorted_probs.shape[1] - 1)
    return sorted_probs.gather(1, cut)


def sample_rows(x: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                u: torch.Tensor, max_k: int | None = None, use_top_p: bool = True) -> torch.Tensor:
    """One token per row of logits x [R,V] (penalties already applied), as a device tensor [R].

    Per row: softmax(x / temperature), keep the top_k most likely and the smallest top_p mass (every
    token at least as likely as the cut-off one), then invert the CDF at the row's uniform u.
    Rows with temperature 0 take the argmax (their top-k / top-p cannot change it).
    `max_k` (the largest top_k of a row, 0 for none; None: read from top_k) and `use_top_p` = False
    let a caller that knows the rows' settings skip work (and a host read) no row needs."""
    V = x.shape[1]
    greedy = temperature == 0
    probs = torch.softmax(x / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None], dim=-1)
    k = torch.where(greedy | (top_k <= 0) | (top_k >= V), torch.zeros_like(top_k), top_k)
    max_k = int(k.max()) if max_k is None else min(max_k, V)
    if max_k > 0:
        top = torch.topk(probs, max_k, dim=-1).values
        kth = top.gather(1, (k.clamp(min=1, max=max_k) - 1)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.zeros_like(kth))
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if use_top_p:
        p = torch.where(greedy, torch.ones_like(top_p), top_p).to(probs.dtype)
        cutoff = torch.where(p[:, None] < 1, _top_p_cutoff(probs, p), torch.zeros(1, 1, device=x.device))
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).clamp(max=V - 1)[:, 0]
    return torch.where(greedy, x.argmax(-1), drawn)


class RowSampler:
    """Sampling settings and per-sequence state of `rows` rows, on `device`.

    `reset(row, params)` gives a row new settings (a new sequence: fresh counts and random stream);
    `draw(logits, rows, live)` samples one token for each listed row and advances those rows whose
    `live` entry is non-zero (a row that already ended keeps its counts and stream as they were).
    `visible` [V] bool marks tokens with visible text: rows with `require_text` cannot end (end of
    text, or a token of one of their stop strings) before they have drawn one.
    """

    def __init__(self, rows: int, vocab_size: int, device, visible: torch.Tensor | None = None,
                 stop_ids=None):
        self.rows, self.vocab_size = rows, vocab_size
        self.device = torch.device(device)
        dev = self.device
        self.params: list[SamplingParams | None] = [None] * rows
        self.temperature = torch.ones(rows, device=dev)
        self.top_p = torch.ones(rows, device=dev)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=dev)
        self.presence = torch.zeros(rows, device=dev)
        self.frequency = torch.zeros(rows, device=dev)
        self.decay = torch.ones(rows, device=dev)
        self.ban_eot = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.seed = torch.zeros(rows, dtype=torch.long, device=dev)
        self.counter = torch.zeros(rows, dtype=torch.long, device=dev)
        self.has_text = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.visible = visible.to(dev) if visible is not None else None
        self._stop_ids = stop_ids  # callable: stop strings → token ids a row bans until it has text
        self.occurrence: torch.Tensor | None = None  # [rows, V] decayed counts, made when a row needs them
        self.until_text: torch.Tensor | None = None  # [rows, V] bool, made when a row needs it

    def reset(self, row: int, params: SamplingParams) -> None:
        if params.require_text and (self.visible is None or self._stop_ids is None):
            raise InputError("require_text needs a sampler made with the tokenizer's visible-token table")
        self.params[row] = params
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.decay[row] = params.penalty_decay
        self.ban_eot[row] = params.ban_end_of_text
        self.seed[row] = seed_value(params.seed)
        self.counter[row] = 0
        self.has_text[row] = False
        if params.penalized:
            if self.occurrence is None:
                self.occurrence = torch.zeros(self.rows, self.vocab_size, device=self.device)
            self.occurrence[row].zero_()
        if params.require_text:
            if self.until_text is None:
                self.until_text = torch.zeros(self.rows, self.vocab_size, dtype=torch.bool, device=self.device)
            self.until_text[row].zero_()
            self.until_text[row, torch.tensor(self._stop_ids(params.stop), dtype=torch.long, device=self.device)] = True

    def draw(self, logits: torch.Tensor, rows: list[int], idx: torch.Tensor | None = None,
             live: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [n] (device) for logits [n,V] of `rows` (`idx`: the same rows as a device tensor)."""
        ps = [self.params[r] for r in rows]
        if idx is None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        x = self.adjust(logits, rows, idx)
        if all(p.greedy for p in ps):
            tokens = x.argmax(-1)
        else:
            sampled = [p for p in ps if not p.greedy]
            tokens = sample_rows(x, self.temperature[idx], self.top_p[idx], self.top_k[idx],
                                 uniforms(self.seed[idx], self.counter[idx]),
                                 max_k=max((p.top_k for p in sampled if p.top_k < self.vocab_size), default=0),
                                 use_top_p=any(p.top_p < 1 for p in sampled))
        self._advance(rows, ps, idx, tokens, live)
        return tokens

    def signature(self, rows: list[int]) -> tuple:
        """What decides which ops `draw` runs for these rows (a captured draw is valid for one)."""
        ps = [self.params[r] for r in rows]
        sampled = [p for p in ps if not p.greedy]
        return (tuple(rows), tuple((p.greedy, p.penalized, p.ban_end_of_text, p.require_text) for p in ps),
                max((p.top_k for p in sampled if p.top_k < self.vocab_size), default=0),
                any(p.top_p < 1 for p in sampled))

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors a draw advances (saved and restored around a capture's warm-up)."""
        return [t for t in (self.counter, self.occurrence, self.has_text) if t is not None]

    def adjust(self, logits: torch.Tensor, rows: list[int], idx: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [n,V] of `rows` with their penalties, end-of-text ban and (before visible
        text) stop bans applied; the caller's tensor is not modified."""
        ps = [self.params[r] for r in rows]
        if idx is None:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        x = logits.float()
        if any(p.penalized for p in ps):
            occ = self.occurrence.index_select(0, idx)
            x = x - self.presence[idx, None] * (occ > 0) - self.frequency[idx, None] * occ
        if any(p.ban_end_of_text for p in ps):
            x = x.clone() if x is logits else x
            x[:, END_OF_TEXT] = torch.where(self.ban_eot[idx], float("-inf"), x[:, END_OF_TEXT])
        if any(p.require_text for p in ps):
            x = x.masked_fill(self.until_text.index_select(0, idx) & ~self.has_text[idx, None], float("-inf"))
        return x

    def _advance(self, rows, ps, idx, tokens, live) -> None:
        step = torch.ones_like(idx) if live is None else (live.index_select(0, idx) != 0).long()
        self.counter.index_add_(0, idx, step)
        if any(p.penalized for p in ps):
            occ = self.occurrence.index_select(0, idx)
            decay = torch.where(step.bool(), self.decay[idx], torch.ones_like(self.decay[idx]))
            occ = occ * decay[:, None]
            occ.scatter_add_(1, tokens[:, None], step[:, None].to(occ.dtype))
            self.occurrence.index_copy_(0, idx, occ)
        if any(p.require_text for p in ps):
            self.has_text.index_copy_(0, idx, self.has_text[idx] | (self.visible[tokens] & step.bool()))


class Sampler:
    """One sequence's sampler (a RowSampler of one row, sized by the first logits it sees):
    `sample(logits [V]) -> token id`."""

    def __init__(self, params: SamplingParams, device="cpu", visible=None, stop_ids=None):
        self.params = params
        self.device, self._visible, self._stop_ids = torch.device(device), visible, stop_ids
        self.rows: RowSampler | None = None

    def sample(self, logits: torch.Tensor) -> int:
        if self.rows is None or self.rows.vocab_size != logits.shape[-1]:
            self.rows = RowSampler(1, logits.shape[-1], self.device, self._visible, self._stop_ids)
            self.rows.reset(0, self.params)
        return int(self.rows.draw(logits.to(self.device)[None], [0])[0])

    def occurrence(self) -> torch.Tensor | None:
        return None if self.rows is None or self.rows.occurrence is None else self.rows.occurrence[0]


def sample_token(logits: torch.Tensor, p: SamplingParams) -> int:
    """One token from logits [V] with these settings (a fresh sequence: no penalties yet)."""
    return Sampler(p, logits.device).sample(logits)
