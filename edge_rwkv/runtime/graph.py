"""CUDA-graph replay of one decode step (and of a full prefill chunk, `PrefillGraph`): Python and
launch overhead paid once at capture, not per token.

The step (embedding → all layers → head) is captured for a fixed batch size into a torch CUDA graph
with static buffers: token ids and a per-row `live` mask in, logits out, and the state updated in
place (rows whose `live` is 0 keep their state: the batch engine runs idle slots through the same
graph). Where the fused step runs (fused.FusedStep: Numba kernels around the matmuls) it is
what is captured; otherwise the model's own forward is. Numba kernels launch on torch's current
stream, so they are captured with the rest.
"""
from __future__ import annotations

import threading

import torch

from .fused import FusedStep
from ..state import State



class GraphStep:
    """`step()` replays one decode step of `batch` rows: reads `tokens` [B,1], writes `logits` [B,V]
    and advances `state` in place for the rows whose `live` [B] int32 entry is non-zero.

    The buffers may be given (the batch engine passes views of its first B rows, so its sampler
    writes the next tokens straight into the graph's input); otherwise they are made here.
    `packed` is the runner's FusedStep layout (None: capture the model's own forward).
    Nothing in `state` changes during capture (warm-up runs with `live` all zero).
    """

    def __init__(self, net, batch: int, packed=None, state: State | None = None,
                 tokens: torch.Tensor | None = None, live: torch.Tensor | None = None, warmup: int = 2):
        if net.device.type != "cuda":
            raise ValueError("CUDA-graph decode needs a CUDA model")
        self.net, self.batch = net, batch
        cfg = net.cfg
        dev = net.device
        self.tokens = tokens if tokens is not None else torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.live = live if live is not None else torch.zeros(batch, dtype=torch.int32, device=dev)
        self.state = state if state is not None else State.zeros(cfg.n_layer, batch, cfg.n_embd, cfg.n_head,
                                                                  cfg.head_size, dev)
        self.fused = FusedStep(net, batch, packed) if packed is not None else None
        saved_live = self.live.clone()
        self.live.zero_()  # warm-up and capture leave every row's state as it was
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # compile kernels / autotune outside the capture
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits = self._body()
        self.live.copy_(saved_live)

    def _body(self) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(self.tokens, self.state, self.live)
        logits, new = self.net.forward(self.tokens, self.state, all_logits=False)
        keep = self.live.bool()
        for old, upd in ((self.state.att_x, new.att_x), (self.state.wkv, new.wkv), (self.state.ffn_x, new.ffn_x)):
            mask = keep.view((1, -1) + (1,) * (old.dim() - 2))
            old.copy_(torch.where(mask, upd, old))
        return logits

    def step(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class PrefillGraph:
    """One full prefill chunk (one sequence, T tokens) of the model's forward, captured as a CUDA graph.

    An eager chunk issues thousands of small launches (norms, token shifts, LoRAs, the chunked WKV's
    kernels and products, per-slab dequantization of quantized matrices): at 7.2B, and for quantized
    models read in short chunks, the host's Python and launch time, not the GPU, set the prefill
    speed. Replaying a captured chunk costs one launch. Static buffers: token ids and the entering
    state are copied in, the last token's logits and the new state copied out (so a later replay
    never changes what a caller holds). The graph's memory pool keeps one chunk's activations
    reserved — what an eager chunk's transient peak reserves in the caching allocator anyway.
    """

    def __init__(self, net, T: int, like: State, warmup: int = 1):
        if net.device.type != "cuda":
            raise ValueError("CUDA-graph prefill needs a CUDA model")
        self.T = T
        self._lock = threading.Lock()
        self.tokens = torch.zeros(1, T, dtype=torch.long, device=net.device)
        self.state = State(*(torch.zeros_like(t) for t in (like.att_x, like.wkv, like.ffn_x)))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # compile kernels, create cached masks, outside the capture
                net.forward(self.tokens, self.state, all_logits=False)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.logits, self.out = net.forward(self.tokens, self.state, all_logits=False)

    def matches(self, state: State) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                   for a, b in zip((state.att_x, state.wkv, state.ffn_x),
                                   (self.state.att_x, self.state.wkv, self.state.ffn_x)))

    def run(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """ids [1, T] on the model's device; returns (logits [1, V], the state after the chunk).
        Replays are serialised: the static buffers are shared by every caller of this model."""
        with self._lock:
            with torch.inference_mode():  # the static buffers are inference tensors
                self.tokens.copy_(ids)
                self.state.copy_(state)
                self.graph.replay()
            # copies made outside inference mode: ordinary tensors, like the eager forward's
            out = State(self.out.att_x.clone(), self.out.wkv.clone(), self.out.ffn_x.clone(), state.fingerprint,
                        state.tokens + self.T)
            return self.logits.clone(), out
