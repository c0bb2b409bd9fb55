"""One sequence through the batch engine: `Model.stream` is an engine slot plus the text stream."""
from __future__ import annotations

from typing import Iterator

from ..sampling import SamplingParams
from ..state import State
from .textstream import TextStream


class Generation:
    """An iterator of text pieces. After it ends: `.state`, `.tokens`, `.finish_reason`, `.text`,
    `.stop_matched`. While it runs it holds one of the model's single-slot engines."""

    def __init__(self, model, prompt_tokens: list[int], state: State | None, params: SamplingParams,
                 strip_leading: bool = False):
        self.model, self.params = model, params
        self.prompt_tokens = prompt_tokens
        self.state = state
        self.stream = TextStream(model.tokenizer, params.stop, params.max_tokens, strip_leading)

    @property
    def tokens(self) -> list[int]:
        return self.stream.tokens

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    @property
    def stop_matched(self) -> str | None:
        return self.stream.stop_matched

    def closes_turn(self) -> bool:
        return self.stream.closes_turn()

    def __iter__(self) -> Iterator[str]:
        with self.model.single_engine() as eng:
            yield from self._run(eng)

    def run(self) -> str:
        for _ in self:
            pass
        return self.text

    def _run(self, eng) -> Iterator[str]:
        ts, p = self.stream, self.params
        slot = eng.join(self.prompt_tokens, p, self.state, sample_after=p.max_tokens > 0)
        try:
            if p.max_tokens == 0:
                while eng.busy(slot):
                    eng.step()
                ts.finish("length")
            while not ts.done:
                token = eng.step().get(slot)
                if token is not None:
                    piece = ts.feed(token)
                    if piece:
                        yield piece
        finally:
            self.state = eng.leave(slot)
