"""What every command of the project does with failures: an expected one (bad data, config, checkpoint, file, argument)
is one message ``<command>: error: ...`` naming the file, field or value, and a non-zero exit status; a traceback is
for real bugs, or when ``--debug`` is given (any position on the command line; or ``AOANET_DEBUG=1``). Ctrl-C and
SIGTERM end a command through its cleanup (``finally`` blocks, context managers: workers and child processes
stopped, locks released) with one line and the status of the signal (130, 143).

Standard library and typer only: the runtime uses it, and so do the training side's commands.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import typer

DEBUG_ENV = "AOANET_DEBUG"
DEBUG_FLAG = "--debug"
EPILOG = f"Expected errors are one line; add {DEBUG_FLAG} (anywhere) for a traceback."


class OutputError(ValueError):
    """An output path that cannot be written (found before the work)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command_args(argv: list[str] | None = None) -> list[str]:
    """The command line without ``--debug`` (which sets AOANET_DEBUG for this process and its children)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        args = [a for a in args if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    return args


def _on_sigterm(signum, frame):
    raise Terminated()


def one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text


def report_errors(prog: str, *expected: type[BaseException], status: int = 1):
    """Decorate a command: errors of the ``expected`` types (and OSError, OutputError) become ``prog: error: message``
    and exit status ``status``; Ctrl-C / SIGTERM become one line and 130 / 143. With --debug they propagate."""
    kinds = (OSError, OutputError, *expected)

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            previous = None
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGTERM, _on_sigterm)
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt as e:
                if debug_enabled():
                    raise
                terminated = isinstance(e, Terminated)
                typer.echo(f"{prog}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", err=True)
                raise typer.Exit(143 if terminated else 130) from None
            except kinds as e:
                if debug_enabled():
                    raise
                typer.echo(f"{prog}: error: {one_line(e)}", err=True)
                raise typer.Exit(status) from None
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

        return wrapper

    return decorate


def _writable(directory: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``directory`` (or, while it does not exist, in its nearest existing ancestor,
    creating nothing else): permissions, read-only filesystems and files in the way are all found this way."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".aoanet-probe.", suffix=".tmp"):
            pass
    except OSError as e:
        raise OutputError(f"{what} {path} cannot be written ({e.strerror or e})") from None


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written as a file: not a directory, and a file can be created
    in its directory. Raises OutputError naming the option."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name")
    _writable(path.parent, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Check, before any work, that a directory can be created (or replaced) at ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory")
    _writable(path.parent, what, path)
    return path


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that files can be written into the directory ``path`` (created later if it does not
    exist): not a file, and a file can be created in it (or in its nearest existing ancestor)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory")
    _writable(path, what, path)
    return path
