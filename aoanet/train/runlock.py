"""One writer per checkpoint directory: ``train.lock``, created exclusively, removed when the run ends.

The file records who holds it (pid, host, the process's start time, the command). A second run into the same
directory is refused with that information. A lock left by a run that was killed (SIGKILL, power loss) is stale
once its process is gone: on the same host the pid is checked (and its start time, so that a recycled pid does not
keep a dead run's lock), and the stale file is replaced. A lock taken on another host cannot be checked from here:
the message says which file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

LOCK = "train.lock"
# A lock file that exists but is still empty is being written by its creator; older than this, it is stale.
PARTIAL_GRACE_SECONDS = 10.0

# Locks this process holds (by resolved path): a lock file naming this pid is held only if it is listed here.
_held: dict[str, str] = {}


class LockError(RuntimeError):
    """Another run holds the directory's lock (the message names it)."""


def process_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (Linux ``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) is in parentheses and may contain spaces
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _alive(info: dict) -> bool:
    """Whether the process that wrote ``info`` still runs (True when it cannot be told: another host)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return _held.get(info.get("path", ""), None) == info.get("token")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        pass
    started = info.get("start_time")
    now = process_start_time(pid)
    return started is None or now is None or started == now


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, since {when}: {info.get('command', '?')}"


class RunLock:
    """``RunLock(directory).acquire()`` ... ``release()``; also a context manager."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        token = secrets.token_hex(8)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": process_start_time(os.getpid()),
            "time": time.time(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
            "token": token,
            "path": key,
        }
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            try:
                os.write(fd, json.dumps(info).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            _held[key] = token
            self.token = token
            return self
        holder = _read(self.path)
        raise LockError(
            f"{self.directory} is being written by another training run ({describe(holder) if holder else 'unknown'})"
            f"; two runs cannot share a checkpoint directory. If that run is gone, delete {self.path}"
        )

    def _clear_if_stale(self) -> None:
        info = _read(self.path)
        if info is None:  # empty or half-written: its creator may be writing it right now
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < PARTIAL_GRACE_SECONDS:
                time.sleep(0.2)
                return
        elif _alive(info):
            where = "" if info.get("host") == socket.gethostname() else " (on another host: it cannot be checked here)"
            raise LockError(
                f"{self.directory} is being written by another training run{where}: {describe(info)}. Two runs "
                f"cannot share a checkpoint directory; wait for it to end, or if it is gone, delete {self.path}"
            )
        # Stale: move it aside under our own name, then check that what we moved is the lock we judged stale (two
        # runs may clear the same stale lock at once; the second must not remove the first one's new lock).
        grabbed = self.path.with_name(f".{LOCK}.stale.{os.getpid()}")
        try:
            os.replace(self.path, grabbed)
        except FileNotFoundError:
            return
        moved = _read(grabbed)
        if info is not None and moved is not None and moved.get("token") != info.get("token"):
            try:
                os.link(grabbed, self.path)  # a live lock taken in between: put it back
            except OSError:
                pass
        grabbed.unlink(missing_ok=True)

    def release(self) -> None:
        if self.token is None:
            return
        key = str(self.path.resolve())
        info = _read(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if _held.get(key) == self.token:
            del _held[key]
        self.token = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
