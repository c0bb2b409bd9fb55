"""CUDA-graph replay of one decode step: Python and launch overhead paid once at capture, not per token.

The step (embedding → all layers → head) is captured for a fixed batch size into a torch CUDA graph
with static buffers: token ids in, logits out, and the state updated in place. Numba kernels launch
on torch's current stream, so they are captured with the rest.
"""
from __future__ import annotations

import torch

from .state import State


class GraphStep:
    """`step(tokens [B]) -> logits [B,V]` advancing `self.state` (a static buffer) by one token."""

    def __init__(self, net, batch: int, warmup: int = 2):
        if net.device.type != "cuda":
            raise ValueError("CUDA-graph decode needs a CUDA model")
        self.net, self.batch = net, batch
        cfg = net.cfg
        dev = net.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.state = State.zeros(cfg.n_layer, batch, cfg.n_embd, cfg.n_head, cfg.head_size, dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # compile kernels / autotune outside the capture
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self._body()
        self.state.wkv.zero_(), self.state.att_x.zero_(), self.state.ffn_x.zero_()

    def _body(self) -> torch.Tensor:
        logits, new = self.net.forward(self.tokens, self.state, all_logits=False)
        self.state.att_x.copy_(new.att_x)
        self.state.wkv.copy_(new.wkv)
        self.state.ffn_x.copy_(new.ffn_x)
        return logits

    def load_state(self, state: State) -> None:
        self.state.copy_(state.to(self.state.device))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(self.batch, 1))
        self.graph.replay()
        self.state.tokens += 1
        return self.logits
