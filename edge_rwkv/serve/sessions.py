"""Durable chat sessions: a state file, a small metadata file and an append-only transcript per session.

    <data>/sessions/<id>.state   the conversation state after its last completed turn (atomic write:
                                 temp file + fsync + rename, checksum, model fingerprint)
    <data>/sessions/<id>.json    metadata: title, system prompt, turn count, tokens, and the transcript's
                                 last messages (a bounded tail: this file never grows with the conversation)
    <data>/sessions/<id>.jsonl   the whole transcript, one line per turn, only ever appended to

The state file is the source of truth for a completed turn. A turn is committed in four steps: the
metadata with the turn marked `pending` (its state token count and the transcript's length before
it), the turn appended to the transcript, the state file, then the metadata with the turn applied. A
crash between any two leaves the old or the new state whole, and reading the session reconciles
the rest with the state file: a pending turn is applied if the state file has it; if not, it is
dropped and the transcript cut back to its length before the turn.

A fork writes its metadata first, marked `forking`, then its transcript and state, then the metadata
without the mark: a session still marked is a fork that never completed, and reading removes it.
A delete marks the metadata `deleting` first and removes it last, so a delete cut short finishes on
the next read instead of leaving a state file that would bring the session back.

Metadata that cannot be read (damaged, over the size limit, of the wrong shape) never hides a
session: it is rebuilt from the state file and the transcript (the damaged file is kept beside it
as `.<id>.json.broken`). The session files are private to the daemon's user (0600, folder 0700).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..errors import StateError
from ..fileio import atomic_write_bytes, fsync_dir
from ..schema import ANY, Int, List, Num, Obj, Opt, SchemaError, Str, load_json
from ..state import State, read_state_header
from .protocol import MAX_TITLE_CHARS, ROLES, SESSION_ID, APIError

log = logging.getLogger("edge_rwkv.serve")

MAX_META_BYTES = 4 << 20  # larger than any metadata this store writes (title, system and tail are capped)
TAIL_MESSAGES = 50  # messages kept in the metadata (the transcript file and the state keep everything)
TAIL_CHARS = 8192  # characters of each message kept in the tail
FILE_MODE, DIR_MODE = 0o600, 0o700
LIST_LIMIT = 1000

_MESSAGE = Obj({"role": Str(16, choices=ROLES), "content": Str(1 << 24)})
# What reading accepts (more than this store writes: sessions of earlier versions had longer tails
# and a pending turn that carried its messages).
META_SCHEMA = Obj({
    "id": Str(64), "created": Num(), "updated": Num(), "title": Str(1 << 20), "system": Opt(Str(1 << 22)),
    "parent": Opt(Str(64)), "turns": Opt(Int(0)), "tokens": Int(0, (1 << 63) - 1), "fingerprint": Str(256),
    "messages": List(_MESSAGE, 10_000), "message_count": Int(0),
    "pending": Obj({"state_tokens": Int(0), "time": Num(), "id": Str(64), "offset": Int(0),
                    "messages": List(_MESSAGE, 64)}, optional=frozenset({"id", "offset", "messages"})),
    "forking": ANY, "deleting": ANY, "recovered": ANY,
}, optional=frozenset({"system", "parent", "message_count", "pending", "forking", "deleting", "recovered"}))


def not_found(sid: str) -> APIError:
    return APIError(404, f"session '{sid}' does not exist", "not_found_error", "session", "session_not_found")


class SessionStore:
    def __init__(self, data_dir: str | os.PathLike, model, hot: int = 64, max_sessions: int | None = None):
        self.dir = Path(data_dir) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        with contextlib.suppress(OSError):
            os.chmod(self.dir, DIR_MODE)  # transcripts are private, whatever the umask made of the folder
        self.model = model
        self.hot_max = max(0, hot)
        self.max_sessions = max_sessions
        self._hot: OrderedDict[str, State] = OrderedDict()
        self._lock = threading.RLock()
        self._clean_temp_files()

    # ------------------------------------------------------------------ paths
    def _meta_path(self, sid: str) -> Path:
        if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):  # never build a path from an unchecked id
            raise APIError(400, "invalid session id", param="session", code="invalid_session_id")
        return self.dir / f"{sid}.json"

    def _state_path(self, sid: str) -> Path:
        return self._meta_path(sid).with_suffix(".state")

    def _transcript_path(self, sid: str) -> Path:
        return self._meta_path(sid).with_suffix(".jsonl")

    def _clean_temp_files(self) -> None:
        # this store owns the folder (one daemon per data folder): any temp file is left by a crash
        for p in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()

    # ------------------------------------------------------------------ metadata
    def _write_meta(self, meta: dict) -> None:
        atomic_write_bytes(self._meta_path(meta["id"]), json.dumps(meta, ensure_ascii=False, indent=1).encode(),
                           mode=FILE_MODE)

    def _read_meta_raw(self, sid: str) -> dict:
        p = self._meta_path(sid)
        try:
            if p.stat().st_size > MAX_META_BYTES:
                raise SchemaError(f"{p.stat().st_size} bytes is over the limit of {MAX_META_BYTES}")
            meta = load_json(p.read_bytes())
            META_SCHEMA.check(meta, "")
            if meta["id"] != sid:
                raise SchemaError(f"id is {meta['id']!r}")
            return meta
        except FileNotFoundError:
            raise not_found(sid) from None
        except SchemaError as e:
            return self._rebuild(sid, f"metadata unreadable ({e})")

    def _rebuild(self, sid: str, why: str) -> dict:
        """Metadata made again from the state file and the transcript (the damaged file kept aside)."""
        log.warning("session %s: %s; rebuilt from its state file and transcript", sid, why)
        with contextlib.suppress(OSError):
            os.replace(self._meta_path(sid), self.dir / f".{sid}.json.broken")
        meta = self._blank(sid)
        tokens = self._state_tokens(sid)
        meta["recovered"] = True
        meta["turns"] = 0 if tokens is None else None  # no state file: no completed turn; else unknown
        meta["tokens"] = max(tokens or 0, 0)
        meta["messages"] = self._transcript_tail(sid)
        self._write_meta(meta)
        return meta

    def _state_tokens(self, sid: str) -> int | None:
        """Token count recorded in the state file's header (None without a state file, -1 if unreadable)."""
        try:
            return read_state_header(self._state_path(sid))["tokens"]
        except FileNotFoundError:
            return None
        except (StateError, OSError):
            return -1

    def _reconcile(self, meta: dict) -> dict:
        sid = meta["id"]
        if meta.get("forking") or meta.get("deleting"):  # a fork never completed, a delete cut short
            self._remove_files(sid)
            raise not_found(sid)
        tokens = self._state_tokens(sid)
        pending = meta.pop("pending", None)
        changed = pending is not None
        if pending and tokens == pending["state_tokens"]:
            messages = pending.get("messages")
            if messages is None:
                messages = self._read_turn(sid, pending.get("offset", 0))
            self._apply(meta, {"messages": messages, "state_tokens": pending["state_tokens"], "time": pending["time"]})
        elif pending:  # the state never got this turn: neither does the transcript
            self._cut_transcript(sid, pending.get("offset"))
        elif tokens is not None and tokens >= 0 and tokens != meta.get("tokens"):
            meta["tokens"], meta["recovered"] = tokens, True
            changed = True
        if changed:
            self._write_meta(meta)
        return meta

    @staticmethod
    def _apply(meta: dict, turn: dict) -> None:
        meta["turns"] = (meta.get("turns") or 0) + 1
        meta["tokens"] = turn["state_tokens"]
        meta["messages"] = tail(meta.get("messages", []) + turn["messages"])
        meta["message_count"] = meta.get("message_count", 0) + len(turn["messages"])
        meta["updated"] = turn["time"]
        if not meta.get("title"):
            first = next((m["content"] for m in turn["messages"] if m["role"] == "user"), "")
            meta["title"] = first.strip().splitlines()[0][:60] if first.strip() else ""

    def _blank(self, sid: str) -> dict:
        now = time.time()
        return {"id": sid, "object": "session", "created": now, "updated": now, "title": "", "system": None,
                "parent": None, "turns": 0, "tokens": 0, "fingerprint": self.model.fingerprint, "messages": [],
                "message_count": 0}

    @staticmethod
    def public(meta: dict, messages: bool = True) -> dict:
        out = {k: v for k, v in meta.items() if k not in ("pending", "forking", "deleting")}
        out["object"] = "session"
        if not messages:
            out.pop("messages", None)
        return out

    # ------------------------------------------------------------------ transcript
    def _append_turn(self, sid: str, record: dict) -> int:
        """Append one turn to the transcript (fsync'd); returns the file's length before it."""
        line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
        fd = os.open(self._transcript_path(sid), os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return start

    def _transcript_size(self, sid: str) -> int:
        try:
            return self._transcript_path(sid).stat().st_size
        except FileNotFoundError:
            return 0

    def _cut_transcript(self, sid: str, offset: int | None) -> None:
        p = self._transcript_path(sid)
        if offset is not None and self._transcript_size(sid) > offset:
            os.truncate(p, offset)

    def _read_turn(self, sid: str, offset: int) -> list[dict]:
        try:
            with open(self._transcript_path(sid), "rb") as f:
                f.seek(offset)
                return _turn_messages(f.readline())
        except FileNotFoundError:
            return []

    def _transcript_tail(self, sid: str) -> list[dict]:
        """The last messages of the transcript, reading at most its last MAX_META_BYTES."""
        try:
            with open(self._transcript_path(sid), "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - MAX_META_BYTES))
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        if size > MAX_META_BYTES:
            lines = lines[1:]  # the first line may be cut
        return tail([m for line in lines for m in _turn_messages(line)])

    def messages(self, sid: str, offset: int = 0, limit: int = 100) -> dict:
        """One page of the whole transcript (read line by line: memory bounded by the page)."""
        with self._lock:
            meta = self.get(sid)
            p = self._transcript_path(sid)
            if not p.exists():  # a session of an earlier version, or without a turn yet
                msgs = meta.get("messages", [])
                return {"object": "list", "data": msgs[offset:offset + limit], "offset": offset,
                        "has_more": offset + limit < len(msgs)}
            out, seen, more = [], 0, False
            with open(p, "rb") as f:
                for line in f:
                    for m in _turn_messages(line):
                        if seen >= offset + limit:
                            more = True
                            break
                        if seen >= offset:
                            out.append(m)
                        seen += 1
                    if more:
                        break
        return {"object": "list", "data": out, "offset": offset, "has_more": more}

    # ------------------------------------------------------------------ operations
    def new_id(self) -> str:
        return "s" + secrets.token_hex(12)

    def _entries(self) -> dict[str, float]:
        """Session id → last modification time, from the folder listing alone (no file is read)."""
        out: dict[str, float] = {}
        for e in os.scandir(self.dir):
            for suffix in (".json", ".state"):
                if e.name.endswith(suffix) and SESSION_ID.fullmatch(e.name[:-len(suffix)]):
                    with contextlib.suppress(OSError):
                        sid = e.name[:-len(suffix)]
                        out[sid] = max(out.get(sid, 0.0), e.stat().st_mtime)
        return out

    def _check_room(self) -> None:
        if self.max_sessions is not None and len(self._entries()) >= self.max_sessions:
            raise APIError(409, f"this server keeps at most {self.max_sessions} sessions; delete one first",
                           param=None, code="too_many_sessions")

    def create(self, sid: str | None = None, system: str | None = None, title: str | None = None) -> dict:
        with self._lock:
            sid = sid or self.new_id()
            if self.exists(sid):
                raise APIError(409, f"session '{sid}' already exists", param="id", code="session_exists")
            self._check_room()
            self._transcript_path(sid).unlink(missing_ok=True)  # left by a delete interrupted by a crash
            meta = self._blank(sid)
            meta["system"], meta["title"] = system or None, title or ""
            self._write_meta(meta)
            return meta

    def get(self, sid: str) -> dict:
        with self._lock:
            if not self._meta_path(sid).exists():
                if self._state_path(sid).exists():  # metadata lost: the state still makes the session
                    return self._rebuild(sid, "metadata missing")
                raise not_found(sid)
            return self._reconcile(self._read_meta_raw(sid))

    def list(self, limit: int = 100, after: str | None = None) -> dict:
        """A page of sessions, most recently changed first. A session that cannot be read is reported in
        `broken` (id and reason) and never stops the others from being listed."""
        entries = self._entries()
        order = sorted(entries, key=lambda s: (-entries[s], s))
        start = 0
        if after is not None:
            if after not in entries:
                raise APIError(400, f"'after': session '{after}' does not exist", param="after",
                               code="invalid_value")
            start = order.index(after) + 1
        data, broken = [], []
        for sid in order[start:start + limit]:
            try:
                data.append(self.public(self.get(sid), messages=False))
            except APIError as e:
                if e.status != 404:  # 404: removed meanwhile (or a fork that never completed)
                    broken.append({"id": sid, "error": e.message})
            except Exception as e:  # noqa: BLE001 — one session's fault must not hide the others
                log.exception("session %s cannot be listed", sid)
                broken.append({"id": sid, "error": f"{type(e).__name__}: {e}"[:300]})
        return {"object": "list", "data": data, "broken": broken, "total": len(order),
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
                "has_more": start + limit < len(order)}

    def exists(self, sid: str) -> bool:
        return self._meta_path(sid).exists() or self._state_path(sid).exists()

    def load_state(self, sid: str) -> State | None:
        """The state after the session's last completed turn (None: no turn yet)."""
        with self._lock:
            if sid in self._hot:
                self._hot.move_to_end(sid)
                return self._hot[sid].clone()
            if not self.exists(sid):
                raise not_found(sid)
            p = self._state_path(sid)
            if not p.exists():
                return None
            try:
                st = State.load(p, device="cpu", expect_fingerprint=self.model.fingerprint)
            except StateError as e:
                raise APIError(409, f"session '{sid}' cannot be continued: {e}", param="session",
                               code="session_state_unusable") from None
            self._remember(sid, st)
            return st.clone()

    def _remember(self, sid: str, st: State) -> None:
        if self.hot_max:
            self._hot[sid] = st.to("cpu").clone()
            self._hot.move_to_end(sid)
            while len(self._hot) > self.hot_max:
                self._hot.popitem(last=False)

    def _save_state(self, sid: str, state: State) -> None:
        atomic_write_bytes(self._state_path(sid), state.to("cpu").to_bytes(), mode=FILE_MODE)

    def commit_turn(self, sid: str, state: State, messages: list[dict]) -> dict:
        """Make a completed turn durable: pending metadata → transcript → state file → applied metadata."""
        with self._lock:
            meta = self._reconcile(self._read_meta_raw(sid))
            if not self._transcript_path(sid).exists() and meta.get("messages"):
                # a session of an earlier version kept its transcript in the metadata: carry it over first
                self._append_turn(sid, {"turn": "earlier", "time": meta.get("updated"), "messages": meta["messages"]})
            turn = {"id": secrets.token_hex(8), "state_tokens": int(state.tokens), "time": time.time(),
                    "offset": self._transcript_size(sid)}
            meta["pending"] = turn
            self._write_meta(meta)
            self._append_turn(sid, {"turn": turn["id"], "time": turn["time"], "messages": messages})
            self._save_state(sid, state)
            self._remember(sid, state)
            meta.pop("pending")
            self._apply(meta, {"messages": messages, "state_tokens": turn["state_tokens"], "time": turn["time"]})
            self._write_meta(meta)
            return meta

    def fork(self, src: str, sid: str | None = None, title: str | None = None) -> dict:
        with self._lock:
            meta = self.get(src)
            sid = sid or self.new_id()
            if self.exists(sid):
                raise APIError(409, f"session '{sid}' already exists", param="id", code="session_exists")
            self._check_room()
            st = self.load_state(src)
            now = time.time()
            new = dict(meta, id=sid, parent=src, created=now, updated=now,
                       title=title or (f"{meta.get('title') or src} (fork)")[:MAX_TITLE_CHARS])
            new.pop("recovered", None)
            self._write_meta(dict(new, forking=True))  # until the mark is gone, the fork does not exist
            if self._transcript_path(src).exists():
                atomic_write_bytes(self._transcript_path(sid), self._transcript_path(src).read_bytes(),
                                   mode=FILE_MODE)
            else:
                self._transcript_path(sid).unlink(missing_ok=True)
            if st is not None:
                self._save_state(sid, st)
            self._write_meta(new)
            if st is not None:
                self._remember(sid, st)
            return new

    def _remove_files(self, sid: str) -> None:
        """The metadata last: until it is gone, its mark says the removal is to be finished."""
        self._hot.pop(sid, None)
        for p in (self._state_path(sid), self._transcript_path(sid), self._meta_path(sid)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        fsync_dir(self.dir)

    def delete(self, sid: str) -> None:
        with self._lock:
            if not self.exists(sid):
                raise not_found(sid)
            self._write_meta(dict(self._blank(sid), deleting=True))
            self._remove_files(sid)


def tail(messages: list[dict]) -> list[dict]:
    """The last TAIL_MESSAGES messages, each cut to TAIL_CHARS characters (marked `truncated`)."""
    out = []
    for m in messages[-TAIL_MESSAGES:]:
        if len(m["content"]) > TAIL_CHARS:
            m = {"role": m["role"], "content": m["content"][:TAIL_CHARS], "truncated": True}
        out.append(m)
    return out


def _turn_messages(line: bytes) -> list[dict]:
    """The messages of one transcript line ([] for a damaged or partial line)."""
    try:
        rec = json.loads(line)
        msgs = rec["messages"]
        _MESSAGE_LIST.check(msgs, "messages")
        return msgs
    except (ValueError, KeyError, TypeError, SchemaError, RecursionError):
        return []


_MESSAGE_LIST = List(_MESSAGE, 1 << 16)
