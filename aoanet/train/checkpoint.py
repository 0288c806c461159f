"""Checkpoint directories: everything needed to rebuild the model, resume training, or export; saved as verified
sets, in formats that cannot run code.

Layout (docs/robustness.md)::

    checkpoint.json          the manifest: which save is current, and the path, size and sha256 of each of its files
    save-00000020/           one directory per save, written completely, then renamed into place
        model.json           format tag, vocab_size, model options, ix_to_word   (enough to rebuild the model), and
                             ``extractor`` when the features came from an image extractor (aoanet.vision.extract)
        config.yml           the resolved training config
        state.json           training state: epoch, iteration, loader position, RNG states, best score, history
        model.safetensors    weights of this save
        optimizer.safetensors  optimizer state (tensors; its few plain values in the safetensors metadata)
    save-00000015/model.safetensors   the best weights, kept from the save that made them best
    metrics.jsonl            one JSON line per logged event; curves.png at the end of a run
    train.lock               while a run writes the directory (aoanet.train.runlock)

A save writes its files into ``.save-<iteration>.tmp``, renames that directory into place, then replaces
``checkpoint.json`` atomically (written last: until then the previous save is the checkpoint), then deletes the files
no longer listed. A process killed at any point leaves either the previous or the new set, complete; the next run
deletes the leftovers. Readers verify each file they use against the manifest (size and sha256 of the very bytes
they parse) and refuse a missing, truncated, modified or mixed-in file with a message naming it.

Weights are safetensors (a JSON header and raw arrays: read into numpy, nothing to execute); everything else is JSON
or YAML. Directories written by earlier versions (``model.pdparams``, ``model-best.pdparams``, ``optimizer.pdopt``
pickles, no manifest) still load, through the restricted unpickler of ``aoanet.safe_pickle``, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import paddle

from aoanet.model import AoAModel, ModelOptions
from aoanet.safe_pickle import UnsafePickleError, load_paddle_state
from aoanet.train.runlock import LOCK, LockError, RunLock
from aoanet_runtime import atomic

FORMAT = "aoanet-checkpoint/1"  # model.json
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = "aoanet-checkpoint-set/1"
OPTIMIZER_FORMAT = "aoanet-optimizer/1"
SAVE_PREFIX = "save-"

# The files of a save, by role, and their names in a save directory.
FILE_NAMES = {
    "model": "model.json",
    "config": "config.yml",
    "state": "state.json",
    "weights_last": "model.safetensors",
    "weights_best": "model-best.safetensors",
    "optimizer": "optimizer.safetensors",
}
# Earlier versions' flat layout (pickled weights, no manifest).
LEGACY_NAMES = {
    "model": "model.json",
    "config": "config.yml",
    "state": "state.json",
    "weights_last": "model.pdparams",
    "weights_best": "model-best.pdparams",
    "optimizer": "optimizer.pdopt",
}
WEIGHTS = {"last": "weights_last", "best": "weights_best"}
# What a run may have written into its directory: --overwrite deletes these and nothing else.
_RUN_ENTRIES = {MANIFEST, "metrics.jsonl", "curves.png", "visualdl", "converted_from.json", *LEGACY_NAMES.values()}
_IGNORED_ENTRIES = {"launch", LOCK}  # the launcher's rank logs (written before any rank starts), the lock
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "LockError",
    "RunLock",
    "load_model",
    "prepare_new_run",
    "save_model_dir",
]


class CheckpointError(RuntimeError):
    pass


class CheckpointMoved(CheckpointError):
    """A file listed in the manifest went away because a training run saved anew while it was read."""


_notices: set[str] = set()


def _notice(message: str) -> None:
    if message not in _notices:
        _notices.add(message)
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- small files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_meta(model: AoAModel, ix_to_word: dict, extractor: dict | None = None) -> dict:
    """``extractor``: the record of the image extractor the training features came from (its spec, the sha256 of
    its files, where it was), which aoanet-export serves the model with."""
    meta = {
        "format": FORMAT,
        "vocab_size": model.vocab_size,
        "options": model.options.to_dict(),
        "ix_to_word": {str(k): v for k, v in ix_to_word.items()},
    }
    if extractor is not None:
        meta["extractor"] = extractor
    return meta


def model_json_bytes(model: AoAModel, ix_to_word: dict, extractor: dict | None = None) -> bytes:
    return json.dumps(model_meta(model, ix_to_word, extractor), indent=1).encode("utf-8")


def write_model_json(directory: Path, model: AoAModel, ix_to_word: dict, extractor: dict | None = None) -> None:
    atomic_write_bytes(Path(directory) / "model.json", model_json_bytes(model, ix_to_word, extractor))


def _versioned_json(data: bytes, source, kind: str, expected: str) -> dict:
    """``data`` as a JSON object whose "format" is ``expected``, or a CheckpointError naming ``source``."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source} is not valid JSON ({e}): the {kind} is damaged") from None
    if not isinstance(obj, dict) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: unknown {kind} format {found!r} (expected {expected!r})")
    return obj


