"""Request checking and response shapes for the OpenAI-compatible endpoints.

Every bad request becomes an `APIError` (status 4xx) with an OpenAI-style body:
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field

from ..chat import CHAT_DEFAULTS, clean_message

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # always used with fullmatch
STATE_NAME = SESSION_ID  # names of the daemon's initial states (file stems): the same safe alphabet
ROLES = ("system", "user", "assistant")
MAX_TITLE_CHARS = 256
MAX_SYSTEM_CHARS = 32768


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:  # lone surrogates ("\\ud800") parse but are not text: refuse them before they reach a file
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        raise APIError(400, "request body contains invalid Unicode text", code="invalid_json") from None
    return body


def optional_text(body: dict, key: str, max_chars: int) -> str | None:
    """A string field of at most `max_chars` characters, or None when absent."""
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad(f"'{key}' must be a string", key, "invalid_type")
    if len(v) > max_chars:
        raise bad(f"'{key}' is longer than {max_chars} characters", key, "string_too_long")
    return v


def check_session_id(sid, param: str = "session") -> str:
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise bad("session id must be 1-64 characters of letters, digits, '_' or '-', starting with a letter "
                  "or digit", param, "invalid_session_id")
    return sid


# --------------------------------------------------------------------------- field readers

def _number(body, key, default, lo=None, hi=None, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{key}' must be a number", key, "invalid_type")
    try:
        v = float(v)  # an integer of hundreds of digits does not fit: OverflowError
    except OverflowError:
        raise bad(f"'{key}' is out of range", key) from None
    if not math.isfinite(v):
        raise bad(f"'{key}' must be a finite number", key, "invalid_type")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{key}' must be {'>' if lo_open else '≥'} {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be ≤ {hi}, got {v}", key)
    return float(v)


def _int(body, key, default, lo=None, hi=None, hi_code="invalid_value"):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer", key, "invalid_type")
    if lo is not None and v < lo:
        raise bad(f"'{key}' must be ≥ {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be ≤ {hi}, got {v}", key, hi_code)
    return v


def _bool(body, key, default=False):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean", key, "invalid_type")
    return v


def _stop(body) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 4 or not all(isinstance(s, str) and s for s in v):
        raise bad("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop", "invalid_type")
    return tuple(v)


@dataclass
class GenRequest:
    """What both endpoints share once checked."""
    model: str
    stream: bool
    include_usage: bool
    sampling: dict
    session: str | None = None
    initial_state: str | None = None  # a name from the daemon's --init-states folder
    messages: list[dict] = field(default_factory=list)
    prompt: str | list[int] | None = None


def parse_common(body: dict, limits, defaults: dict | None = None) -> GenRequest:
    """`defaults`: sampling settings a request does not set (chat replies use `edge-rwkv chat`'s)."""
    defaults = defaults or {}
    model = body.get("model", "")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    n = _int(body, "n", 1)
    if n != 1:
        raise bad("only n=1 is supported", "n")
    for key in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "suffix"):
        if body.get(key) not in (None, False, [], {}):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(so or {}, "include_usage")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, min(defaults.get("max_tokens", limits.default_max_tokens), limits.max_tokens_limit),
                      1, limits.max_tokens_limit)
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    sampling = dict(
        temperature=_number(body, "temperature", defaults.get("temperature", 1.0), 0.0, 100.0),
        top_p=_number(body, "top_p", defaults.get("top_p", limits.default_top_p), 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, 0, 1 << 31),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        max_tokens=max_tokens, stop=_stop(body), seed=seed,
        require_text=defaults.get("require_text", False),
    )
    initial = body.get("initial_state")
    if initial is not None and (not isinstance(initial, str) or not STATE_NAME.fullmatch(initial)):
        raise bad("'initial_state' must be the name of one of the server's initial states (see /v1/models)",
                  "initial_state", "invalid_type" if not isinstance(initial, str) else "invalid_value")
    return GenRequest(model or "", stream, include_usage, sampling, initial_state=initial)


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts are supported", f"messages[{i}].content", "invalid_type")
            parts.append(part["text"])
        c = "\n".join(parts)
    if not isinstance(c, str):
        raise bad("message content must be a string", f"messages[{i}].content", "invalid_type")
    return c


def parse_chat(body: dict, limits) -> GenRequest:
    req = parse_common(body, limits, CHAT_DEFAULTS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type" if not isinstance(msgs, list) else "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad("each message must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise bad(f"message role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    req.messages = out
    sid = body.get("session")
    if sid is not None:
        req.session = check_session_id(sid)
        if out[-1]["role"] != "user" or not clean_message(out[-1]["content"]):
            raise bad("with a session, the last message must be a non-empty user message (the new turn)", "messages")
    elif not any(m["role"] == "user" for m in out):
        raise bad("'messages' needs at least one user message", "messages")
    return req


def parse_completion(body: dict, limits, vocab_size: int) -> GenRequest:
    req = parse_common(body, limits)
    if body.get("echo"):
        raise bad("'echo' is not supported by this server", "echo", "unsupported_parameter")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' must not be empty", "prompt")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad_ids = [t for t in p if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad(f"token id {bad_ids[0]} is outside the vocabulary [0, {vocab_size})", "prompt", "invalid_token")
    else:
        raise bad("'prompt' must be a non-empty string or a non-empty list of token ids (one prompt per request)",
                  "prompt", "invalid_type")
    req.prompt = p
    return req


# --------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(rid, created, model, delta=None, finish_reason=None, usage_=None, session=None) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [] if delta is None and finish_reason is None else
         [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        d["usage"] = usage_
    if session:
        d["session"] = session
    return d


def chat_response(rid, model, text, finish_reason, usage_, session=None) -> dict:
    d = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
         "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}],
         "usage": usage_}
    if session:
        d["session"] = session
    return d


def completion_chunk(rid, created, model, text=None, finish_reason=None, usage_=None) -> dict:
    d = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [] if text is None and finish_reason is None else
         [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        d["usage"] = usage_
    return d


def completion_response(rid, model, text, finish_reason, usage_) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
