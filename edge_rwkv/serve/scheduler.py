"""Continuous batching: one thread owns the BatchEngine; requests join through a bounded queue.

A request becomes a `Job` (prompt tokens, sampling settings, optional starting state). The scheduler
thread runs a tight loop: admit waiting jobs into free slots (a prefix-state cache spares re-reading
a known prompt prefix), step the engine — decode, then at most `prefill_budget` prompt tokens, then
sample — and turn each slot's tokens into text through its job's TextStream (the same stream as
`Model.stream`). A job that ends is closed (a chat turn reads its blank line) and leaves its slot,
which the next waiting job takes before the next step. The text reaches the requests' event loop in
one hand-off per step; the loop never waits on a client.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from ..runtime.engine import BatchEngine
from ..runtime.prefix_cache import PrefixCache
from ..runtime.textstream import TURN_END, TextStream
from ..sampling import SamplingParams
from ..state import State

log = logging.getLogger("edge_rwkv.serve")


class Overloaded(Exception):
    pass


class Job:
    """One generation. Events on `events`: ("text", str), ("done", self), ("error", message).

    `boundaries`: prompt lengths after which the state is worth caching: the end of the system prompt
    (shared by every conversation that uses it) and of the last message (where the next request of the
    same conversation, resent whole, continues)."""

    def __init__(self, tokens: list[int], params: SamplingParams, tokenizer, loop: asyncio.AbstractEventLoop,
                 state: State | None = None, close_turn: bool = False, strip_leading: bool = False,
                 boundaries: tuple[int, ...] = ()):
        self.tokens, self.params, self.state = tokens, params, state
        self.close_turn = close_turn
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.stream = TextStream(tokenizer, params.stop, params.max_tokens, strip_leading)
        self.closing = False
        self.final_state: State | None = None
        self.prompt_tokens = len(tokens)
        self.boundaries = boundaries
        self.queued_at = time.monotonic()

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def generated(self) -> list[int]:
        return self.stream.tokens

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, model, max_slots: int, queue_size: int, prefill_budget: int | None = None,
                 prefix_cache_bytes: int = 0):
        self.model = model
        self.engine = BatchEngine(model, max_slots, prefill_budget=prefill_budget)
        self.queue_size = queue_size
        self.cache = PrefixCache(prefix_cache_bytes)
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._turn_end = model.tokenizer.encode(TURN_END)
        self._thread = threading.Thread(target=self._loop, name="edge-rwkv-scheduler", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self.engine.warm()  # graphs captured before the first request, not during it
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> None:
        with self._lock:
            waiting = sum(not j.cancelled for j in self._waiting)
            if len(self._running) + waiting >= self.engine.max_slots + self.queue_size:
                raise Overloaded()
            self._waiting.append(job)
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return {"slots": self.engine.max_slots, "slots_busy": len(self._running),
                    "queued": sum(not j.cancelled for j in self._waiting), "queue_size": self.queue_size,
                    "steps": self.steps, "prefix_cache": self.cache.stats()}

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._admit()
                self._drop_cancelled()
                if not self._running:
                    self.engine.drain()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                results = self.engine.step()
                self.steps += 1
                self._dispatch(results)
            except Exception as e:  # a bug or a device error: fail the running jobs, keep serving
                log.exception("scheduler step failed")
                with self._lock:
                    running, self._running = self._running, {}
                self._deliver([(job, "error", f"generation failed: {e}") for job in running.values()])
                for slot in running:
                    try:
                        self.engine.leave(slot)
                    except Exception:  # noqa: BLE001 - the slot is gone already
                        pass

    def _admit(self) -> None:
        failed = []
        with self._lock:
            while self._waiting and self.engine.free:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                try:
                    self._running[self._join(job)] = job
                except Exception as e:  # noqa: BLE001 - a bad state or prompt fails this request only
                    failed.append((job, "error", str(e)))
        self._deliver(failed)

    def _join(self, job: Job) -> int:
        tokens, state, logits = job.tokens, job.state, None
        if state is None and self.cache.max_bytes:
            hit = self.cache.lookup(tokens)
            if hit is not None:
                tokens, state, logits = tokens[hit.length:], hit.state, hit.logits
        skipped = len(job.tokens) - len(tokens)
        snapshots = [n - skipped for n in job.boundaries if n > skipped] if job.state is None and self.cache.max_bytes else ()
        return self.engine.join(tokens, job.params, state, sample_after=job.params.max_tokens > 0, logits=logits,
                                snapshots=snapshots,
                                on_snapshot=lambda slot, n, st, lg: self.cache.put(job.tokens[:n + skipped], st, lg))

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s, j in self._running.items() if j.cancelled]
            for s in gone:
                self.engine.leave(s)
                del self._running[s]

    def _dispatch(self, results: dict[int, int]) -> None:
        events, finished = [], []
        for slot, job in list(self._running.items()):
            if job.closing:
                if not self.engine.busy(slot):
                    finished.append(slot)
                continue
            if job.params.max_tokens == 0:
                if not self.engine.busy(slot):
                    job.stream.finish("length")
                    finished.append(slot)
                continue
            token = results.get(slot)
            if token is None:
                continue
            piece = job.stream.feed(token)
            if piece:
                events.append((job, "text", piece))
            if job.stream.done:
                if job.close_turn and not job.stream.closes_turn():
                    job.closing = True  # the state reads the turn's blank line before the slot is freed
                    self.engine.feed(slot, self._turn_end, sample_after=False)
                else:
                    finished.append(slot)
        for slot in finished:
            with self._lock:
                job = self._running.pop(slot)
                job.final_state = self.engine.leave(slot)
            events.append((job, "done", job))
        self._deliver(events)

    def _deliver(self, events: list) -> None:
        """Hand this step's events to the requests' event loop(s) in one call each: no waiting here."""
        by_loop: dict = {}
        for job, kind, payload in events:
            by_loop.setdefault(job.loop, []).append((job, kind, payload))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is gone (shutdown)
                for job, _, _ in items:
                    job.cancelled = True


def _put_all(items) -> None:
    for job, kind, payload in items:
        job.events.put_nowait((kind, payload))