def parse_model_json(data: bytes, source: str) -> dict:
    meta = _versioned_json(data, source, "checkpoint", FORMAT)
    for key in ("vocab_size", "options", "ix_to_word"):
        if key not in meta:
            raise CheckpointError(f"{source}: field {key!r} is missing")
    if not isinstance(meta["ix_to_word"], dict) or len(meta["ix_to_word"]) != meta["vocab_size"]:
        n = len(meta["ix_to_word"]) if isinstance(meta["ix_to_word"], dict) else "no"
        raise CheckpointError(f"{source}: ix_to_word has {n} words but vocab_size is {meta['vocab_size']}")
    return meta


def read_model_json(directory: Path) -> dict:
    """The model description of a checkpoint directory (verified against its manifest)."""
    return with_checkpoint(directory, lambda ck: ck.model_meta())


# ----------------------------------------------------------------------------------------------- tensors
def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise CheckpointError(
            "checkpoints are stored as safetensors, which is not installed: pip install 'aoanet[train]' "
            "(or pip install safetensors)"
        ) from None
    return safetensors.numpy


def _as_array(value) -> np.ndarray:
    return np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else np.asarray(value))


def tensors_to_bytes(arrays: dict, metadata: dict | None = None) -> bytes:
    """name -> array (or paddle Tensor) as safetensors bytes; ``metadata`` is str -> str."""
    return _safetensors_numpy().save({k: _as_array(v) for k, v in arrays.items()}, metadata=metadata)


def safetensors_metadata(data: bytes, source: str) -> dict:
    """The ``__metadata__`` of a safetensors file (its JSON header; safetensors.numpy.load does not return it)."""
    try:
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header of {n} bytes in a file of {len(data)}")
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source} is not a safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def tensors_from_bytes(data: bytes, source: str) -> dict[str, np.ndarray]:
    st = _safetensors_numpy()
    try:
        arrays = st.load(data)
    except Exception as e:  # safetensors raises its own error type (SafetensorError) and others on foreign bytes
        raise CheckpointError(f"{source} could not be read as safetensors ({type(e).__name__}: {e})") from None
    return dict(arrays)


def weights_bytes(model: AoAModel) -> bytes:
    return tensors_to_bytes(model.state_dict(), {"format": "aoanet-weights/1"})


def _is_tensor(value) -> bool:
    return isinstance(value, (np.ndarray, paddle.Tensor))


