"""Continuous batching: one thread owns the BatchEngine; requests join through a bounded queue.

A request becomes a `Job` (prompt tokens, sampling settings, optional starting state). The
scheduler thread admits waiting jobs into free slots between steps, steps the engine, turns each
slot's tokens into text (stop strings, complete UTF-8 characters) and hands the pieces to the
request's asyncio queue. A cancelled job (client gone) leaves its slot at the next step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from ..chat import TURN_END
from ..engine import BatchEngine
from ..generate import held_back
from ..sampling import Sampler, SamplingParams
from ..state import State
from ..tokenizer import END_OF_TEXT

log = logging.getLogger("edge_rwkv.serve")


class Overloaded(Exception):
    pass


class Job:
    """One generation. Events on `events`: ("text", str), ("done", self), ("error", message)."""

    def __init__(self, tokens: list[int], params: SamplingParams, tokenizer, loop: asyncio.AbstractEventLoop,
                 state: State | None = None, close_turn: bool = False, strip_leading: bool = False):
        self.tokens, self.params, self.state = tokens, params, state
        self.close_turn, self.strip_leading = close_turn, strip_leading
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.sampler = Sampler(params)
        self.decoder = tokenizer.stream_decoder()
        self._tok = tokenizer
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self._pending = ""
        self.finish_reason: str | None = None
        self.closing = False
        self.final_state: State | None = None
        self.prompt_tokens = len(tokens)
        self.queued_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, kind: str, payload) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled = True

    def _text(self, piece: str) -> None:
        if self.strip_leading and not self.pieces:
            piece = piece.lstrip()
        if piece:
            self.pieces.append(piece)
            self._emit("text", piece)

    def on_token(self, token: int) -> bool:
        """Take the slot's next token; True when the generation has ended."""
        p = self.params
        if token == END_OF_TEXT:
            self.finish_reason = "stop"
            self._flush()
            return True
        self.generated.append(token)
        self._pending += self.decoder.feed(token)
        hit = min((i for i in (self._pending.find(s) for s in p.stop) if i >= 0), default=-1)
        if hit >= 0:
            if hit:
                self._text(self._pending[:hit])
            self._pending = ""
            self.finish_reason = "stop"
            return True
        keep = held_back(self._pending, p.stop)
        if len(self._pending) > keep:
            self._text(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
        if len(self.generated) >= p.max_tokens:
            self.finish_reason = "length"
            self._flush()
            return True
        return False

    def _flush(self) -> None:
        tail = self._pending + self.decoder.flush()
        self._pending = ""
        if tail:
            self._text(tail)

    def needs_turn_end(self) -> bool:
        """A chat turn must end with a blank line read by the state; add one unless the reply wrote it."""
        if not self.close_turn:
            return False
        if self.finish_reason == "stop" and self.generated and self.generated[-1] != END_OF_TEXT:
            return TURN_END not in self._tok.decode(self.generated[-4:])
        return True


class Scheduler:
    def __init__(self, model, max_slots: int, queue_size: int):
        self.model = model
        self.engine = BatchEngine(model, max_slots)
        self.queue_size = queue_size
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._turn_end = model.tokenizer.encode(TURN_END)
        self._thread = threading.Thread(target=self._loop, name="edge-rwkv-scheduler", daemon=True)
        self.steps = 0

    def start(self) -> None:
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
                    "steps": self.steps}

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._admit()
                self._drop_cancelled()
                if not self._running:
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
                for slot, job in running.items():
                    job._emit("error", f"generation failed: {e}")
                    try:
                        self.engine.leave(slot)
                    except Exception:
                        pass

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self.engine.free:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                try:
                    slot = self.engine.join(job.tokens, state=job.state, sampler=job.sampler)
                except Exception as e:
                    job._emit("error", str(e))
                    continue
                self._running[slot] = job

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s, j in self._running.items() if j.cancelled]
            for s in gone:
                self.engine.leave(s)
                del self._running[s]

    def _dispatch(self, results: dict[int, int]) -> None:
        finished = []
        for slot, job in list(self._running.items()):
            if job.closing:
                if not self.engine.busy(slot):
                    finished.append(slot)
                continue
            token = results.get(slot)
            if token is None:
                continue
            if job.on_token(token):
                if job.needs_turn_end():
                    job.closing = True
                    self.engine.feed(slot, self._turn_end, sample_after=False)
                else:
                    finished.append(slot)
        for slot in finished:
            with self._lock:
                job = self._running.pop(slot)
                job.final_state = self.engine.leave(slot)
            job._emit("done", job)
