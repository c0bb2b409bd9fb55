"""The RWKV World tokenizer (rwkv_vocab_v20230424, 65,536 ids; id 0 ends a text).

Encoding uses pyrwkv-tokenizer (a maintained Rust implementation). Decoding works on bytes from the
same vocabulary file, because one token may hold part of a UTF-8 character: streaming text is
released only once its bytes form complete characters.
"""
from __future__ import annotations

import ast
import codecs
from functools import lru_cache
from pathlib import Path

import pyrwkv_tokenizer

from .errors import InputError

VOCAB_SIZE = 65536
END_OF_TEXT = 0


class WorldTokenizer:
    name = "rwkv_vocab_v20230424"

    def __init__(self):
        self._enc = pyrwkv_tokenizer.RWKVTokenizer()
        self._bytes = _token_bytes(self._enc.vocab_filepath)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"text to encode must be str, got {type(text).__name__}")
        return list(self._enc.encode(text)) if text else []

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < VOCAB_SIZE:
            raise InputError(f"token id {token} is outside the vocabulary [0, {VOCAB_SIZE})")
        return self._bytes.get(token, b"")

    def decode_bytes(self, tokens) -> bytes:
        return b"".join(self.token_bytes(int(t)) for t in tokens)

    def decode(self, tokens) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def ids_containing(self, fragment: bytes) -> list[int]:
        """Every token whose bytes contain `fragment` (e.g. the turn separator b"\\n\\n")."""
        return _ids_containing(self._enc.vocab_filepath, fragment)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Feed tokens one at a time; get back only text made of complete UTF-8 characters."""

    def __init__(self, tok: WorldTokenizer):
        self._tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@lru_cache(maxsize=2)
def _token_bytes(vocab_path: str) -> dict[int, bytes]:
    table: dict[int, bytes] = {}
    for line in Path(vocab_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        idx = int(line[: line.index(" ")])
        literal = line[line.index(" ") + 1: line.rindex(" ")]
        if literal[:1] in "'\"" and "\\" not in literal:
            value = literal[1:-1]  # plain quoted text: no need for the (slow) literal parser
        else:
            value = ast.literal_eval(literal)
        table[idx] = value.encode("utf-8") if isinstance(value, str) else value
    return table


@lru_cache(maxsize=16)
def _ids_containing(vocab_path: str, fragment: bytes) -> list[int]:
    return [i for i, b in _token_bytes(vocab_path).items() if fragment in b]


@lru_cache(maxsize=1)
def default_tokenizer() -> WorldTokenizer:
    return WorldTokenizer()
