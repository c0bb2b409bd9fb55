"""Token ids in, text out — the one text stream of every face (Python API, CLI chat, daemon).

Text is released only as complete UTF-8 characters (a token may hold part of one); a tail that could
still grow into a stop string is held back until it can no longer match; the stream ends at end of
text, at a stop string (which is not part of the text) or at the token limit. A chat turn is closed
when the state has read the blank line that ends it: `closes_turn()` says whether the reply wrote it.
"""
from __future__ import annotations

from ..tokenizer import END_OF_TEXT

TURN_END = "\n\n"  # a chat turn ends at a blank line (RWKV World chat format)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """`feed(token) -> text released now`; `done` once the generation has ended, with `finish_reason`
    ("stop" or "length"), `stop_matched` (the stop string that ended it, if one did) and `tokens`
    (the tokens the state has read: every fed token but end of text)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), max_tokens: int | None = None,
                 strip_leading: bool = False):
        self.stop = tuple(stop)
        self.max_tokens = max_tokens
        self.strip_leading = strip_leading
        self._decoder = tokenizer.stream_decoder()
        self._pending = ""
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.stop_matched: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, token: int) -> str:
        if self.done:
            raise RuntimeError("the text stream has ended")
        if token == END_OF_TEXT:
            return self.finish("stop")
        self.tokens.append(token)
        self._pending += self._decoder.feed(token)
        hit, stop = min(((i, s) for s in self.stop if (i := self._pending.find(s)) >= 0), default=(-1, None))
        if hit >= 0:
            out = self._release(self._pending[:hit])
            self._pending = ""
            self.stop_matched, self.finish_reason = stop, "stop"
            return out
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            return self.finish("length")
        keep = held_back(self._pending, self.stop)
        out = self._release(self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def finish(self, reason: str) -> str:
        """End the stream (end of text, token limit, or the caller's own reason); release the tail."""
        if self.done:
            return ""
        tail = self._pending + self._decoder.flush()
        self._pending = ""
        self.finish_reason = reason
        return self._release(tail)

    def closes_turn(self) -> bool:
        """Whether the state has read the blank line that ends a chat turn (the reply stopped at it)."""
        return self.stop_matched == TURN_END

    def _release(self, piece: str) -> str:
        if self.strip_leading and not self.pieces:
            piece = piece.lstrip()
        if piece:
            self.pieces.append(piece)
        return piece
