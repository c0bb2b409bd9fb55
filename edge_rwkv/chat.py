"""Multi-turn chat in the RWKV World prompt format, carrying the state between turns.

Each turn feeds only the new text: `User: <message>\\n\\nAssistant:`; the reply ends at a blank line
("\\n\\n"), which the state has then already read, so the next turn continues seamlessly.
"""
from __future__ import annotations

import re
from typing import Iterator

from .errors import InputError
from .state import State

TURN_END = "\n\n"


def clean_message(text: str) -> str:
    """Blank lines inside a message would read as a turn boundary; fold them as the reference demos do."""
    if not isinstance(text, str):
        raise InputError(f"message must be a string, got {type(text).__name__}")
    return re.sub(r"\n{2,}", "\n", text.strip().replace("\r\n", "\n"))


def user_turn(message: str, system: str | None = None) -> str:
    head = f"System: {clean_message(system)}{TURN_END}" if system else ""
    return f"{head}User: {clean_message(message)}{TURN_END}Assistant:"


class Chat:
    def __init__(self, model, system: str | None = None, state: State | None = None, **sampling):
        self.model = model
        self.system = system
        self.sampling = {"max_tokens": 500, "temperature": 1.0, "top_p": 0.3, "require_text": True, **sampling}
        self.sampling["stop"] = tuple(self.sampling.get("stop") or ()) + (TURN_END,)
        self.state = state.clone() if state is not None else None
        self.turns = 0

    def reset(self) -> None:
        self.state, self.turns = None, 0

    def send(self, message: str) -> Iterator[str]:
        """Stream the assistant's reply to `message`; the chat's state advances when the reply ends."""
        if not clean_message(message):
            raise InputError("message is empty")
        prompt = user_turn(message, self.system if self.turns == 0 and self.state is None else None)
        gen = self.model.stream(prompt, state=self.state, **self.sampling)
        first = True
        for piece in gen:
            if first:
                piece = piece.lstrip()
                first = not piece
            if piece:
                yield piece
        state = gen.state
        if gen.stop_matched != TURN_END:
            # The reply ended without a blank line (length limit / end of text): close the turn ourselves.
            _, state = self.model.forward(self.model.tokenizer.encode(TURN_END), state)
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

