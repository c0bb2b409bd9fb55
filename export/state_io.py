"""Between edge_rwkv.State and the exported graphs' named state tensors (shared by every runner)."""
from __future__ import annotations

import numpy as np
import torch

from edge_rwkv.state import State

PARTS = ("att_x", "wkv", "ffn_x")


def state_feeds(state: State) -> dict[str, torch.Tensor]:
    """{'att_x.{i}': [B,C], 'wkv.{i}': [B,H,N,N], 'ffn_x.{i}': [B,C]} as fp32 views of the state."""
    feeds = {}
    for part in PARTS:
        stacked = getattr(state, part)
        for i in range(stacked.shape[0]):
            feeds[f"{part}.{i}"] = stacked[i].float().contiguous()
    return feeds


def state_from_outputs(outputs: dict[str, torch.Tensor | np.ndarray], n_layer: int, like: State) -> State:
    """A new State from the graph's `{part}_out.{i}` outputs (fingerprint kept from `like`)."""
    def get(name):
        t = outputs[name]
        return torch.from_numpy(np.asarray(t)) if not isinstance(t, torch.Tensor) else t

    stacked = {p: torch.stack([get(f"{p}_out.{i}") for i in range(n_layer)]) for p in PARTS}
    return State(stacked["att_x"], stacked["wkv"], stacked["ffn_x"], like.fingerprint, like.tokens)
