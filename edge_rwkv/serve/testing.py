"""Run a real `edge-rwkv serve` process on a free loopback port (for tests and examples)."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

import edge_rwkv
from edge_rwkv.state import State


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(model, data_dir, "--max-slots", "2") as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, model: str | os.PathLike, data_dir: str | os.PathLike, *args: str, api_key: str | None = None,
                 startup_timeout: float = 120.0):
        self.model, self.data_dir, self.args = str(model), str(data_dir), list(args)
        self.api_key = api_key
        self.timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(data_dir) / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> "ServerProcess":
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [sys.executable, "-m", "edge_rwkv", "serve", self.model, "--port", str(self.port),
               "--data-dir", self.data_dir, *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start within {self.timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- kill -9 durability

def kill9_durability(model: str | os.PathLike, data_dir: str | os.PathLike, kills: int = 20, seed: int = 0,
                     sessions: int = 4, max_tokens: int = 4, traffic_s: tuple[float, float] = (0.0, 1.0),
                     compare_reference: bool = False, log=print) -> dict:
    """Kill the daemon with SIGKILL `kills` times while clients talk, fork and delete sessions (at a
    random moment within `traffic_s` seconds after the round's first acknowledged turn), and check
    after every restart that nothing acknowledged was lost and nothing is corrupt.

    Checked per session after each restart: its turn count is the acknowledged count or one more (a
    turn saved just before the kill whose reply was never received); its state file loads (checksum,
    fingerprint) and holds the token count its metadata records, the same count as at every earlier
    check that saw this many turns, and more than at fewer turns; its transcript holds exactly those
    turns. With `compare_reference`, the state must also equal (float tolerance) the one an
    uninterrupted chat of the embedded API reaches after that many turns (use it with a float model:
    greedy decoding of a quantized model can break near-ties differently in a batch). Every listed
    session is whole (no half-written fork), none is reported broken, and no temp file survives.
    Returns the figures: kills, turns acknowledged, sessions checked and the defects found."""
    rng = random.Random(seed)
    reference = edge_rwkv.load(model)  # its fingerprint; with compare_reference, the uninterrupted chats
    data = Path(data_dir)
    sids = [f"kill-{j}" for j in range(sessions)]
    message = lambda sid, k: f"message {k} of {sid}: tell me something"  # noqa: E731
    ref_chats = {sid: reference.chat(temperature=0, max_tokens=max_tokens) for sid in sids}
    ref_states: dict[str, list] = {sid: [] for sid in sids}
    acked = {sid: 0 for sid in sids}
    tokens_at: dict[str, dict[int, int]] = {sid: {0: 0} for sid in sids}  # turns → state tokens seen
    figures = {"kills": 0, "turns_acknowledged": 0, "session_checks": 0, "forks_made": 0, "defects": []}

    def ref_state(sid, turns):
        while len(ref_states[sid]) < turns:
            chat = ref_chats[sid]
            "".join(chat.send(message(sid, len(ref_states[sid]))))
            ref_states[sid].append(chat.state.clone())
        return ref_states[sid][turns - 1]

    def defect(what):
        figures["defects"].append(what)
        log(f"DEFECT: {what}")

    def check(srv):
        for sid in sids:
            r = httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=60)
            if r.status_code != 200:
                defect(f"{sid}: GET answered {r.status_code} {r.text[:200]}")
                continue
            meta = r.json()
            figures["session_checks"] += 1
            turns = meta["turns"]
            if turns not in (acked[sid], acked[sid] + 1):
                defect(f"{sid}: {turns} turns after the kill, {acked[sid]} acknowledged")
                continue
            acked[sid] = turns
            msgs = httpx.get(f"{srv.url}/v1/sessions/{sid}/messages", params={"limit": 1000}, timeout=60).json()
            if len(msgs["data"]) != 2 * turns:
                defect(f"{sid}: transcript holds {len(msgs['data'])} messages for {turns} turns")
            path = data / "sessions" / f"{sid}.state"
            if turns == 0:
                if path.exists():
                    defect(f"{sid}: a state file without a completed turn")
                continue
            try:
                st = State.load(path, expect_fingerprint=reference.fingerprint)
            except Exception as e:  # noqa: BLE001
                defect(f"{sid}: state unreadable: {e}")
                continue
            if st.tokens != meta["tokens"]:
                defect(f"{sid}: state holds {st.tokens} tokens, metadata says {meta['tokens']}")
            seen = tokens_at[sid]
            if seen.setdefault(turns, st.tokens) != st.tokens or st.tokens <= seen.get(turns - 1, -1):
                defect(f"{sid}: {st.tokens} tokens after {turns} turns, earlier checks saw {seen}")
            if compare_reference:
                want = ref_state(sid, turns)
                if not torch.allclose(st.wkv, want.wkv, atol=1e-4, rtol=1e-4):
                    defect(f"{sid}: state after {turns} turns differs from an uninterrupted chat's")
        listing = httpx.get(srv.url + "/v1/sessions", params={"limit": 1000}, timeout=60).json()
        if listing["broken"]:
            defect(f"broken sessions listed: {listing['broken']}")
        for s in listing["data"]:
            if s["turns"] is None:
                defect(f"{s['id']}: half-written session listed")

    def talker(srv, sid, stop):
        while not stop.is_set():
            k = acked[sid]
            try:
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                    "session": sid, "messages": [{"role": "user", "content": message(sid, k)}],
                    "max_tokens": max_tokens, "temperature": 0})
            except httpx.HTTPError:
                return  # the server was killed
            if r.status_code != 200:
                return
            acked[sid] = k + 1
            figures["turns_acknowledged"] += 1

    def forker(srv, rnd, stop):
        k = 0
        while not stop.is_set():
            try:
                r = httpx.post(f"{srv.url}/v1/sessions/{sids[0]}/fork", json={"id": f"fork-{rnd}-{k}"}, timeout=60)
                if r.status_code == 201:
                    figures["forks_made"] += 1
                    httpx.delete(f"{srv.url}/v1/sessions/fork-{rnd}-{k}", timeout=60)
            except httpx.HTTPError:
                return
            k += 1

    for rnd in range(kills + 1):
        srv = ServerProcess(model, data).start()
        try:
            if rnd == 0:
                for sid in sids:
                    httpx.post(srv.url + "/v1/sessions", json={"id": sid}, timeout=60).raise_for_status()
            check(srv)
            if rnd == kills:
                leftovers = [p.name for p in (data / "sessions").glob(".*.tmp")]
                if leftovers:
                    defect(f"temp files left: {leftovers[:5]}")
                break
            stop = threading.Event()
            threads = [threading.Thread(target=talker, args=(srv, sid, stop)) for sid in sids]
            threads.append(threading.Thread(target=forker, args=(srv, rnd, stop)))
            for t in threads:
                t.start()
            before, deadline = figures["turns_acknowledged"], time.monotonic() + 30
            while figures["turns_acknowledged"] == before and time.monotonic() < deadline:
                time.sleep(0.02)  # the turns are flowing (and being saved) once one is acknowledged
            time.sleep(rng.uniform(*traffic_s))
            srv.kill9()  # mid-traffic: saves are in flight
            figures["kills"] += 1
            stop.set()
            for t in threads:
                t.join()
        finally:
            srv.stop()
        log(f"kill {rnd + 1}/{kills}: turns acknowledged {figures['turns_acknowledged']}, "
            f"defects {len(figures['defects'])}")
    figures["turns_per_session"] = dict(acked)
    return figures