def optimizer_bytes(state: dict) -> bytes:
    """A (portable) optimizer state dict as safetensors: its tensors as arrays, nested dicts of tensors (AMP master
    weights) as ``outer/inner`` names, and its plain values (LR scheduler state) as JSON in the metadata."""
    arrays, nested, values = {}, [], {}
    for key, value in state.items():
        if _is_tensor(value):
            arrays[key] = value
        elif isinstance(value, dict) and value and all(_is_tensor(v) for v in value.values()):
            nested.append(key)
            arrays.update((f"{key}/{k}", v) for k, v in value.items())
        else:
            values[key] = value
    try:
        extra = json.dumps({"format": OPTIMIZER_FORMAT, "nested": nested, "values": values}, default=_json_scalar)
    except TypeError as e:
        raise CheckpointError(f"the optimizer state holds a value that cannot be saved as JSON ({e})") from None
    return tensors_to_bytes(arrays, {"aoanet": extra})


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def optimizer_from_bytes(data: bytes, source: str) -> dict:
    arrays = tensors_from_bytes(data, source)
    try:
        extra = json.loads(safetensors_metadata(data, source).get("aoanet", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{source}: its metadata is not valid JSON ({e})") from None
    state = dict(extra.get("values", {}))
    nested = set(extra.get("nested", []))
    for name, array in arrays.items():
        outer, _, inner = name.partition("/")
        if inner and outer in nested:
            state.setdefault(outer, {})[inner] = array
        else:
            state[name] = array
    return state


# ----------------------------------------------------------------------------------------------- reading
class Checkpoint:
    """A checkpoint directory as its manifest describes it (or, for an earlier version's directory, its flat files).

    ``read(role)`` returns a file's bytes after checking their size and sha256 against the manifest; the parsed
    accessors (``model_meta``, ``weights``, ``optimizer_state``, ``state``, ``config_text``) read through it."""

    def __init__(self, directory: Path, manifest: dict | None, manifest_bytes: bytes | None = None):
        self.directory = Path(directory)
        self.manifest = manifest
        self._manifest_bytes = manifest_bytes

    @classmethod
    def open(cls, directory) -> Checkpoint:
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"{d}: checkpoint directory not found")
        path = d / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if (d / "model.json").is_file():
                _notice(
                    f"note: {d} is a checkpoint of an earlier version (no {MANIFEST}): its pickled weights are read "
                    "with a restricted unpickler (arrays only), but its files cannot be verified"
                )
                return cls(d, None)
            raise CheckpointError(f"{d} is not a checkpoint directory: it has no {MANIFEST}") from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read: {e}") from None
        return cls(d, _parse_manifest(data, path), data)

    @property
    def legacy(self) -> bool:
        return self.manifest is None

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def has(self, role: str) -> bool:
        if self.manifest is None:
            return role in LEGACY_NAMES and (self.directory / LEGACY_NAMES[role]).is_file()
        return role in self.manifest["files"]

    def path(self, role: str) -> Path:
        if self.manifest is None:
            return self.directory / LEGACY_NAMES[role]
        return self.directory / self.manifest["files"][role]["path"]

    def sha256(self, role: str) -> str:
        if self.manifest is None:
            return sha256_bytes(self.read(role))
        return self.manifest["files"][role]["sha256"]

    def weights_role(self, which: str) -> str:
        """'best' falls back to the last weights when no validation ran."""
        if which not in WEIGHTS:
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        role = WEIGHTS[which]
        if which == "best" and not self.has(role):
            role = WEIGHTS["last"]
        if not self.has(role):
            raise CheckpointError(f"{self.directory}: no weights file ({FILE_NAMES[role]})")
        return role

    def _moved(self) -> bool:
        try:
            return self.manifest_path.read_bytes() != self._manifest_bytes
        except OSError:
            return True

    def read(self, role: str) -> bytes:
        if not self.has(role):
            raise CheckpointError(f"{self.directory}: the checkpoint has no {FILE_NAMES.get(role, role)}")
        path = self.path(role)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if self.manifest is not None and self._moved():
                raise CheckpointMoved(f"{path} went away while it was read") from None
            raise CheckpointError(
                f"{path} is missing (listed in {self.manifest_path}): the checkpoint is incomplete") from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read: {e}") from None
        if self.manifest is not None:
            entry = self.manifest["files"][role]
            got = sha256_bytes(data) if len(data) == entry["bytes"] else None
            if got != entry["sha256"]:
                if self._moved():
                    raise CheckpointMoved(f"{path} changed while it was read")
                what = f"sha256 {got}" if got else f"{len(data)} bytes"
                raise CheckpointError(
                    f"{path} does not match {self.manifest_path} (expected {entry['bytes']} bytes with sha256 "
                    f"{entry['sha256']}, found {what}): the file was modified, corrupted or mixed in from another "
                    "save; the checkpoint is refused"
                )
        return data

    def model_meta(self) -> dict:
        return parse_model_json(self.read("model"), str(self.path("model")))

    def weights(self, which: str = "last") -> tuple[dict[str, np.ndarray], str]:
        """(name -> array, the file's path) of the 'last' or 'best' weights (best falls back to last)."""
        role = self.weights_role(which)
        data, source = self.read(role), str(self.path(role))
        if self.manifest is None:
            try:
                state = load_paddle_state(data, source)
            except UnsafePickleError as e:
                raise CheckpointError(str(e)) from None
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        else:
            state = tensors_from_bytes(data, source)
        return state, source

    def optimizer_state(self) -> dict | None:
        if not self.has("optimizer"):
            return None
        data, source = self.read("optimizer"), str(self.path("optimizer"))
        if self.manifest is None:
            try:
                return load_paddle_state(data, source)
            except (UnsafePickleError, ValueError) as e:
                raise CheckpointError(str(e)) from None
        return optimizer_from_bytes(data, source)

    def state(self) -> dict | None:
        if not self.has("state"):
            return None
        data = self.read("state")
        try:
            state = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{self.path('state')} is not valid JSON ({e}): the training state is damaged") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path('state')} is not a training state")
        return state

    def config_text(self) -> str | None:
        if not self.has("config"):
            return None
        try:
            return self.read("config").decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path('config')} is not UTF-8 text ({e})") from None

    def describe(self) -> str:
        if self.manifest is None:
            return "a checkpoint of an earlier version"
        m = self.manifest
        if m.get("iteration") is None:
            return "a checkpoint"
        return f"a checkpoint ({m.get('stage', '?')}, iteration {m.get('iteration')})"


