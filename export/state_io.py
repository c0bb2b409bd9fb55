"""Between edge_rwkv.State and the exported graphs' named state tensors (shared by every runner)."""
from __future__ import annotations

import numpy as np
import torch

from edge_rwkv.errors import InputError
from edge_rwkv.state import State

PARTS = ("att_x", "wkv", "ffn_x")


def check_token_ids(ids, vocab_size: int, where: str) -> None:
    """Refuse ids outside [0, vocab_size): the graphs' Gather would wrap a negative id to another token."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InputError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def state_feeds(state: State) -> dict[str, torch.Tensor]:
    """{'att_x.{i}': [B,C], 'wkv.{i}': [B,H,N,N], 'ffn_x.{i}': [B,C]} as fp32 views of the state."""
    feeds = {}
    for part in PARTS:
        stacked = getattr(state, part)
        for i in range(stacked.shape[0]):
            feeds[f"{part}.{i}"] = stacked[i].float().contiguous()
    return feeds


def state_from_outputs(outputs: dict[str, torch.Tensor | np.ndarray], n_layer: int, like: State,
                       read: int) -> State:
    """The State after a graph read `read` tokens from `like`, from its `{part}_out.{i}` outputs."""
    def get(name):
        t = outputs[name]
        return torch.from_numpy(np.asarray(t)) if not isinstance(t, torch.Tensor) else t

    stacked = {p: torch.stack([get(f"{p}_out.{i}") for i in range(n_layer)]) for p in PARTS}
    return State(stacked["att_x"], stacked["wkv"], stacked["ffn_x"], like.fingerprint, like.tokens + read)


def run_sequence(decode, prefill, tokens, state: State):
    """Feed tokens [T] or [B,T] through a pair of graphs: whole prefill chunks where they fit, then decode
    steps. Each graph has `.tokens` (per call) and `.step(ids, state) -> (logits, state)`."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    t, logits = 0, None
    while t < ids.shape[1]:
        g = prefill if prefill and ids.shape[1] - t >= prefill.tokens else decode
        logits, state = g.step(ids[:, t:t + g.tokens], state)
        t += g.tokens
    return logits, state
