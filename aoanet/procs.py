"""Child processes that end with the process that started them, however it ends (SIGKILL included).

Loader workers and the Java scorers (METEOR, the PTB tokenizer) hold hundreds of MB each; a parent killed without
a chance to clean up must not leave them behind. On Linux the kernel does it: ``PR_SET_PDEATHSIG`` asks for a signal
when the parent exits. A forked worker sets it on itself (:func:`die_with_parent`); an external program is started
through a small Python shim that sets it and then replaces itself with the program (:func:`popen`), so no code runs
between ``fork`` and ``exec`` in the (multi-threaded) parent. Elsewhere these are plain child processes.

:func:`popen` also puts the child in its own session, so a Ctrl-C in the terminal reaches only this process, which
then stops the child itself: the child does not die half-way through a reply this process is still reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1

# argv: parent pid, signal number, program, arguments...
_SHIM = (
    "import ctypes, os, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, int(sys.argv[2]), 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a child process: have the kernel send ``sig`` when the parent exits (Linux), and exit now if the parent is
    already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def popen(cmd: list[str], death_signal: int = signal.SIGKILL, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` in a new session, sent ``death_signal`` when this process ends (Linux).

    Call it from the thread that lives as long as the child should (the kernel's signal follows the thread that
    started the child)."""
    kwargs.setdefault("start_new_session", True)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), str(int(death_signal)), *cmd]
    return subprocess.Popen(cmd, **kwargs)


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a child: SIGKILL if it still runs, then reap it."""
    if process.poll() is None:
        try:
            process.kill()
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


@contextlib.contextmanager
def signals_held(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM while the block runs, then act on the first one received as if it came now.

    For code that calls back into Python from inside Paddle (a PyLayer's backward): Paddle wraps any exception
    raised there, KeyboardInterrupt included, in its own error, and the command would end as failed instead of
    interrupted. A backward pass takes seconds at most. Only in the main thread, where Python runs signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in signals}

    def hold(signum, frame):
        received.append(signum)

    for s in signals:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(received[0])
