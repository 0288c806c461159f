"""Atomic writes for the data pipeline: the project's one implementation lives in :mod:`runtime.atomic`."""

from runtime.atomic import atomic_path, write_json

__all__ = ["atomic_path", "write_json"]
