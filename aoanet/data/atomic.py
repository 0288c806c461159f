"""Atomic writes for the data pipeline: the project's one implementation lives in :mod:`aoanet_runtime.atomic`."""

from aoanet_runtime.atomic import atomic_path, write_json

__all__ = ["atomic_path", "write_json"]
