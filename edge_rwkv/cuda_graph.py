"""CUDA-graph replay of one decode step: Python and launch overhead paid once at capture, not per token.

The step (embedding → all layers → head) is captured for a fixed batch size into a torch CUDA graph
with static buffers: token ids and a per-row `live` mask in, logits out, and the state updated in
place (rows whose `live` is 0 keep their state: the batch engine runs idle slots through the same
graph). Where the fused step runs (fused_decode.FusedStep: Numba kernels around the matmuls) it is
what is captured; otherwise the model's own forward is. Numba kernels launch on torch's current
stream, so they are captured with the rest.
"""
from __future__ import annotations

import torch

from .fused_decode import FusedStep, fused_step_supported
from .state import State


class GraphStep:
    """`step(tokens [B]) -> logits [B,V]` advancing `self.state` by one token.

    `state` may be given (e.g. the first B rows of a batch engine's state: per-layer rows contiguous);
    otherwise a zero state of B rows is made. Nothing in it changes until the first `step`.
    """

    def __init__(self, net, batch: int, state: State | None = None, warmup: int = 2, fused: bool = True):
        if net.device.type != "cuda":
            raise ValueError("CUDA-graph decode needs a CUDA model")
        self.net, self.batch = net, batch
        cfg = net.cfg
        dev = net.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.live = torch.zeros(batch, dtype=torch.int32, device=dev)  # 0 while warming up: state untouched
        self.state = state if state is not None else State.zeros(cfg.n_layer, batch, cfg.n_embd, cfg.n_head,
                                                                  cfg.head_size, dev)
        reason = fused_step_supported(net) if fused else "not requested"
        self.fused = FusedStep(net, batch) if reason is None else None
        self.how = "cuda-graph, fused step" if self.fused else f"cuda-graph, model forward ({reason})"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # compile kernels / autotune outside the capture
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self._body()
        self.live.fill_(1)

    def _body(self) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(self.tokens, self.state, self.live)
        logits, new = self.net.forward(self.tokens, self.state, all_logits=False)
        keep = self.live.bool()
        for old, upd in ((self.state.att_x, new.att_x), (self.state.wkv, new.wkv), (self.state.ffn_x, new.ffn_x)):
            mask = keep.view((1, -1) + (1,) * (old.dim() - 2))
            old.copy_(torch.where(mask, upd, old))
        return logits

    def load_state(self, state: State) -> None:
        self.state.copy_(state.to(self.state.device))

    @torch.inference_mode()  # the static buffers are inference tensors (made under inference mode)
    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B] (device); live [B] int32 (device) or None for all rows."""
        self.tokens.copy_(tokens.view(self.batch, 1))
        if live is not None:
            self.live.copy_(live)
        self.graph.replay()
        if live is None:
            self.state.tokens += 1
        return self.logits
