"""Write-then-rename, so that an interrupted command never leaves a half-written file under the final name.

The one implementation for the whole project (standard library only, so the runtime can use it too): checkpoints,
prepared data, feature files (``aoanet-data bu`` skips existing files on re-run, which is only safe if existing
files are always complete), exports and captions files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed to disk and renamed over ``path``, on
    error removed. The temporary file lives in the same directory, so ``os.replace`` is a same-filesystem rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, **dumps_options) -> None:
    write_text(path, json.dumps(obj, **dumps_options))