def _parse_manifest(data: bytes, path: Path) -> dict:
    manifest = _versioned_json(data, path, "manifest", MANIFEST_FORMAT)
    files = manifest.get("files")
    if not isinstance(files, dict) or "model" not in files or "weights_last" not in files:
        raise CheckpointError(f"{path}: the 'files' list must name at least the model and its weights")
    for role, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"])
        )
        rel = Path(entry["path"]) if ok else None
        if not ok or rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2:
            raise CheckpointError(f"{path}: bad entry for {role!r}: {entry!r}")
    return manifest


def with_checkpoint(directory, fn, attempts: int = 3):
    """``fn(Checkpoint.open(directory))``, again if a training run switched to a new save while it was read."""
    for _ in range(attempts):
        try:
            return fn(Checkpoint.open(directory))
        except CheckpointMoved:
            continue
    raise CheckpointError(
        f"{directory}: the checkpoint kept changing while it was read (a run is saving into it); try again"
    )


# ----------------------------------------------------------------------------------------------- writing
class CheckpointWriter:
    """Writes saves into a checkpoint directory (the caller holds its lock, or owns the directory)."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def current(self) -> dict | None:
        try:
            return _parse_manifest((self.directory / MANIFEST).read_bytes(), self.directory / MANIFEST)
        except FileNotFoundError:
            return None

    def _new_name(self, iteration) -> str:
        base = f"{SAVE_PREFIX}{int(iteration or 0):08d}"
        current = self.current()
        used = {Path(e["path"]).parts[0] for e in current["files"].values()} if current else set()
        name, n = base, 0
        while name in used:
            n += 1
            name = f"{base}.{n}"
        return name

    def save(self, files: dict[str, bytes], same: dict[str, str] | None = None, keep: Iterable[str] = (),
             info: dict | None = None) -> dict:
        """Write one save: ``files`` (role -> bytes) into a new save directory; ``same`` (role -> role) lists roles
        whose entry is another's (the best weights when they are this save's); ``keep`` lists roles carried over from
        the current manifest when not given (the best weights of an earlier save). Returns the new manifest."""
        info = dict(info or {})
        self.directory.mkdir(parents=True, exist_ok=True)
        name = self._new_name(info.get("iteration"))
        tmp = self.directory / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        current = self.current()
        # the files kept from the current save, by content: a new file with the same bytes points at the kept one
        # (the final save of a run, right after the validation save that made the same weights the best)
        kept = {(e["sha256"], e["bytes"]): e for role, e in (current or {"files": {}})["files"].items() if role in keep}
        entries = {}
        for role, data in files.items():
            digest = sha256_bytes(data)
            if role.startswith("weights") and (digest, len(data)) in kept:
                entries[role] = dict(kept[(digest, len(data))])
                continue
            file_name = FILE_NAMES.get(role, role)
            with open(tmp / file_name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            entries[role] = {"path": f"{name}/{file_name}", "bytes": len(data), "sha256": digest}
        fsync_dir(tmp)
        target = self.directory / name
        if target.exists():  # an unlisted leftover of a killed save
            shutil.rmtree(target)
        os.rename(tmp, target)
        fsync_dir(self.directory)
        for role, other in (same or {}).items():
            entries[role] = dict(entries[other])
        for role in keep:
            if role not in entries and current is not None and role in current["files"]:
                entries[role] = current["files"][role]
        manifest = {"format": MANIFEST_FORMAT, "save": name, **info, "files": entries}
        atomic_write_bytes(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        fsync_dir(self.directory)
        self.collect_garbage(manifest)
        return manifest

    def collect_garbage(self, manifest: dict | None = None) -> list[str]:
        """Delete what the manifest does not list: older saves' files, leftovers of killed saves (temporary
        directories and files). Only for the directory's writer. Returns what was deleted."""
        if manifest is None:
            manifest = self.current()
        listed = {e["path"] for e in manifest["files"].values()} if manifest else set()
        removed = []
        if not self.directory.is_dir():
            return removed
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                _remove(entry)
                removed.append(entry.name)
            elif entry.name.startswith(SAVE_PREFIX) and entry.is_dir() and manifest is not None:
                for f in sorted(entry.iterdir()):
                    if f"{entry.name}/{f.name}" not in listed:
                        _remove(f)
                        removed.append(f"{entry.name}/{f.name}")
                if not any(entry.iterdir()):
                    entry.rmdir()
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _run_entry(name: str) -> bool:
    return (name in _RUN_ENTRIES or name.startswith(SAVE_PREFIX)
            or (name.startswith(".") and name.endswith(".tmp")))


