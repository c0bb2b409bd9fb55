"""The RWKV World tokenizer: round trips, vocabulary size, UTF-8-safe streaming, range checks."""
from __future__ import annotations

import codecs

import pytest

from edge_rwkv import InputError
from edge_rwkv.tokenizer import END_OF_TEXT, VOCAB_SIZE, default_tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\nUser: hi\n\nAssistant:",
    "  leading and trailing spaces \t tabs\r\nwindows lines  ",
    "中文测试：今天天气很好。日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ❤️",
    "combining: e\u0301 a\u0308 n\u0303 — Zalgo: Z\u0351\u0352a\u0353l\u0354g\u0355o",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}  # comment\n\tif x != 0: print(f\"{x!r}\")\n",
    "math ∑∫√∞ ≠ ≤ ≥, arrows →←, currency €£¥₹, ß Ø Å ç",
    "Ελληνικά, Русский текст, العربية, עברית, हिन्दी, ไทย",
    "\x00\x01 control \x7f chars and a lone \u200b zero-width space",
]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 < i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_encode_empty_and_known_tokens(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    # single characters map to their own token in the World vocabulary
    assert tok.decode(tok.encode("a")) == "a" and len(tok.encode("a")) == 1
    assert tok.decode([END_OF_TEXT]) == ""


def test_vocabulary_has_65536_ids(tok):
    assert tok.vocab_size == VOCAB_SIZE == 65536
    tok.token_bytes(0), tok.token_bytes(65535)  # both ends are valid ids
    table = tok._bytes
    assert max(table) < 65536 and min(table) >= 1
    assert len(table) > 65000
    # every single byte is a token, so any byte string is encodable
    singles = {b for b in table.values() if len(b) == 1}
    assert len(singles) == 256


@pytest.mark.parametrize("bad", [-1, 65536, 70000, 2**40])
def test_out_of_range_ids_rejected(tok, bad):
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.token_bytes(bad)
    with pytest.raises(InputError):
        tok.decode([5, bad])
    with pytest.raises(InputError):
        tok.stream_decoder().feed(bad)


def test_encode_rejects_non_text(tok):
    for bad in (b"bytes", 5, None, ["a"]):
        with pytest.raises(InputError):
            tok.encode(bad)


# --------------------------------------------------------------------------- streaming

def _byte_token(tok, value: int) -> int:
    return next(i for i, b in tok._bytes.items() if b == bytes([value]))


def _partial_tokens(tok, limit=5):
    """Multi-byte tokens whose bytes end in an incomplete UTF-8 character (invalid UTF-8 alone)."""
    found = []
    for i, b in sorted(tok._bytes.items()):
        if len(b) < 2:
            continue
        try:
            b.decode("utf-8")
            continue
        except UnicodeDecodeError:
            pass
        dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
        try:
            dec.decode(b)  # valid so far, only the end is incomplete
        except UnicodeDecodeError:
            continue
        if dec.getstate()[0]:
            found.append(i)
        if len(found) >= limit:
            break
    return found


def _complete(tok, token_bytes: bytes) -> list[int]:
    """Byte tokens that finish the incomplete character at the end of `token_bytes`."""
    tail = []
    for _ in range(3):
        for cont in range(0x80, 0xC0):
            try:
                (token_bytes + bytes(tail + [cont])).decode("utf-8")
                return [_byte_token(tok, c) for c in tail + [cont]]
            except UnicodeDecodeError:
                pass
        tail.append(0x80 if not tail else tail[-1])
    raise AssertionError(f"cannot complete {token_bytes!r}")


def _stream(tok, tokens):
    dec = tok.stream_decoder()
    pieces = [dec.feed(t) for t in tokens]
    pieces.append(dec.flush())
    return pieces


def _assert_valid_pieces(pieces, expected):
    for p in pieces:
        assert isinstance(p, str)
        p.encode("utf-8")  # no lone surrogates: each piece is valid UTF-8 on its own
        assert "\ufffd" not in p, pieces
    assert "".join(pieces) == expected


def test_stream_split_character_from_vocab(tok):
    partial = _partial_tokens(tok)
    assert partial, "the vocabulary holds tokens that end inside a UTF-8 character"
    for t in partial:
        b = tok.token_bytes(t)
        with pytest.raises(UnicodeDecodeError):
            b.decode("utf-8")
        seq = tok.encode("x") + [t] + _complete(tok, b) + tok.encode(" ok")
        full = tok.decode(seq)
        assert "\ufffd" not in full
        pieces = _stream(tok, seq)
        _assert_valid_pieces(pieces, full)
        # the partial token itself releases nothing beyond the complete characters before it
        idx = seq.index(t)
        assert pieces[idx] == codecs.getincrementaldecoder("utf-8")().decode(b)


@pytest.mark.parametrize("text", ["你好，世界", "😀👍🏽", "naïve café", "a€b"])
def test_stream_one_byte_per_token(tok, text):
    """Every character split into single-byte tokens: pieces appear only when a character completes."""
    seq = [_byte_token(tok, b) for b in text.encode("utf-8")]
    pieces = _stream(tok, seq)
    _assert_valid_pieces(pieces, text)
    assert [p for p in pieces if p] == list(text)  # one piece per completed code point


@pytest.mark.parametrize("text", TEXTS[3:6], ids=range(3))
def test_stream_real_encoding(tok, text):
    ids = tok.encode(text)
    _assert_valid_pieces(_stream(tok, ids), text)


def test_stream_invalid_bytes_become_replacement_not_errors(tok):
    """A stream that ends inside a character (e.g. stopped by max_tokens) flushes a replacement character."""
    lead = _byte_token(tok, 0xE4)
    dec = tok.stream_decoder()
    assert dec.feed(tok.encode("ok")[0]) == "ok"
    assert dec.feed(lead) == ""
    assert dec.flush() == "\ufffd"
