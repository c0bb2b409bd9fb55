"""Batched decoding: sequences join and leave fixed slots between steps; one decode step per step.

    eng = BatchEngine(model, max_slots=8)
    a = eng.join(model.tokenizer.encode("Hello"), SamplingParams(temperature=0))
    b = eng.join(prompt_b, params_b, state=saved_state)      # continue a saved conversation
    while ...:
        for slot, token in eng.step().items(): ...            # tokens as they reach the host
    state_a = eng.leave(a)                                    # the slot's state (batch 1); the slot is free

Every face decodes through this engine: `Model.stream` with one slot, the daemon with many.

The engine holds one batched State of `max_slots` rows (slot i = row i), a logits row, a token and a
`live` flag per slot, all on the model's device. A step is, in stream order on the device:

  1. decode: the rows that are decoding read the token sampled for them last step (a captured CUDA
     graph over the first b rows, b a power of two covering them; eagerly elsewhere); a row whose
     `live` flag is 0 keeps its state;
  2. prefill: slots with tokens to read read up to `prefill_budget` of them (chunked, full chunks
     replayed from a captured graph), so a long prompt never stalls the decoding slots for long;
  3. sample: every decoding row and every row that just finished reading draws its next token
     (sampling.RowSampler, batched on the device); the token goes straight into the decode input,
     and a row that drew end of text gets `live` = 0 on the device — it will not read it.

Only the sampled token ids cross to the host, one small copy per step, and the host reads them one
step later: while the device runs step k, the host turns step k-1's tokens into text. So `step()`
returns the tokens sampled by the previous step. A caller that ends a sequence on such a token
(stop string, token limit) calls `stop`, `feed` or `leave` before the next step: the state is then
exactly "every token returned so far, except end of text" — the token the device drew meanwhile
is dropped unread.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..sampling import RowSampler, SamplingParams
from ..state import State
from ..tokenizer import END_OF_TEXT


@dataclass
class Slot:
    pending: list[int] = field(default_factory=list)  # tokens still to read
    hold: bool = False  # after reading `pending`, draw nothing until fed again or left
    decoding: bool = False  # the row reads its last drawn token at the next step
    tokens: int = 0  # tokens the row's state has read (counting the one in flight)
    epoch: int = 0  # bumped whenever the slot's sequence changes course: older draws are dropped
    order: int = 0  # join order: prompts are read first come, first served
    fresh: bool = False  # the logits row holds a distribution not drawn from yet (given at join)
    forced: list[int] = field(default_factory=list)  # prompt tokens read one a step through the decode graph
    # (forced[0] sits in the decode input; it is popped once a step has read it)
    forcing: bool = False  # the row's decode input holds a prompt token, not a drawn one
    read: int = 0  # tokens read since joining (for snapshots)
    snapshots: list[int] = field(default_factory=list)  # read counts at which to report the state
    on_snapshot: object = None  # callable(slot, read, state, logits [V] or None at the last token)


class BatchEngine:
    def __init__(self, model, max_slots: int, prefill_chunk: int | None = None,
                 prefill_budget: int | None = None):
        if not isinstance(max_slots, int) or max_slots < 1:
            raise InputError(f"max_slots must be a positive integer, got {max_slots!r}")
        for name, v in (("prefill_chunk", prefill_chunk), ("prefill_budget", prefill_budget)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        self.model = model
        self.net = model.net
        self.runner = model.runner
        self.device = self.net.device
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk or self.runner.chunk
        self.prefill_budget = prefill_budget
        self.vocab_size = model.config.vocab_size
        dev = self.device
        self.state: State = model.new_state(max_slots)  # row i = slot i
        self.logits = torch.zeros(max_slots, self.vocab_size, dtype=torch.float32, device=dev)
        self.next_tokens = torch.zeros(max_slots, 1, dtype=torch.long, device=dev)  # decode input
        self.live = torch.zeros(max_slots, dtype=torch.int32, device=dev)
        self.sampler = RowSampler(max_slots, self.vocab_size, dev, model.visible_tokens(), model.stop_token_ids)
        self.slots: list[Slot | None] = [None] * max_slots
        self.forward_calls = 0  # batched decode steps run (for tests and stats)
        self._graphs: dict[int, object] = {}
        self._joined = 0
        self._epochs = 0
        self._indices: dict[tuple, torch.Tensor] = {}
        self._sample_graphs: dict[tuple, tuple | None] = {}
        self._in_flight = None  # (tokens on the host or a copy in flight, event, [(row, epoch)])
        self._pinned = None
        if dev.type == "cuda":
            self._pinned = [torch.zeros(max_slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._flip = 0

    # ------------------------------------------------------------------ slots
    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    @property
    def free(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def decode_how(self) -> str:
        return self.runner.decode_how()

    def warm(self) -> None:
        """Capture now what a step would capture on first use — the decode graph of every batch
        bucket and the prompt chunk's graph — so no request pays for a capture (a daemon at start)."""
        if self.device.type != "cuda":
            return
        b = 1
        while True:
            self._graph_for(b)
            if b >= self.max_slots:
                break
            b *= 2
        chunk = self.prefill_chunk if self.prefill_budget is None else min(self.prefill_chunk, self.prefill_budget)
        self.runner.prefill_graph(chunk, self.state.select(0))
        torch.cuda.synchronize()

    def join(self, tokens: list[int], params: SamplingParams | None = None, state: State | None = None,
             sample_after: bool = True, logits: torch.Tensor | None = None, snapshots=(), on_snapshot=None) -> int:
        """Take a free slot; its state starts as `state` (or zeros) and reads `tokens` first.

        `logits` [V]: the distribution after `state` (then `tokens` may be empty). `on_snapshot(slot,
        n, state, logits)` is called once the slot has read n of `tokens`, for each n in `snapshots`
        (prompt reading is chunked to stop there; logits are given at the last token, else None)."""
        if not tokens and logits is None:
            raise InputError("a sequence needs at least one token to start from")
        self._check_tokens(tokens)
        try:
            i = self.slots.index(None)
        except ValueError:
            raise InputError(f"all {self.max_slots} slots are busy") from None
        if state is not None:
            self.model.check_state(state, 1)
        self.sampler.reset(i, params or SamplingParams())
        if state is not None:
            self._write_row(i, state.to(self.device))
        else:
            self._zero_row(i)
        self.live[i] = 0
        if logits is not None:
            self.logits[i].copy_(logits)
        self._joined += 1
        self.slots[i] = Slot(list(tokens), hold=not sample_after, tokens=state.tokens if state is not None else 0,
                             order=self._joined, epoch=self._next_epoch(), fresh=logits is not None and not tokens,
                             snapshots=sorted(n for n in set(snapshots) if 0 < n <= len(tokens)),
                             on_snapshot=on_snapshot)
        return i

    def feed(self, slot: int, tokens: list[int], sample_after: bool = True) -> None:
        """Queue more tokens for a slot to read (e.g. the end of a turn); they are read on the next steps.
        With sample_after=False the slot then holds: its state stays "everything read so far"."""
        s = self._slot(slot)
        self._check_tokens(tokens)
        self._halt(slot, s)
        s.pending.extend(tokens)
        s.hold = not sample_after

    def stop(self, slot: int) -> None:
        """The slot draws nothing more (its state keeps what it has read) until fed or left."""
        s = self._slot(slot)
        self._halt(slot, s)
        s.hold = True

    def leave(self, slot: int) -> State:
        """Free the slot and return its state (batch 1, on the engine's device)."""
        s = self._slot(slot)
        self._halt(slot, s)
        st = self._row_state(slot)
        self.slots[slot] = None
        return st

    def _row_state(self, i: int) -> State:
        """Slot i's state (batch 1) with the slot's token count: the engine's batch state is shared by
        sequences of different lengths, so each one's count is kept in its slot."""
        st = self.state.select(i)
        st.tokens = self.slots[i].tokens
        return st

    def busy(self, slot: int) -> bool:
        """Whether the slot still has tokens to read."""
        s = self._slot(slot)
        return bool(s.pending or s.forcing)

    def _halt(self, i: int, s: Slot) -> None:
        if s.decoding or s.forcing:
            self.live[i] = 0  # the token drawn for it last step is not read
        if s.forcing:  # prompt tokens not yet read go back to the queue
            s.pending[:0] = s.forced
            s.forced, s.forcing = [], False
        s.decoding = False
        s.epoch = self._next_epoch()

    def _next_epoch(self) -> int:
        """Epochs are unique over the engine's life: a draw made for an earlier sequence in the same
        slot can never pass for one of a later sequence."""
        self._epochs += 1
        return self._epochs

    # ------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """Advance every active slot by one step; return {slot: token} drawn by the previous step."""
        decoding = [i for i, s in enumerate(self.slots) if s is not None and s.decoding]
        forcing = [i for i, s in enumerate(self.slots) if s is not None and s.forcing]
        if decoding or forcing:
            self._decode(sorted(decoding + forcing))
        ready = self._forced_read(forcing) + self._prefill()
        for i in ready:
            self.live[i] = 1
            self.slots[i].decoding = True
        drawn = sorted(decoding + ready)
        launched = self._sample(drawn) if drawn else None
        out = self._collect()
        self._in_flight = launched
        return out

    def drain(self) -> dict[int, int]:
        """The tokens of the last step, without starting another (what `step` would return next)."""
        out = self._collect()
        self._in_flight = None
        return out

    def _decode(self, rows: list[int]) -> None:
        g = self._graph_for(max(rows) + 1)
        if g is not None:
            g.step()
            self.logits[:g.batch].copy_(g.logits)
        else:
            self._decode_eager(rows)
        self.forward_calls += 1
        for i in rows:
            self.slots[i].tokens += 1  # taken back if the token turns out to be end of text

    def _graph_for(self, rows: int):
        """The captured step covering the first `rows` rows (None: decode eagerly)."""
        b = 1
        while b < rows:
            b *= 2
        b = min(b, self.max_slots)
        if b not in self._graphs:
            st = self.state
            view = State(st.att_x[:, :b], st.wkv[:, :b], st.ffn_x[:, :b], st.fingerprint)
            self._graphs[b] = self.runner.decode_graph(b, view, self.next_tokens[:b], self.live[:b])
        return self._graphs[b]

    def _decode_eager(self, rows: list[int]) -> None:
        idx = self._index(rows)
        st = self.state
        sub = State(st.att_x.index_select(1, idx), st.wkv.index_select(1, idx), st.ffn_x.index_select(1, idx),
                    st.fingerprint)
        logits, new = self.net.forward(self.next_tokens.index_select(0, idx), sub, all_logits=False)
        keep = self.live.index_select(0, idx).bool()
        for old, part, upd in ((st.att_x, sub.att_x, new.att_x), (st.wkv, sub.wkv, new.wkv),
                               (st.ffn_x, sub.ffn_x, new.ffn_x)):
            mask = keep.view((1, -1) + (1,) * (upd.dim() - 2))
            old.index_copy_(1, idx, torch.where(mask, upd, part))
        self.logits.index_copy_(0, idx, logits.float())

    def _forced_read(self, rows: list[int]) -> list[int]:
        """After a decode step read one prompt token into each of `rows`: queue the next one, or
        (the prompt read) return the rows now ready to draw."""
        ready = []
        for i in rows:
            s = self.slots[i]
            s.forced.pop(0)  # read by this step's decode
            s.read += 1
            self._snapshot(i, s, None if s.forced else self.logits[i])
            if s.forced:
                self.next_tokens[i, 0] = s.forced[0]
                continue
            s.forcing = False
            if s.hold:
                self.live[i] = 0
            else:
                ready.append(i)
        return ready

    def _snapshot(self, i: int, s: Slot, logits) -> None:
        if s.snapshots and s.read == s.snapshots[0]:
            s.snapshots.pop(0)
            s.on_snapshot(i, s.read, self._row_state(i), logits)

    def _piece(self, n: int, chunk: int) -> int:
        """Tokens to read in one prefill forward: a full chunk (replayed from its captured graph on a
        GPU), else — in a many-slot engine whose decode step is captured — 0: the rest is read one
        token a step through the batched decode graph beside the decoding rows, never by an eager
        forward (thousands of launches, tens of ms at 1.5B, during which no row decodes). A
        single-sequence engine has no one to stall: it reads the rest in one eager forward."""
        if n >= chunk:
            return chunk
        if self.max_slots > 1 and self.device.type == "cuda" and self.runner.graph_error is None:
            return 0
        return n

    def _prefill(self) -> list[int]:
        """Read pending tokens, first come first served, up to the budget; the rows now ready to draw."""
        budget = self.prefill_budget
        chunk = self.prefill_chunk if budget is None else min(self.prefill_chunk, budget)
        ready = []
        waiting = sorted((s.order, i) for i, s in enumerate(self.slots)
                         if s is not None and (s.pending or (s.fresh and not s.hold)))
        for _, i in waiting:
            s = self.slots[i]
            while s.pending and (budget is None or budget > 0):
                n = min(chunk, len(s.pending)) if budget is None else min(chunk, len(s.pending), budget)
                if s.snapshots:
                    n = min(n, s.snapshots[0] - s.read)
                n = self._piece(n, chunk)
                if n == 0:  # the rest goes through the decode graph, a token a step
                    s.forced, s.pending, s.forcing = s.pending, [], True
                    self.next_tokens[i, 0] = s.forced[0]
                    self.live[i] = 1
                    break
                part, s.pending = s.pending[:n], s.pending[n:]
                ids = torch.tensor([part], dtype=torch.long, device=self.device)
                logits, new = self.runner.read(ids, self._row_state(i), chunk)
                self._write_row(i, new)
                self.logits[i].copy_(logits[0])
                s.tokens = new.tokens
                s.read += n
                if budget is not None:
                    budget -= n
                if s.snapshots and s.read == s.snapshots[0]:
                    s.snapshots.pop(0)
                    s.on_snapshot(i, s.read, new, None if s.pending else logits[0])
            if s.forced or s.forcing:
                continue
            if not s.pending and not s.hold:
                s.fresh = False
                ready.append(i)
        return ready

    def _sample(self, rows: list[int]):
        idx = self._index(rows)
        g = self._sample_graph(rows, idx)
        if g is not None:
            g.replay()
            tokens = self._sample_graphs[self.sampler.signature(rows)][1]
        else:
            tokens = self._draw(rows, idx)
        tags = [(i, self.slots[i].epoch) for i in rows]
        if self._pinned is None:
            return tokens, None, tags
        buf = self._pinned[self._flip][:len(rows)]
        self._flip ^= 1
        buf.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event, tags

    def _draw(self, rows: list[int], idx: torch.Tensor) -> torch.Tensor:
        tokens = self.sampler.draw(self.logits.index_select(0, idx), rows, idx, self.live)
        self.next_tokens.index_copy_(0, idx, tokens[:, None])
        self.live.index_copy_(0, idx, self.live.index_select(0, idx) * (tokens != END_OF_TEXT).int())
        return tokens

    def _sample_graph(self, rows: list[int], idx: torch.Tensor):
        """A single-sequence engine (`Model.stream`) replays its draw from a captured graph: its ~40
        small sampling ops would otherwise cost more host time than a small model's whole step.
        Captured once per sampling signature; None elsewhere (many-slot engines change rows often)."""
        if self.max_slots != 1 or self.device.type != "cuda" or self.runner.graph_error is not None:
            return None
        key = self.sampler.signature(rows)
        if key not in self._sample_graphs:
            try:
                self._sample_graphs[key] = self._capture_draw(rows, idx)
            except Exception as e:  # noqa: BLE001 - capture impossible here: draw eagerly (as the decode does)
                self.runner.graph_error = f"{type(e).__name__}: {e}"
                self._sample_graphs[key] = None
        entry = self._sample_graphs[key]
        return entry[0] if entry is not None else None

    def _capture_draw(self, rows: list[int], idx: torch.Tensor):
        mutated = self.sampler.state_tensors() + [self.next_tokens, self.live]
        saved = [t.clone() for t in mutated]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._draw(rows, idx)  # warm-up outside the capture (its effects are undone below)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tokens = self._draw(rows, idx)
        for t, v in zip(mutated, saved):
            t.copy_(v)
        return graph, tokens, idx  # idx kept alive: the graph reads it

    def _collect(self) -> dict[int, int]:
        if self._in_flight is None:
            return {}
        tokens, event, tags = self._in_flight
        if event is not None:
            event.synchronize()
        out = {}
        for (i, epoch), t in zip(tags, tokens.tolist()):
            s = self.slots[i]
            if s is None or s.epoch != epoch:
                continue  # the slot changed course since: this draw is never read
            out[i] = t
            if t == END_OF_TEXT:  # drawn with live = 0: the row did not read it
                s.tokens -= 1
                s.decoding = False
                s.hold = True
                s.epoch = self._next_epoch()
        return out

    # ------------------------------------------------------------------ helpers
    def _index(self, rows: list[int]) -> torch.Tensor:
        """rows as a device tensor; the last few sets are kept (the decoding rows rarely change)."""
        key = tuple(rows)
        idx = self._indices.get(key)
        if idx is None:
            idx = torch.tensor(rows, dtype=torch.long)
            if self.device.type == "cuda":  # a copy from pinned memory does not wait for the stream
                idx = idx.pin_memory().to(self.device, non_blocking=True)
            if len(self._indices) >= 64:
                self._indices.clear()
            self._indices[key] = idx
        return idx

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
