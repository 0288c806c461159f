"""The project's one restricted unpickler: it builds plain data only, and refuses every other global by name.

Two readers use it: the authors' infos pickle (``aoanet.convert``) and PyTorch weight files read without PyTorch
(``aoanet.vision.torch_file``), each adding the few globals its format needs. Nothing outside the allow-list is
ever imported or called, so a tampered file cannot run code.
"""

from __future__ import annotations

import argparse
import copyreg
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["PLAIN_DATA", "RestrictedUnpickler", "UnsafePickleError", "plain_globals"]

PLAIN_DATA = "dict, list, tuple, str, int, float, bool, None, argparse.Namespace, numpy scalars/arrays"


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global outside the allowed set."""


def _numpy_module(name: str):
    import importlib

    # numpy 2 moved numpy.core to numpy._core; resolve to whichever exists, without the deprecated alias.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1').
    normalized = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(obj, str) or normalized not in ("latin1", "iso88591", "l1"):
        raise UnsafePickleError(
            f"_codecs.encode called with {type(obj).__name__}, {encoding!r}: only latin1 text"
        )
    return obj.encode("latin1", errors)


def _reconstructor(cls, base, state):
    # Protocols 0/1 rebuild plain objects through copyreg._reconstructor(cls, object, None).
    if cls is not argparse.Namespace or base is not object or state is not None:
        raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is not allowed")
    return copyreg._reconstructor(cls, base, state)


def plain_globals() -> dict[tuple[str, str], Any]:
    """The globals plain data needs: containers, argparse.Namespace, numpy scalars and arrays."""
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object,  # only as the base argument of copyreg._reconstructor
        ("copyreg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    # numpy scalars and arrays, as numpy 1 (numpy.core) and numpy 2 (numpy._core) write them.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    return allowed


# Python 2 module names, as the standard unpickler's fix_imports would map them.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds plain data only, plus ``extra_globals`` ({(module, name): object}); every other global is refused
    with its name. ``persistent_load``: how persistent ids are resolved (refused when None). ``what`` names the
    file kind in the messages."""

    def __init__(
        self,
        file,
        *,
        extra_globals: Mapping[tuple[str, str], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
        what: str = "the infos pickle",
        allowed_description: str = PLAIN_DATA,
        **kwargs,
    ):
        super().__init__(file, **kwargs)
        self._allowed = {**plain_globals(), **(extra_globals or {})}
        self._persistent = persistent_load
        self._what, self._description = what, allowed_description

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: {self._what} may only contain {self._description}"
            ) from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError(f"refusing persistent id {pid!r} in {self._what}")
        return self._persistent(pid)
