"""Our runtime under the bench: a model's decode step (batch 1 and batched), `Model.stream` end to end and
chunked prefill with its peak memory, each timed as the runtime runs it."""
from __future__ import annotations

import statistics
import time

import torch

from ..synthetic import VOCAB
from .memory import PeakMemory
from .options import E2E_PROMPT, BenchOptions
from .timing import Timer, sync
from .weights import random_tokens

E2E_MODES = {"greedy": {"temperature": 0}, "top_p 0.8": {"temperature": 1.0, "top_p": 0.8, "seed": 1}}


class Ours:
    """One loaded model, measured through the runtime (its Runner and `Model.stream`)."""

    def __init__(self, model, opts: BenchOptions):
        self.m, self.net, self.o = model, model.net, opts
        self.dev = model.device
        self.timer = Timer(self.dev)

    @torch.inference_mode()
    def decode(self, batch: int) -> tuple[float, str]:
        """Seconds per decode step at this batch size, and how it ran: the runtime's captured step
        (what the batch engine replays) on CUDA, the eager forward elsewhere."""
        o = self.o
        steps = max(o.decode_steps, 5)
        st = self.m.new_state(batch)
        ids = torch.randint(0, VOCAB, (batch, 1), device=self.dev)
        live = torch.ones(batch, dtype=torch.int32, device=self.dev)
        g = self.m.runner.decode_graph(batch, st, ids, live)
        if g is not None:
            t = self.timer.each(g.step, reps=steps, warmup=o.warmup)
            del g
            torch.cuda.empty_cache()
            return t, self.m.runner.decode_how()
        box = [st]

        def step():
            logits, new = self.net.forward(ids, box[0], all_logits=False)
            box[0].att_x.copy_(new.att_x), box[0].wkv.copy_(new.wkv), box[0].ffn_x.copy_(new.ffn_x)
            return logits

        return self.timer.each(step, reps=steps, warmup=o.warmup), self.m.runner.decode_how()

    def end_to_end(self, sampling: dict, n: int, prompt_len: int = E2E_PROMPT) -> float:
        """Tokens per second of `Model.stream` — what a user of the Python API gets: decode steps,
        sampling, detokenizing — over n tokens after a prompt (the prompt's time subtracted: the
        time of the same call stopped after its first token)."""
        prompt = random_tokens(prompt_len, self.o.seed + 3)

        def run(k: int) -> float:
            sync(self.dev)
            t0 = time.perf_counter()
            gen = self.m.stream(prompt, max_tokens=k, ban_end_of_text=True, **sampling)
            for _ in gen:
                pass
            sync(self.dev)
            assert len(gen.tokens) == k, (len(gen.tokens), k)
            return time.perf_counter() - t0

        run(n)  # warm-up: graphs captured, kernels compiled
        # the fastest of each: load spikes only ever add time, and a short run on a busy CPU could
        # otherwise time the full call below the one-token call
        full = min(run(n) for _ in range(3))
        first = min(run(1) for _ in range(3))
        return (n - 1) / (full - first)

    @torch.inference_mode()
    def prefill(self, n: int, reps: int) -> tuple[float, int | None, int | None]:
        toks = random_tokens(n, self.o.seed + n)
        times, peak, base = [], None, None
        for r in range(reps):
            st = self.m.new_state(1)
            with PeakMemory(self.dev) as pm:
                sync(self.dev)
                t0 = time.perf_counter()
                self.m.runner.prefill(toks, st, chunk=self.o.chunk)
                sync(self.dev)
                times.append(time.perf_counter() - t0)
            if r == 0:
                peak, base = pm.peak, pm.base
        return statistics.median(times), peak, base

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        out, _ = self.m.forward(tokens)
        return out.float().cpu()
