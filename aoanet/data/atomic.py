"""Write-then-rename, so that an interrupted command never leaves a half-written file under the final name.

This matters twice: a truncated cocotalk_label.h5 would otherwise load as garbage, and `aoanet-data bu` skips
images whose feature files already exist when it is re-run, which is only safe if existing files are always
complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error removed.

    The temporary file lives in the same directory so the final ``os.replace`` is a same-filesystem rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj), encoding="utf-8")