def prepare_new_run(directory, overwrite: bool = False) -> None:
    """Refuse to start a new run in a directory that holds anything (a checkpoint, metrics, other files) unless
    ``overwrite``; with it, delete what an earlier run wrote there, and refuse if anything else is there."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d} exists and is not a directory (train.checkpoint_path)")
    entries = sorted(p for p in d.iterdir() if p.name not in _IGNORED_ENTRIES) if d.is_dir() else []
    if not entries:
        return
    if not overwrite:
        try:
            what = Checkpoint.open(d).describe()
        except CheckpointError:
            what = "files of an earlier run (" + ", ".join(p.name for p in entries[:4]) + \
                (", ..." if len(entries) > 4 else "") + ")"
        raise CheckpointError(
            f"{d} already holds {what}; pass --resume to continue that run, or --overwrite to delete it and start "
            "a new one (or choose another train.checkpoint_path)"
        )
    foreign = [p.name for p in entries if not _run_entry(p.name)]
    if foreign:
        raise CheckpointError(
            f"{d} holds files no training run writes ({', '.join(foreign[:5])}): not deleting them, even with "
            "--overwrite; choose another train.checkpoint_path"
        )
    for p in sorted(entries, key=lambda p: p.name != MANIFEST):  # the manifest first: no half-deleted set is valid
        _remove(p)


def save_model_dir(directory, model: AoAModel, ix_to_word: dict, config_text: str | None = None,
                   extra: dict[str, bytes] | None = None, extractor: dict | None = None) -> dict:
    """Write a checkpoint that holds a model only (no training state): model.json (with ``extractor``, see
    model_meta), weights (best = last), config.yml when given, and ``extra`` files (name -> bytes). For converted
    models, benchmarks and tests."""
    files = {"model": model_json_bytes(model, ix_to_word, extractor), "weights_last": weights_bytes(model)}
    if config_text is not None:
        files["config"] = config_text.encode("utf-8")
    files.update(extra or {})
    return CheckpointWriter(directory).save(files, same={"weights_best": "weights_last"}, info={"iteration": 0})


# ----------------------------------------------------------------------------------------------- loading
def load_state_dict_checked(model: AoAModel, state: dict, source: str) -> None:
    """Load weights, with an error listing missing, unexpected, mis-shaped and non-numeric or non-finite tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped, bad = [], []
    for k in own:
        if k not in state:
            continue
        value = state[k]
        if not isinstance(value, (np.ndarray, paddle.Tensor)):
            bad.append(f"{k}: a {type(value).__name__}, not an array")
            continue
        if list(value.shape) != list(own[k].shape):
            misshaped.append(f"{k}: checkpoint {list(value.shape)} vs model {list(own[k].shape)}")
            continue
        array = value.numpy() if isinstance(value, paddle.Tensor) else value
        if not np.issubdtype(array.dtype, np.floating):
            bad.append(f"{k}: dtype {array.dtype}, expected floating point")
        elif not np.isfinite(array).all():
            bad.append(f"{k}: has NaN or infinite values")
    if missing or unexpected or misshaped or bad:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped: {'; '.join(misshaped)}")
        if bad:
            parts.append(f"bad values: {'; '.join(bad)}")
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts))
    model.set_state_dict({k: v.astype(np.float32, copy=False) if isinstance(v, np.ndarray) else v
                          for k, v in state.items()})


