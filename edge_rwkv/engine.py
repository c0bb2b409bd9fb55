"""Batched decoding: sequences join and leave fixed slots between steps; one forward per step.

    eng = BatchEngine(model, max_slots=8)
    a = eng.join(model.tokenizer.encode("Hello"), SamplingParams(temperature=0))
    b = eng.join(prompt_b, params_b, state=saved_state)      # continue a saved conversation
    while ...:
        for slot, token in eng.step().items(): ...            # every active slot's next token
    state_a = eng.leave(a)                                    # the slot's state (batch 1); the slot is free

The engine holds one batched State of `max_slots` rows (a static shape, slot i = row i) and one
logits row per slot. A slot first reads its prompt (chunked prefill, one chunk per step so long
prompts do not stall the others), then decodes: each step samples every ready slot's next token
from its logits with the slot's own Sampler, and all sampled tokens go through ONE
`net.forward(ids [B,1], state)` call. A sampled end-of-text token ends the slot's sequence without
being read (as in `generate.Generation`). With greedy sampling a slot produces the same tokens as the
sequence run alone.

On CUDA a decode step replays a captured CUDA graph (cuda_graph.GraphStep) over the first b rows
of the engine's state, b the smallest power of two (or max_slots) covering the highest decoding
slot (free slots are taken lowest first, so b follows the number of sessions); rows that do not
decode this step run through the graph with `live` = 0, which leaves their state as it was. One
graph is captured per b, on first use. Elsewhere (CPU, or if capture fails: `decode_how` says
why) the eager path gathers the decoding rows, runs them and scatters the new state back.
All ready slots draw their next tokens together (sampling.sample_batch: penalties, temperature,
top-k, top-p and one uniform per slot from the slot's own generator, batched on the device).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cuda_graph import GraphStep, prefill_graph
from .errors import InputError
from .generate import prefill_chunk_for
from .sampling import Sampler, SamplingParams, sample_batch
from .state import State
from .tokenizer import END_OF_TEXT


@dataclass
class Slot:
    sampler: Sampler
    pending: list[int] = field(default_factory=list)  # tokens still to read before the next sample
    ready: bool = False  # logits row holds the distribution of the next token
    ended: bool = False  # end-of-text was sampled: nothing more until tokens are fed
    hold: bool = False  # after reading `pending`, wait (do not sample) until the caller leaves or feeds
    tokens: int = 0  # tokens the slot's state has read


class BatchEngine:
    def __init__(self, model, max_slots: int, prefill_chunk: int | None = None):
        if not isinstance(max_slots, int) or max_slots < 1:
            raise InputError(f"max_slots must be a positive integer, got {max_slots!r}")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InputError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.model = model
        self.net = model.net
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk or prefill_chunk_for(model.net)
        self.vocab_size = model.config.vocab_size
        self.state: State = model.new_state(max_slots)  # row i = slot i
        self.logits = torch.zeros(max_slots, self.vocab_size, dtype=torch.float32, device=self.net.device)
        self.slots: list[Slot | None] = [None] * max_slots
        self.forward_calls = 0  # batched decode forwards (for tests and stats)
        self._graphs: dict = {}
        self.decode_how = "cuda-graph" if self.net.device.type == "cuda" else "eager"

    # ------------------------------------------------------------------ slots
    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    @property
    def free(self) -> int:
        return sum(s is None for s in self.slots)

    def join(self, tokens: list[int], params: SamplingParams | None = None, state: State | None = None,
             sampler: Sampler | None = None) -> int:
        """Take a free slot; its state starts as `state` (or zeros) and will read `tokens` first."""
        if not tokens:
            raise InputError("a sequence needs at least one token to start from")
        self._check_tokens(tokens)
        try:
            i = self.slots.index(None)
        except ValueError:
            raise InputError(f"all {self.max_slots} slots are busy") from None
        if state is not None:
            self.model.check_state(state, 1)
            self._write_row(i, state.to(self.net.device))
            start = state.tokens
        else:
            self._zero_row(i)
            start = 0
        self.slots[i] = Slot(sampler or Sampler(params or SamplingParams()), list(tokens), tokens=start)
        return i

    def feed(self, slot: int, tokens: list[int], sample_after: bool = True) -> None:
        """Queue more tokens for a slot to read (e.g. the end of a turn); they are read on the next steps.

        With sample_after=False the slot then holds: it samples nothing more (its state stays exactly
        "everything read so far") until it leaves or is fed again."""
        s = self._slot(slot)
        self._check_tokens(tokens)
        s.pending.extend(tokens)
        s.ready = False
        s.ended = False
        s.hold = not sample_after

    def leave(self, slot: int) -> State:
        """Free the slot and return its state (batch 1, on the engine's device)."""
        s = self._slot(slot)
        st = self.state.select(slot)
        st.tokens = s.tokens
        self.slots[slot] = None
        return st

    def busy(self, slot: int) -> bool:
        """Whether the slot still has tokens to read (its next step is a prefill, not a sample)."""
        return bool(self._slot(slot).pending)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """Advance every active slot by one step; return {slot: sampled token} for the slots that sampled."""
        for i, s in enumerate(self.slots):
            if s is not None and s.pending:
                self._prefill_chunk(i, s)
        out: dict[int, int] = {}
        rows, ids = [], []
        for i, token in self._sample_ready().items():
            s = self.slots[i]
            out[i] = token
            if token == END_OF_TEXT:
                s.ended, s.ready = True, False
                continue
            rows.append(i)
            ids.append(token)
        if rows:
            self._decode(rows, ids)
        return out

    def _sample_ready(self) -> dict[int, int]:
        """{slot: next token} for every slot whose logits are ready, in slot order (one batched draw)."""
        ready = [i for i, s in enumerate(self.slots) if s is not None and s.ready and not s.ended and not s.pending]
        if not ready:
            return {}
        idx = torch.tensor(ready, dtype=torch.long, device=self.logits.device)
        tokens = sample_batch(self.logits.index_select(0, idx), [self.slots[i].sampler for i in ready])
        return dict(zip(ready, tokens))

    def _graph_for(self, rows: list[int]):
        """The captured step covering these rows (None when graphs are off or capture failed)."""
        if self.decode_how != "cuda-graph":
            return None
        b = 1
        while b < max(rows) + 1:
            b *= 2
        b = min(b, self.max_slots)
        g = self._graphs.get(b)
        if g is None:
            st = self.state
            view = State(st.att_x[:, :b], st.wkv[:, :b], st.ffn_x[:, :b], st.fingerprint)
            try:
                with torch.inference_mode():
                    g = GraphStep(self.net, batch=b, state=view)
            except Exception as e:  # noqa: BLE001 - capture impossible here: decode eagerly, say why
                self.decode_how = f"eager (CUDA-graph capture failed: {type(e).__name__}: {e})"
                return None
            self._graphs[b] = g
        return g

    def _decode(self, rows: list[int], ids: list[int]) -> None:
        """Read one token into each of `rows`: their state advances and their logits row is replaced."""
        g = self._graph_for(rows)
        if g is not None:
            self._decode_graph(g, rows, ids)
        else:
            self._decode_eager(rows, ids)
        self.forward_calls += 1
        for i in rows:
            self.slots[i].tokens += 1

    def _decode_graph(self, g, rows: list[int], ids: list[int]) -> None:
        dev = self.net.device
        tok = torch.zeros(g.batch, dtype=torch.long)
        live = torch.zeros(g.batch, dtype=torch.int32)
        tok[rows] = torch.tensor(ids, dtype=torch.long)
        live[rows] = 1
        logits = g.step(tok.to(dev, non_blocking=True), live.to(dev, non_blocking=True))
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        self.logits.index_copy_(0, idx, logits.index_select(0, idx))

    def _decode_eager(self, rows: list[int], ids: list[int]) -> None:
        dev = self.net.device
        tok = torch.tensor(ids, dtype=torch.long, device=dev)[:, None]
        if rows == list(range(self.max_slots)):
            logits, new = self.net.forward(tok, self.state, all_logits=False)
            self.state.att_x.copy_(new.att_x), self.state.wkv.copy_(new.wkv), self.state.ffn_x.copy_(new.ffn_x)
            self.logits.copy_(logits)
            return
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        sub = State(self.state.att_x.index_select(1, idx), self.state.wkv.index_select(1, idx),
                    self.state.ffn_x.index_select(1, idx), self.state.fingerprint)
        logits, new = self.net.forward(tok, sub, all_logits=False)
        self.state.att_x.index_copy_(1, idx, new.att_x)
        self.state.wkv.index_copy_(1, idx, new.wkv)
        self.state.ffn_x.index_copy_(1, idx, new.ffn_x)
        self.logits.index_copy_(0, idx, logits)

    def _prefill_chunk(self, i: int, s: Slot) -> None:
        chunk, s.pending = s.pending[:self.prefill_chunk], s.pending[self.prefill_chunk:]
        row = self.state.select(i)
        ids = torch.tensor([chunk], dtype=torch.long, device=self.net.device)
        g = prefill_graph(self.net, self.prefill_chunk, row) if len(chunk) == self.prefill_chunk else None
        logits, new = g.run(ids, row) if g is not None else self.net.forward(ids, row, all_logits=False)
        self._write_row(i, new)
        self.logits[i].copy_(logits[0])
        s.tokens += len(chunk)
        s.ready = not s.pending and not s.hold
        s.ended = False

    # ------------------------------------------------------------------ helpers
    def _slot(self, slot: int) -> Slot:
        if not isinstance(slot, int) or not 0 <= slot < self.max_slots or self.slots[slot] is None:
            raise InputError(f"slot {slot!r} is not active")
        return self.slots[slot]

    def _check_tokens(self, tokens) -> None:
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in tokens):
            raise InputError(f"token ids must be ints in [0, {self.vocab_size})")

    def _write_row(self, i: int, st: State) -> None:
        self.state.att_x[:, i].copy_(st.att_x[:, 0])
        self.state.wkv[:, i].copy_(st.wkv[:, 0])
        self.state.ffn_x[:, i].copy_(st.ffn_x[:, 0])

    def _zero_row(self, i: int) -> None:
        self.state.att_x[:, i].zero_(), self.state.wkv[:, i].zero_(), self.state.ffn_x[:, i].zero_()
        self.logits[i].zero_()
