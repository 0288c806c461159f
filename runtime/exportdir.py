"""Reading an export directory: its manifest and its model files, each checked before use."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from aoanet_runtime.contract import DECODER, ENCODER, MANIFEST, READABLE_FORMAT_VERSIONS

__all__ = ["ExportDirError", "load_manifest", "read_model", "sha256_bytes", "sha256_file"]


class ExportDirError(RuntimeError):
    """An export directory the runtime refuses: missing or unreadable manifest, unknown format version,
    missing or tampered model file (the message names the file)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(export_dir: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` of an export dir (format version and the fields the runtime uses)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ExportDirError(f"{export_dir}: export directory not found")
    if not path.is_file():
        raise ExportDirError(f"{export_dir} is not an export directory: {path} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportDirError(f"{path} cannot be read as JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ExportDirError(f"{path} is not a JSON object")
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ExportDirError(
            f"{path}: unknown format_version {version!r} (this runtime reads "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}); re-export the checkpoint with this version's "
            "aoanet-export, or upgrade the runtime"
        )
    missing = [k for k in ("ix_to_word", "unk_id", "vocab_size", "sizes", "files") if k not in manifest]
    missing += [f"sizes.{k}" for k in ("rnn_size", "att_feat_size") if k not in manifest.get("sizes", {})]
    missing += [f"files.{k}" for k in (ENCODER, DECODER) if k not in manifest.get("files", {})]
    if missing:
        raise ExportDirError(f"{path}: field(s) missing: {', '.join(missing)}")
    return manifest


def read_model(export_dir: Path, manifest: dict, name: str, verify: bool = True) -> bytes:
    """The bytes of one model file, checked against the manifest's sha256 (the bytes checked are the bytes
    loaded, so the file cannot change in between)."""
    path = Path(export_dir) / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportDirError(f"{path} is missing (listed in {MANIFEST})") from None
    except OSError as e:
        raise ExportDirError(f"{path} cannot be read: {e}") from None
    if verify:
        want = manifest["files"][name].get("sha256")
        got = sha256_bytes(data)
        if got != want:
            raise ExportDirError(
                f"{path} does not match its sha256 in {MANIFEST} (expected {want}, got {got}): the file was "
                "modified or belongs to another export"
            )
    return data
