"""Durable chat sessions: one state file and one small JSON file per session under the data folder.

    <data>/sessions/<id>.state   the conversation state after its last completed turn (State.save:
                                 temp file + fsync + rename, checksum, model fingerprint)
    <data>/sessions/<id>.json    metadata: title, system prompt, turn count, tokens, transcript

The state file is the source of truth for a completed turn. A turn is committed in three atomic
writes: the metadata with the turn marked `pending` (its transcript and the token count the new
state will have), the state file, then the metadata with the turn applied. A crash between any two
leaves the old or the new state whole, and reading the session reconciles the metadata with the
state file (a pending turn is applied if the state file has it, dropped if not). A session without a
state file has no completed turn yet. A hot LRU keeps recent states in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..errors import StateError
from ..fileio import atomic_write_bytes
from ..state import State
from .protocol import SESSION_ID, APIError

MAX_META_BYTES = 4 << 20
MAX_TRANSCRIPT = 400  # messages kept in the metadata (the state remembers everything regardless)


def not_found(sid: str) -> APIError:
    return APIError(404, f"session '{sid}' does not exist", "not_found_error", "session", "session_not_found")


class SessionStore:
    def __init__(self, data_dir: str | os.PathLike, model, hot: int = 64):
        self.dir = Path(data_dir) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.hot_max = max(0, hot)
        self._hot: OrderedDict[str, State] = OrderedDict()
        self._lock = threading.RLock()
        self._clean_temp_files()

    # ------------------------------------------------------------------ paths
    def _meta_path(self, sid: str) -> Path:
        if not SESSION_ID.match(sid):  # never build a path from an unchecked id
            raise APIError(400, "invalid session id", param="session", code="invalid_session_id")
        return self.dir / f"{sid}.json"

    def _state_path(self, sid: str) -> Path:
        return self._meta_path(sid).with_suffix(".state")

    def _clean_temp_files(self) -> None:
        for p in self.dir.glob(".*.tmp"):  # left by a crash during an atomic write: never the live file
            with contextlib.suppress(OSError):
                p.unlink()

    # ------------------------------------------------------------------ metadata
    def _write_meta(self, meta: dict) -> None:
        atomic_write_bytes(self._meta_path(meta["id"]), json.dumps(meta, ensure_ascii=False, indent=1).encode())

    def _read_meta_raw(self, sid: str) -> dict:
        p = self._meta_path(sid)
        try:
            if p.stat().st_size > MAX_META_BYTES:
                raise APIError(500, f"session '{sid}': metadata file is too large", "server_error")
            meta = json.loads(p.read_bytes())
        except FileNotFoundError:
            raise not_found(sid) from None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("id") != sid:
            # unreadable metadata (not written by this store): rebuild it from the state file
            meta = self._blank(sid)
            meta["recovered"] = True
            meta["turns"] = None
        return meta

    def _state_tokens(self, sid: str) -> int | None:
        """Token count recorded in the state file's header (None without a state file)."""
        p = self._state_path(sid)
        try:
            with open(p, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return -1
                (n,) = struct.unpack("<Q", head)
                if n > 1 << 20:
                    return -1
                header = json.loads(f.read(n))
            return int(json.loads(header["__metadata__"]["edge_rwkv_state"])["tokens"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            return -1

    def _reconcile(self, meta: dict) -> dict:
        tokens = self._state_tokens(meta["id"])
        pending = meta.pop("pending", None)
        changed = pending is not None
        if pending and tokens == pending.get("state_tokens"):
            self._apply(meta, pending)
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
        meta["messages"] = (meta.get("messages", []) + turn["messages"])[-MAX_TRANSCRIPT:]
        meta["updated"] = turn["time"]
        if not meta.get("title"):
            first = next((m["content"] for m in turn["messages"] if m["role"] == "user"), "")
            meta["title"] = first.strip().splitlines()[0][:60] if first.strip() else ""

    def _blank(self, sid: str) -> dict:
        now = time.time()
        return {"id": sid, "object": "session", "created": now, "updated": now, "title": "", "system": None,
                "parent": None, "turns": 0, "tokens": 0, "fingerprint": self.model.fingerprint, "messages": []}

    @staticmethod
    def public(meta: dict, messages: bool = True) -> dict:
        out = {k: v for k, v in meta.items() if k != "pending"}
        if not messages:
            out.pop("messages", None)
        return out

    # ------------------------------------------------------------------ operations
    def new_id(self) -> str:
        return "s" + secrets.token_hex(12)

    def create(self, sid: str | None = None, system: str | None = None, title: str | None = None) -> dict:
        with self._lock:
            sid = sid or self.new_id()
            if self._meta_path(sid).exists() or self._state_path(sid).exists():
                raise APIError(409, f"session '{sid}' already exists", param="id", code="session_exists")
            meta = self._blank(sid)
            meta["system"], meta["title"] = system or None, title or ""
            self._write_meta(meta)
            return meta

    def get(self, sid: str) -> dict:
        with self._lock:
            if not self._meta_path(sid).exists():
                if self._state_path(sid).exists():  # metadata lost: the state still makes the session
                    meta = self._blank(sid)
                    meta["recovered"], meta["turns"] = True, None
                    meta["tokens"] = max(self._state_tokens(sid) or 0, 0)
                    self._write_meta(meta)
                    return meta
                raise not_found(sid)
            return self._reconcile(self._read_meta_raw(sid))

    def list(self) -> list[dict]:
        ids = {p.stem for p in self.dir.glob("*.json")} | {p.stem for p in self.dir.glob("*.state")}
        out = []
        for sid in ids:
            if not SESSION_ID.match(sid):
                continue
            with contextlib.suppress(APIError):
                out.append(self.public(self.get(sid), messages=False))
        out.sort(key=lambda m: m.get("updated") or 0, reverse=True)
        return out

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

    def commit_turn(self, sid: str, state: State, messages: list[dict]) -> dict:
        """Make a completed turn durable: pending metadata → state file → applied metadata."""
        with self._lock:
            meta = self._reconcile(self._read_meta_raw(sid))
            turn = {"messages": messages, "state_tokens": int(state.tokens), "time": time.time()}
            meta["pending"] = turn
            self._write_meta(meta)
            state.to("cpu").save(self._state_path(sid))
            self._remember(sid, state)
            meta.pop("pending")
            self._apply(meta, turn)
            self._write_meta(meta)
            return meta

    def fork(self, src: str, sid: str | None = None, title: str | None = None) -> dict:
        with self._lock:
            meta = self.get(src)
            sid = sid or self.new_id()
            if self.exists(sid):
                raise APIError(409, f"session '{sid}' already exists", param="id", code="session_exists")
            st = self.load_state(src)
            if st is not None:
                st.save(self._state_path(sid))
            now = time.time()
            new = dict(meta, id=sid, parent=src, created=now, updated=now,
                       title=title or (f"{meta.get('title') or src} (fork)"))
            new.pop("recovered", None)
            self._write_meta(new)
            if st is not None:
                self._remember(sid, st)
            return new

    def delete(self, sid: str) -> None:
        with self._lock:
            if not self.exists(sid):
                raise not_found(sid)
            self._hot.pop(sid, None)
            # metadata first: a crash in between leaves a state without metadata, which `get` rebuilds
            for p in (self._meta_path(sid), self._state_path(sid)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
