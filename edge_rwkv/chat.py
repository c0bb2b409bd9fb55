"""Multi-turn chat in the RWKV World prompt format, carrying the state between turns.

Each turn feeds only the new text: `User: <message>\\n\\nAssistant:`; the reply ends at a blank line
("\\n\\n"), which the state has then already read, so the next turn continues seamlessly.
"""
from __future__ import annotations

import re
from typing import Iterator

from .errors import InputError
from .runtime.textstream import TURN_END
from .state import State

CHAT_DEFAULTS = {"max_tokens": 500, "temperature": 1.0, "top_p": 0.3, "require_text": True}


def clean_message(text: str) -> str:
    """Blank lines inside a message would read as a turn boundary; fold them as the reference demos do."""
    if not isinstance(text, str):
        raise InputError(f"message must be a string, got {type(text).__name__}")
    return re.sub(r"\n{2,}", "\n", text.strip().replace("\r\n", "\n"))


ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def conversation_segments(messages: list[dict]) -> list[str]:
    """A conversation in the chat format, one segment per message, then the reply's "Assistant:".

    Segments are encoded one by one (`encode_segments`), so the state after any message is the state
    after a prefix of the tokens: a cached state can continue any later prompt sharing that history."""
    parts = [f"{ROLE_NAMES[m['role']]}: {clean_message(m['content'])}{TURN_END}" for m in messages
             if clean_message(m["content"])]
    return parts + ["Assistant:"]


def user_turn(message: str, system: str | None = None) -> list[str]:
    """The segments of one user turn (with the system prompt before it, if given)."""
    head = [{"role": "system", "content": system}] if system else []
    return conversation_segments(head + [{"role": "user", "content": message}])


def encode_segments(tokenizer, segments: list[str]) -> tuple[list[int], tuple[int, ...]]:
    """(tokens, token count at the end of each segment but the last)."""
    tokens: list[int] = []
    ends = []
    for seg in segments:
        tokens += tokenizer.encode(seg)
        ends.append(len(tokens))
    return tokens, tuple(ends[:-1])


class Chat:
    def __init__(self, model, system: str | None = None, state: State | None = None, **sampling):
        self.model = model
        self.system = system
        self.sampling = {**CHAT_DEFAULTS, **sampling}
        self.sampling["stop"] = tuple(self.sampling.get("stop") or ()) + (TURN_END,)
        self.state = state.clone() if state is not None else None
        self.turns = 0

    def reset(self) -> None:
        self.state, self.turns = None, 0

    def send(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply to `message`; the chat's state advances when the reply ends."""
        if not clean_message(message):
            raise InputError("message is empty")
        segments = user_turn(message, self.system if self.turns == 0 and self.state is None else None)
        prompt, _ = encode_segments(self.model.tokenizer, segments)
        gen = self.model.stream(prompt, state=self.state, strip_leading=True, **self.sampling)
        yield from gen
        state = gen.state
        if not gen.closes_turn():
            # The reply ended without a blank line (length limit / end of text): close the turn ourselves.
            _, state = self.model.runner.prefill(self.model.tokenizer.encode(TURN_END), state)
        self.state = state
        self.turns += 1

    def ask(self, message: str) -> str:
        return "".join(self.send(message))

    def save(self, path) -> None:
        if self.state is None:
            raise InputError("nothing to save yet: the chat has no turns")
        self.state.save(path)

    def load(self, path) -> None:
        self.state = self.model.load_state(path)
        self.turns = 1