def _build(ck: Checkpoint, which: str) -> tuple[AoAModel, dict, str]:
    meta = ck.model_meta()
    state, source = ck.weights(which)
    try:
        options = ModelOptions.from_dict(meta["options"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ck.path('model')}: bad model options ({e})") from None
    model = AoAModel(int(meta["vocab_size"]), options)
    load_state_dict_checked(model, state, source)
    model.eval()
    return model, meta["ix_to_word"], ck.weights_role(which)


def load_model(directory, which: str = "best") -> tuple[AoAModel, dict]:
    """Rebuild the model of a checkpoint directory in eval mode -> (model, ix_to_word), every file used verified.

    ``which`` is 'best' (the best weights, falling back to the last when no validation ran) or 'last'.
    """
    if which not in WEIGHTS:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    model, ix_to_word, _ = with_checkpoint(directory, lambda ck: _build(ck, which))
    return model, ix_to_word


def load_model_from(ck: Checkpoint, which: str = "best") -> tuple[AoAModel, dict, str]:
    """``load_model`` on an opened checkpoint -> (model, ix_to_word, the weights' role), for callers that also
    report which file they used (the export's manifest)."""
    if which not in WEIGHTS:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    return _build(ck, which)


def portable_optimizer_state(model, optimizer) -> dict:
    """Optimizer state keyed by structured parameter names (``embed.0.weight_moment1_0``), not by Paddle's
    auto-generated ones (``embedding_2.w_0_…``), which differ between processes and model instances."""
    names = sorted(((p.name, n) for n, p in model.named_parameters()), key=lambda x: -len(x[0]))
    out = {}
    for key, value in optimizer.state_dict().items():
        for auto, structured in names:
            if key.startswith(auto + "_"):
                key = structured + key[len(auto) :]
                break
        out[key] = value
    return out


def _to_tensors(value):
    if isinstance(value, np.ndarray):
        return paddle.to_tensor(value)
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    return value


def load_portable_optimizer_state(model, optimizer, state: dict) -> None:
    names = sorted(((n, p.name) for n, p in model.named_parameters()), key=lambda x: -len(x[0]))
    out = {}
    for key, value in state.items():
        for structured, auto in names:
            if key.startswith(structured + "_"):
                key = auto + key[len(structured) :]
                break
        out[key] = _to_tensors(value)
    optimizer.set_state_dict(out)
