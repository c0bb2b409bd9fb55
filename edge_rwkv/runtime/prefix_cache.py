"""Prefix-state cache: token prefix → the state after reading it, kept in host memory (LRU, bounded bytes).

A repeated system prompt, or a conversation resumed by re-sending its history, shares a prefix with
an earlier prompt: starting from the state after that prefix, only the rest is read. An entry for a
whole prompt also keeps the logits of its last token, so the same prompt again reads nothing.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..state import State


@dataclass
class Hit:
    length: int  # tokens of the prompt the state has read
    state: State  # on the host
    logits: torch.Tensor | None  # [V] after the last of those tokens (whole-prompt entries only)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.to("cpu", copy=True)
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


class PrefixCache:
    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache size must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        # key → (state on the host, logits or None, event marking the end of the copies or None)
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._lengths: dict[int, int] = {}  # prefix length → entries of that length
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int]) -> Hit | None:
        """The longest cached prefix of `tokens` that leaves logits to draw from: a proper prefix, or
        the whole prompt when its entry kept the logits."""
        with self._lock:
            for n in sorted(self._lengths, reverse=True):
                if n > len(tokens):
                    continue
                key = tuple(tokens[:n])
                entry = self._entries.get(key)
                if entry is None or (n == len(tokens) and entry[1] is None):
                    continue
                self._entries.move_to_end(key)
                self.hits += 1
                state, logits, copied = entry
                if copied is not None:
                    copied.synchronize()
                return Hit(n, state, logits if n == len(tokens) else None)
            self.misses += 1
            return None

    def put(self, tokens: list[int], state: State, logits: torch.Tensor | None = None) -> None:
        """Keep the state after `tokens` (copied to host memory); oldest entries go first when full."""
        size = state.nbytes + (0 if logits is None else logits.numel() * logits.element_size())
        if size > self.max_bytes or not tokens:
            return
        key = tuple(tokens)
        host = State(*(_to_host(t) for t in (state.att_x, state.wkv, state.ffn_x)), state.fingerprint, state.tokens)
        host_logits = None if logits is None else _to_host(logits)
        copied = None
        if state.device.type == "cuda":  # the copies run behind the step that made the state: no wait here
            copied = torch.cuda.Event()
            copied.record()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(key, old)
                if host_logits is None:
                    host_logits = old[1]
                    size += 0 if host_logits is None else host_logits.numel() * host_logits.element_size()
            self._entries[key] = (host, host_logits, copied)
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self.bytes += size
            while self.bytes > self.max_bytes:
                k, e = self._entries.popitem(last=False)
                self._forget(k, e)

    def _forget(self, key: tuple, entry) -> None:
        state, logits, _ = entry
        self.bytes -= state.nbytes + (0 if logits is None else logits.numel() * logits.element_size())
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses}
