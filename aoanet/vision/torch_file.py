"""PyTorch weight files (``.pth``/``.pt`` state dicts) read without PyTorch.

Both of PyTorch's formats are read: the legacy one (a sequence of pickles: magic number, protocol version, system
info, the object with persistent ids for its storages, the list of storage keys, then each storage as an int64
element count and its raw bytes) and the zip one (``<name>/data.pkl`` plus one raw file per storage in
``<name>/data/``). The pickles go through the project's restricted unpickler (``aoanet.safe_pickle``) with the few
globals a state dict needs (tensor rebuilding, storage types, OrderedDict), which are served by functions of this
module, so no PyTorch code is imported or run. Tensors honour their storage offset and strides (weights converted
from TensorFlow are often stored with permuted strides).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aoanet.safe_pickle import READ_ERRORS, RestrictedUnpickler, UnsafePickleError

__all__ = ["TorchFileError", "read_torch_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",  # no numpy dtype: read as uint16 and widened to float32
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch state dict (the message names the file and the tensor)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    def __init__(self, key: str, kind: _StorageType, numel: int):
        self.key, self.kind, self.numel = key, kind, int(numel)
        self.data: np.ndarray | None = None

    def fill(self, raw: bytes) -> None:
        size = self.numel * self.kind.itemsize
        if len(raw) < size:
            raise TorchFileError(f"storage {self.key} holds {len(raw)} bytes, {size} expected (truncated file?)")
        raw = raw[:size]
        if self.kind.dtype == "bfloat16":
            self.data = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            self.data = np.frombuffer(raw, np.dtype(self.kind.dtype).newbyteorder("<"))


class _Tensor:
    """A tensor whose storage may not be read yet (the legacy format stores the data after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        if not isinstance(storage, _Storage):
            raise UnsafePickleError(f"a tensor built from {type(storage).__name__}, not from a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def array(self, name: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise TorchFileError(f"tensor {name}: its storage {self.storage.key} was never read")
        if len(self.size) != len(self.stride) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise TorchFileError(f"tensor {name}: bad size {self.size} / stride {self.stride}")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, dtype=data.dtype)
        if last >= data.size:
            raise TorchFileError(
                f"tensor {name}: size {self.size}, stride {self.stride}, offset {self.offset} reach element {last} "
                f"of a storage of {data.size}"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=[s * data.itemsize for s in self.stride], writeable=False
        )
        return np.array(view, dtype=data.dtype.newbyteorder("="), copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _globals() -> dict:
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name in _STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    return allowed


class _Reader:
    def __init__(self, what: str):
        self.storages: dict[str, _Storage] = {}
        self.what = what

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise UnsafePickleError(f"refusing persistent id {pid!r} in {self.what}")
        _, kind, key, _location, numel = pid[:5]
        if not isinstance(kind, _StorageType):
            raise UnsafePickleError(f"storage of unknown type {kind!r} in {self.what}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, kind, numel)
        storage = self.storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # (view key, offset, size): a view into the root storage (very old files)
            raise TorchFileError(f"{self.what}: storage views are not supported")
        return storage

    def load(self, data: bytes):
        return RestrictedUnpickler(
            io.BytesIO(data), what=self.what, extra=_globals(), persistent_load=self.persistent_load,
            encoding="latin1",
        ).load()


def _legacy(path: Path, raw: bytes, reader: _Reader):
    f = io.BytesIO(raw)

    def next_pickle():
        return RestrictedUnpickler(f, what=reader.what, encoding="latin1").load()

    if next_pickle() != LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a PyTorch file (bad magic number)")
    version = next_pickle()
    if version != LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: unsupported PyTorch file protocol {version!r}")
    info = next_pickle()
    if isinstance(info, Mapping) and info.get("little_endian") is False:
        raise TorchFileError(f"{path}: written on a big-endian machine, not supported")
    unpickler = RestrictedUnpickler(
        f, what=reader.what, extra=_globals(), persistent_load=reader.persistent_load, encoding="latin1"
    )
    obj = unpickler.load()
    keys = next_pickle()
    if not isinstance(keys, list):
        raise TorchFileError(f"{path}: no storage key list after the object")
    for key in keys:
        storage = reader.storages.get(str(key))
        if storage is None:
            raise TorchFileError(f"{path}: storage {key} is listed but no tensor uses it")
        head = f.read(8)
        if len(head) < 8:
            raise TorchFileError(f"{path}: the file ends before storage {key} (truncated)")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise TorchFileError(f"{path}: storage {key} has {numel} elements, {storage.numel} expected")
        storage.fill(f.read(numel * storage.kind.itemsize))
    return obj


def _zip(path: Path, reader: _Reader):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise TorchFileError(f"{path}: a zip file without one data.pkl (not a PyTorch file?)")
        prefix = pkl[0][: -len("data.pkl")]
        obj = reader.load(z.read(pkl[0]))
        for key, storage in reader.storages.items():
            try:
                storage.fill(z.read(f"{prefix}data/{key}"))
            except KeyError:
                raise TorchFileError(f"{path}: storage {key} is missing from the archive") from None
    return obj


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A PyTorch state dict file -> {name: numpy array} (float tensors keep their dtype; bfloat16 -> float32).

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped. Raises TorchFileError naming the file
    (and the tensor), UnsafePickleError for a file that refers to anything but tensors and plain data."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TorchFileError(f"{path}: cannot read it ({e})") from None
    reader = _Reader(f"{path.name} (a PyTorch state dict)")
    try:
        obj = _zip(path, reader) if zipfile.is_zipfile(io.BytesIO(raw)) else _legacy(path, raw, reader)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except READ_ERRORS as e:
        if isinstance(e, TorchFileError):
            if str(path) in str(e):
                raise
            raise TorchFileError(f"{path}: {e}") from None
        raise TorchFileError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, _Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _Tensor):
            raise TorchFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = value.array(f"{name!r} of {path}")
    return out
