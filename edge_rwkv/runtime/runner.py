"""The per-model runner: how steps run on this device, and what they need beyond the pure model.

It owns what the fast path adds to a model — the layers packed for the fused decode step, the
captured prefill chunks, the reasons a fast path is not taken — so the model stays the definition
(and the reference the fast path is tested against). Every face reads prompts through `prefill`
and decodes through a `BatchEngine` that asks the runner for its captured steps.
"""
from __future__ import annotations

import logging
import threading

import torch

from ..quant.linear import quantized_linears
from ..state import State
from .fused import fused_step_supported, pack_layers
from .graph import GraphStep, PrefillGraph
from .sizes import CPU_CHUNK, gpu_prefill_chunk

log = logging.getLogger("edge_rwkv.runtime")

PREFILL_CHUNK = CPU_CHUNK


def prefill_chunk_for(net) -> int:
    """Tokens per prefill forward: sizes.gpu_prefill_chunk on a GPU, CPU_CHUNK elsewhere."""
    if net.device.type != "cuda":
        return CPU_CHUNK
    return gpu_prefill_chunk(net.cfg.n_embd, _is_quantized(net))


def _is_quantized(net) -> bool:
    return bool(quantized_linears(net))


class Runner:
    def __init__(self, net):
        self.net = net
        self.device = net.device
        self.chunk = prefill_chunk_for(net)
        self.fused_reason = fused_step_supported(net) if self.device.type == "cuda" else "not on CUDA"
        self._packed = None
        self.graph_error: str | None = None  # why decode graphs cannot be captured here (then: eager)
        self._prefill_graphs: dict[int, PrefillGraph | None] = {}
        self._prefill_errors: dict[int, str] = {}
        self._lock = threading.Lock()
        self.memory_plan = None  # a MemoryPlan when loaded under a budget

    def fit(self, plan) -> None:
        """Hold to a memory plan (runtime/memory.py): its prefill chunk; describe() reports it."""
        self.chunk = plan.chunk
        self.memory_plan = plan

    # ------------------------------------------------------------------ decode
    def packed(self):
        """The layers laid out for the fused step (made once), or None where it does not run."""
        if self.fused_reason is not None:
            return None
        with self._lock:
            if self._packed is None:
                self._packed = pack_layers(self.net)
        return self._packed

    def decode_graph(self, batch: int, state: State, tokens: torch.Tensor, live: torch.Tensor) -> GraphStep | None:
        """A captured decode step over these buffers, or None (off CUDA, or capture failed: the reason
        is kept in `graph_error`, logged once, and every later caller decodes eagerly)."""
        if self.device.type != "cuda" or self.graph_error is not None:
            return None
        try:
            with torch.inference_mode():
                return GraphStep(self.net, batch, self.packed(), state=state, tokens=tokens, live=live)
        except Exception as e:  # noqa: BLE001 - capture impossible on this driver/backend: decode eagerly
            self.graph_error = f"{type(e).__name__}: {e}"
            log.warning("decode runs eagerly: CUDA-graph capture failed (%s)", self.graph_error)
            torch.cuda.synchronize()
            return None

    # ------------------------------------------------------------------ prefill
    def prefill_graph(self, T: int, like: State) -> PrefillGraph | None:
        """The captured prefill chunk of T tokens for one sequence (made on first use), or None: off
        CUDA, for several sequences, or where capture is impossible (logged once; then eager)."""
        if self.device.type != "cuda" or like.batch != 1:
            return None
        with self._lock:
            if T not in self._prefill_graphs:
                try:
                    self._prefill_graphs[T] = PrefillGraph(self.net, T, like)
                except Exception as e:  # noqa: BLE001 - capture impossible here: prefill eagerly, say why once
                    log.warning("prefill chunk of %d tokens runs eagerly: CUDA-graph capture failed (%s: %s)",
                                T, type(e).__name__, e)
                    self._prefill_errors[T] = f"{type(e).__name__}: {e}"
                    self._prefill_graphs[T] = None
                    torch.cuda.synchronize()
            g = self._prefill_graphs[T]
        return g if g is not None and g.matches(like) else None

    def read(self, ids: torch.Tensor, state: State, chunk: int | None = None) -> tuple[torch.Tensor, State]:
        """One forward over ids [1,T] (T ≤ chunk) from `state`: (logits [1,V] of the last token, new
        state counting the tokens). A full chunk replays its captured graph where there is one; a
        shorter piece runs eagerly."""
        chunk = chunk or self.chunk
        g = self.prefill_graph(chunk, state) if ids.shape[1] == chunk else None
        return g.run(ids, state) if g is not None else self.net.forward(ids, state, all_logits=False)

    @torch.inference_mode()
    def prefill(self, tokens: list[int], state: State, chunk: int | None = None) -> tuple[torch.Tensor, State]:
        """Read tokens (one sequence) from `state` in chunks; (logits [V] of the last token, new state)."""
        chunk = chunk or self.chunk
        logits = None
        for start in range(0, len(tokens), chunk):
            ids = torch.tensor([tokens[start:start + chunk]], dtype=torch.long, device=self.device)
            logits, state = self.read(ids, state, chunk)
        return logits[0], state

    # ------------------------------------------------------------------ describe
    def decode_how(self) -> str:
        if self.device.type != "cuda":
            return "eager"
        if self.graph_error:
            return f"eager (CUDA-graph capture failed: {self.graph_error})"
        if self.fused_reason is None:
            return "cuda-graph, fused step"
        return f"cuda-graph, model forward ({self.fused_reason})"

    def prefill_how(self) -> str:
        if self.device.type != "cuda":
            return f"eager, chunks of {self.chunk}"
        error = self._prefill_errors.get(self.chunk)
        if error:
            return f"eager, chunks of {self.chunk} (CUDA-graph capture failed: {error})"
        captured = self._prefill_graphs.get(self.chunk) is not None
        return f"chunks of {self.chunk}, full ones replayed from a CUDA graph" + ("" if captured else " (captured on first use)")
