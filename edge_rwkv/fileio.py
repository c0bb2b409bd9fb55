"""Crash-safe file writes: a reader sees the old file or the complete new one, never a partial one.

A write goes to a temp file beside the destination, named `.<name>.partial-<pid>-<random>.tmp`. A
process killed mid-write (kill -9, power loss) leaves that temp behind; the next atomic write to the
same folder removes the temps whose writer is gone (its process no longer exists, or it is this
process and the write is no longer in flight), so killed saves never pile up.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path

_TEMP_NAME = re.compile(r"\..+\.partial-(\d{1,10})-[A-Za-z0-9_]+\.tmp")
_in_flight: set[str] = set()  # this process's temp files still being written
_in_flight_lock = threading.Lock()


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open folders
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None):
    """Yield a temp path beside `path`; on success fsync it, rename it over `path`, fsync the folder.
    `mode`: the file's permission bits (default: what open() would give under the umask)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest.parent)
    with _in_flight_lock:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-{os.getpid()}-", suffix=".tmp", dir=dest.parent)
        _in_flight.add(tmp)
    os.close(fd)
    mode = mode if mode is not None else 0o666 & ~_umask()  # mkstemp makes 0600: what open() would give
    os.chmod(tmp, mode)
    try:
        yield Path(tmp)
        # a writer may replace the file with its own (safetensors' save_file does): set the bits again
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temp files of atomic writes whose writer is gone; returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _TEMP_NAME.fullmatch(e.name)
        if m is None:
            continue
        with _in_flight_lock:
            if _writer_alive(int(m.group(1)), e.path):
                continue
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed += 1
    return removed


def _writer_alive(pid: int, tmp: str) -> bool:
    if pid == os.getpid():
        return tmp in _in_flight
    if os.name != "posix":  # no cheap liveness test: leave other processes' temps alone
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        Path(tmp).write_bytes(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
