"""The bottom-up feature files: names, writing and checked reading (docs/data.md, "Formats").

``cocobu_att/<id>.npz`` (np.savez_compressed, key ``feat``, (K, F) float32), ``cocobu_fc/<id>.npy`` ((F,)
float32, the mean of the K regions) and ``cocobu_box/<id>.npy`` ((K, 4) float32, x1 y1 x2 y2 in pixels). Every
reader error is a DataError naming the file and the image id.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from aoanet.data.atomic import atomic_path
from aoanet.data.errors import DataError
from aoanet_runtime.features import read_npy_header

ATT_DIR, FC_DIR, BOX_DIR = "cocobu_att", "cocobu_fc", "cocobu_box"


def att_path(att_dir: str | os.PathLike, image_id: int) -> Path:
    return Path(att_dir) / f"{image_id}.npz"


def npy_path(directory: str | os.PathLike, image_id: int) -> Path:
    return Path(directory) / f"{image_id}.npy"


def feature_dirs(out_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The att/fc/box directories of a prepared data directory."""
    out = Path(out_dir)
    return out / ATT_DIR, out / FC_DIR, out / BOX_DIR


def write_image_features(
    att_dir, fc_dir, box_dir, image_id: int, att: np.ndarray, boxes: np.ndarray, fc: np.ndarray | None = None
) -> None:
    """Write the three files of one image, each atomically; the fc vector is ``fc`` or, by default, the mean of
    the regions, as in the reference's make_bu_data. The box file is written last: an image whose three files
    exist is complete."""
    att = np.ascontiguousarray(att, dtype=np.float32)
    with atomic_path(att_path(att_dir, image_id)) as tmp:
        # A file object, because np.savez appends ".npz" to a path that does not end with it.
        with open(tmp, "wb") as f:
            np.savez_compressed(f, feat=att)
    with atomic_path(npy_path(fc_dir, image_id)) as tmp, open(tmp, "wb") as f:
        np.save(f, att.mean(axis=0) if fc is None else np.asarray(fc, dtype=np.float32))
    with atomic_path(npy_path(box_dir, image_id)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(boxes, dtype=np.float32))


def read_att(path: str | os.PathLike, image_id: int, att_feat_size: int | None = None) -> np.ndarray:
    """The (K, F) float32 region features of one image, checked: present, readable, key ``feat``, 2-D, K >= 1,
    F == att_feat_size (when given), finite."""
    path = Path(path)
    where = f"{path} (image id {image_id})"
    try:
        with np.load(path) as npz:
            if "feat" not in npz.files:
                raise DataError(f"{where}: no array 'feat' in the npz (has: {', '.join(npz.files) or 'nothing'})")
            feat = npz["feat"]
    except FileNotFoundError as e:
        raise DataError(f"{where}: feature file missing") from e
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{where}: cannot read feature file ({type(e).__name__}: {e})") from e
    if not isinstance(feat, np.ndarray) or feat.ndim != 2 or feat.shape[0] < 1:
        raise DataError(f"{where}: 'feat' must have shape (regions >= 1, width), got {getattr(feat, 'shape', None)}")
    if att_feat_size is not None and feat.shape[1] != att_feat_size:
        raise DataError(
            f"{where}: feature width {feat.shape[1]} disagrees with att_feat_size={att_feat_size} in the config"
        )
    if feat.dtype != np.float32:
        if not np.issubdtype(feat.dtype, np.floating):
            raise DataError(f"{where}: 'feat' has dtype {feat.dtype}, expected float32")
        feat = feat.astype(np.float32)
    if not np.isfinite(feat).all():
        raise DataError(f"{where}: 'feat' contains NaN or infinite values")
    return feat


def _check_size(shape, dtype, header_end: int, size: int, what: str) -> None:
    """A file (or npz member) holding fewer bytes than its header's shape needs is truncated."""
    needed = header_end + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size < needed:
        raise ValueError(f"{what} is truncated: {size} bytes, its header's shape {tuple(shape)} needs {needed}")


def npz_header(path: str | os.PathLike, key: str = "feat") -> tuple[tuple, np.dtype]:
    """Shape and dtype of one array in an npz, reading only its header (no decompression of the data): this
    keeps ``aoanet-data check`` fast on 123k images; the member's declared size must hold that shape. Raises
    KeyError if the key is absent."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{key}.npy")
        with z.open(info) as f:
            shape, dtype = read_npy_header(f)
            _check_size(shape, dtype, f.tell(), info.file_size, f"array {key!r}")
            return shape, dtype


def npy_header(path: str | os.PathLike) -> tuple[tuple, np.dtype]:
    """Shape and dtype of a .npy from its header; the file's size must hold that shape (a truncated file is an
    error)."""
    with open(path, "rb") as f:
        shape, dtype = read_npy_header(f)
        _check_size(shape, dtype, f.tell(), os.fstat(f.fileno()).st_size, "the file")
        return shape, dtype
