"""`edge-rwkv chat` at a real terminal (a pseudo-terminal): Ctrl-C stops a reply and keeps the conversation,
the arrow keys recall earlier lines, and the lines typed are kept in a history file between chats."""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

import edge_rwkv
from edge_rwkv.cli import main as cli_main

pytest.importorskip("readline", reason="this Python has no readline module")

UP = "\x1b[A"


def default_sigint() -> None:
    """Ctrl-C as at a user's terminal: a shell's background job (CI may run one) ignores SIGINT, and a
    child inherits that, so Python would install no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A command whose stdin, stdout and stderr are one pseudo-terminal, read as the user's screen."""

    def __init__(self, *args: str, cwd=None):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # wide: no wrapped lines
        env = dict(os.environ, TERM="xterm", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_rwkv", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, cwd=cwd, start_new_session=True,
                                     preexec_fn=default_sigint)
        os.close(slave)
        self.screen = ""
        self.seen = 0  # where the next expect() starts looking

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.screen += os.read(self.master, 65536).decode("utf-8", errors="replace")
            except OSError:  # the command ended and closed the terminal
                pass

    def expect(self, needle: str, timeout: float = 120) -> str:
        """Wait until `needle` appears after the last match; return the text up to and including it."""
        deadline = time.monotonic() + timeout
        while needle not in self.screen[self.seen:]:
            if time.monotonic() > deadline or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{needle!r} did not appear; the screen ends with:\n{self.screen[-2000:]}")
            self.read(0.2)
        end = self.screen.index(needle, self.seen) + len(needle)
        text, self.seen = self.screen[self.seen:end], end
        return text

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt(self) -> None:
        os.kill(self.proc.pid, signal.SIGINT)


    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        return rc


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("terminal") / "tiny.safetensors"
    assert cli_main(["init", "-o", str(path), "--layers", "1", "--embd", "32", "--head-size", "32", "--seed", "21"]) == 0
    return path


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(model, tmp_path):
    before, after = tmp_path / "before.state", tmp_path / "after.state"
    # greedy on this model, "Go on" after "Hello" is a reply of ~800 tokens (seconds): long enough to interrupt
    t = Terminal("chat", model, "--temperature", "0", "--max-tokens", "1500", "--history", "")
    t.expect("User: ")
    t.type("Hello\r")
    t.expect("Assistant: ")
    t.expect("User: ")
    t.type(f"/save {before}\r")
    t.expect("[saved")
    t.expect("User: ")
    t.type("Go on\r")
    t.expect("Assistant: ")
    streamed = len(t.screen)
    while len(t.screen) == streamed:  # the reply has begun
        t.read(0.2)
    t.interrupt()
    t.expect("[reply stopped")
    t.expect("User: ")  # the chat goes on
    t.type(f"/save {after}\r")
    t.expect("[saved")
    t.type("/quit\r")
    assert t.wait() == 0, t.screen
    assert "Traceback" not in t.screen and "KeyboardInterrupt" not in t.screen
    # the conversation is the one from before the interrupted message: "Hello" and its reply
    m = edge_rwkv.load(model)
    a, b = m.load_state(before), m.load_state(after)
    assert a.tokens == b.tokens > 0
    assert torch.equal(a.wkv, b.wkv) and torch.equal(a.att_x, b.att_x) and torch.equal(a.ffn_x, b.ffn_x)


def test_arrow_keys_recall_lines_and_history_is_kept(model, tmp_path):
    history = tmp_path / "data" / "chat_history"
    t = Terminal("chat", model, "--temperature", "0", "--max-tokens", "2", "--history", history)
    t.expect("User: ")
    t.type("first message\r")
    t.expect("Assistant: ")
    t.expect("User: ")
    t.type(UP)  # readline puts the last line back at the prompt
    t.expect("first message")
    t.type("\r")
    t.expect("Assistant: ")
    t.expect("User: ")
    t.type("/quit\r")
    assert t.wait() == 0, t.screen
    assert t.screen.count("Assistant: ") == 2  # the recalled line was sent
    assert history.read_text().splitlines() == ["first message", "/quit"]  # a repeated line is kept once
    assert history.stat().st_mode & 0o777 == 0o600  # the user's side of their conversations
    # a new chat starts with that history; Ctrl-C at the prompt drops the line being typed, not the chat
    t = Terminal("chat", model, "--history", history)
    t.expect("User: ")
    t.type("half a line")
    t.expect("half a line")
    interrupt_until(t, "[the line was dropped")
    t.expect("User: ")
    t.type(UP)  # the last line of the earlier chat
    t.expect("/quit")
    t.type("\r")
    assert t.wait() == 0, t.screen
    assert "Assistant:" not in t.screen


def interrupt_until(t: "Terminal", needle: str, tries: int = 5) -> None:
    """Ctrl-C until `needle` shows: on a loaded machine the first signal can land while the line reader is
    still being set up, before a keypress would have reached it."""
    for k in range(tries):
        t.interrupt()
        try:
            t.expect(needle, timeout=20)
            return
        except AssertionError:
            if k == tries - 1:
                raise
