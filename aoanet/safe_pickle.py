"""Pickles read without running code: a restricted unpickler that builds plain data only.

``pickle.load`` calls whatever global a file names, so a tampered pickle runs code the moment it is read. The one
unpickler of this project allows a short list of globals (containers, numbers, strings, ``argparse.Namespace``,
numpy scalars and arrays as numpy 1 and numpy 2 write them) and refuses every other one by name. It reads:

- the authors' ``infos_<id>.pkl`` (``aoanet.convert.load_reference_infos``);
- checkpoints of earlier versions of this project (``model.pdparams``, ``model-best.pdparams``,
  ``optimizer.pdopt``), which ``paddle.save`` pickled (:func:`load_paddle_state`). Current checkpoints hold no
  pickle at all (safetensors and JSON, ``aoanet.train.checkpoint``);
- PyTorch weight files without PyTorch (``aoanet.vision.torch_file``), with the globals of a state dict and its
  storages' persistent ids served by that module's own functions.

``paddle.save`` (Paddle 2.x and 3.x) stores a state dict as a dict of numpy arrays (plus a name table), and a
tensor met anywhere else as ``(tuple, ((name, array),))`` or, for a DenseTensor/LoDTensor,
``(eval, ('data', {'data': array}))``. Those two globals are allowed for Paddle files only, and ``eval`` is
replaced by a function that returns the array of exactly that expression and refuses anything else.
"""

from __future__ import annotations

import argparse
import copyreg
import importlib
import io
import pickle
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "load_paddle_state", "restricted_loads"]

PLAIN = "dict, list, tuple, str, int, float, bool, None, argparse.Namespace, numpy scalars/arrays"


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global outside the allowed plain-data set (the message names it)."""


def _numpy_module(name: str):
    # numpy 2 moved numpy.core to numpy._core; resolve to whichever exists, without the deprecated alias.
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1').
    normalized = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(obj, str) or normalized not in ("latin1", "iso88591", "l1"):
        raise UnsafePickleError(f"_codecs.encode called with {type(obj).__name__}, {encoding!r}: only latin1 text")
    return obj.encode("latin1", errors)


def _reconstructor(cls, base, state):
    # Protocols 0/1 rebuild plain objects through copyreg._reconstructor(cls, object, None).
    if cls is not argparse.Namespace or base is not object or state is not None:
        raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is not allowed")
    return copyreg._reconstructor(cls, base, state)


def _paddle_tensor_eval(expression, globals_=None, locals_=None):
    """What Paddle's pickled DenseTensor asks for, ``eval('data', {'data': array})``, without eval."""
    if expression != "data" or not isinstance(globals_, dict) or set(globals_) != {"data"}:
        raise UnsafePickleError(f"builtins.eval({expression!r}, ...) is not allowed: only Paddle's tensor form")
    if not isinstance(globals_["data"], np.ndarray):
        raise UnsafePickleError("builtins.eval('data', ...) without an array is not allowed")
    return globals_["data"]


def _allowed_globals() -> dict[tuple[str, str], Any]:
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


# The two extra globals paddle.save writes (see the module docstring).
PADDLE_GLOBALS = {("builtins", "tuple"): tuple, ("builtins", "eval"): _paddle_tensor_eval}

# Python 2 module names, as the standard unpickler's fix_imports would map them.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds plain data only: every global outside a short allow-list is refused with its name.

    ``what`` names the file in the messages ("the infos pickle"); ``extra`` allows more globals;
    ``persistent_load`` resolves persistent ids (refused when None)."""

    def __init__(self, file, what: str = "the pickle", extra: dict | None = None, persistent_load=None, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = {**_allowed_globals(), **(extra or {})}
        self._what = what
        self._persistent = persistent_load

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: {self._what} may only contain plain data ({PLAIN})"
            ) from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError(f"refusing persistent id {pid!r} in {self._what}")
        return self._persistent(pid)


def restricted_loads(data: bytes, what: str = "the infos pickle", extra: dict | None = None):
    """``pickle.loads`` limited to plain data (Python 2 strings decoded as latin1, as the authors' loader)."""
    return RestrictedUnpickler(io.BytesIO(data), what=what, extra=extra, encoding="latin1").load()


# Errors the standard unpickler raises on a truncated or foreign file.
READ_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
               MemoryError, OverflowError)


def _plain_tensor(value):
    """A value of a Paddle pickle with its tensors as numpy arrays: ``(name, array)`` pairs become the array."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], np.ndarray):
        return value[1]
    if isinstance(value, dict):
        return {k: _plain_tensor(v) for k, v in value.items()}
    return value


def load_paddle_state(data: bytes, source: str) -> dict:
    """A dict that ``paddle.save`` pickled (a state dict or an optimizer state), read without running code ->
    name -> numpy array (nested dicts and plain values as they are). Raises UnsafePickleError naming ``source``
    and the refused global, or ValueError for an unreadable file."""
    try:
        obj = restricted_loads(data, what=f"{source} (a Paddle weights pickle)", extra=PADDLE_GLOBALS)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{source}: {e}") from None
    except READ_ERRORS as e:
        raise ValueError(f"{source} could not be read as Paddle weights ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, expected a dict of tensors")
    obj = dict(obj)
    obj.pop("StructuredToParameterName@@", None)  # the name table Paddle adds to a saved state dict
    # Arrays over 1 GiB saved with pickle protocol 2 or 3 are split into slices (paddle's _unpack_saved_dict).
    unpack = obj.pop("UnpackBigParamInfor@@", None)  # (sic: Paddle's key)
    if unpack is not None:
        try:
            for key, info in unpack.items():
                parts = [obj.pop(part) for part in info["slices"]]
                obj[key] = np.concatenate(parts).reshape(info["OriginShape"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{source}: its sliced large arrays cannot be put together ({e})") from None
    return {key: _plain_tensor(value) for key, value in obj.items()}
