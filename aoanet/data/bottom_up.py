"""``aoanet-data bu``: bottom-up-attention TSVs -> cocobu_att / cocobu_fc / cocobu_box (docs/data.md).

Each TSV line holds ``image_id, image_w, image_h, num_boxes, boxes, features`` separated by tabs, ``boxes``
and ``features`` being base64 float32 arrays of num_boxes x 4 and num_boxes x F values. The files were written
by Python's csv module with a tab delimiter; base64 never contains a tab, quote or newline, so splitting each
line on tabs reads them exactly, without the csv module's field-size limit (a 100-box line is over 1 MB).

The conversion streams one line at a time (a TSV is ~10-20 GB). An image whose three output files all exist is
skipped without decoding, so an interrupted run can simply be started again; the outputs are written
atomically, so an existing file is always complete. A malformed or truncated line is an error naming the file,
the line number and the image id.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aoanet.data.errors import DataError
from aoanet.data.features import att_path, npy_path, write_image_features

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def _decode(field: bytes, where: str, name: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{where}: field '{name}' is not valid base64 ({e}); the line looks truncated") from e
    if len(raw) % 4:
        raise DataError(
            f"{where}: field '{name}' decodes to {len(raw)} bytes, not whole float32 values (truncated line?)"
        )
    return np.frombuffer(raw, dtype=np.float32)


def parse_line(fields: list[bytes], where: str, feat_dim: int | None) -> tuple[int, np.ndarray, np.ndarray]:
    """Decode one split TSV line into (image_id, boxes (K, 4), features (K, F)), checking every count."""
    image_id = int(fields[0])
    where = f"{where}, image id {image_id}"
    if len(fields) != len(FIELDS):
        raise DataError(
            f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDS)} "
            f"({', '.join(FIELDS)}); the line looks truncated"
        )
    try:
        num_boxes = int(fields[3])
    except ValueError as e:
        raise DataError(f"{where}: field 'num_boxes' is {fields[3][:20]!r}, not an integer") from e
    if num_boxes < 1:
        raise DataError(f"{where}: field 'num_boxes' is {num_boxes}, expected >= 1")
    boxes = _decode(fields[4], where, "boxes")
    feats = _decode(fields[5], where, "features")
    if boxes.size != num_boxes * 4:
        raise DataError(
            f"{where}: field 'boxes' has {boxes.size} values, expected num_boxes x 4 = {num_boxes * 4} "
            f"(truncated line?)"
        )
    width = feat_dim if feat_dim is not None else feats.size // num_boxes
    if width < 1 or feats.size != num_boxes * width:
        raise DataError(
            f"{where}: field 'features' has {feats.size} values, expected num_boxes x width = "
            f"{num_boxes} x {width if feat_dim is not None else 'F'} (truncated line?)"
        )
    if not np.isfinite(feats).all():
        bad = np.unique(np.nonzero(~np.isfinite(feats.reshape(num_boxes, width)))[0])
        raise DataError(f"{where}: field 'features' has NaN or infinite values (region(s) {bad[:5].tolist()})")
    if not np.isfinite(boxes).all():
        raise DataError(f"{where}: field 'boxes' has NaN or infinite values")
    return image_id, boxes.reshape(num_boxes, 4), feats.reshape(num_boxes, width)


def convert_tsv(
    tsv_paths: list[str | os.PathLike],
    att_dir: str | os.PathLike,
    fc_dir: str | os.PathLike,
    box_dir: str | os.PathLike,
    feat_dim: int | None = None,
) -> dict:
    """Convert every line of every TSV; returns counts of converted and skipped images and the feature width.

    Without ``feat_dim`` the width is taken from the first decoded line and every later line must agree with
    it; giving it (2048 for the COCO files) also catches a first line truncated at a whole number of regions.
    """
    paths = [Path(p) for p in tsv_paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: TSV file not found")
    for d in (att_dir, fc_dir, box_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    stats = {"converted": 0, "skipped": 0, "feat_dim": None, "regions_min": None, "regions_max": None}
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="bottom-up TSV") as bar:
        for path in paths:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    bar.update(len(line))
                    line = line.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    fields = line.split(b"\t")
                    where = f"{path}:{lineno}"
                    try:
                        image_id = int(fields[0])
                    except ValueError as e:
                        raise DataError(f"{where}: field 'image_id' is {fields[0][:20]!r}, not an integer") from e
                    if all(
                        p.exists()
                        for p in (
                            att_path(att_dir, image_id),
                            npy_path(fc_dir, image_id),
                            npy_path(box_dir, image_id),
                        )
                    ):
                        stats["skipped"] += 1
                        continue
                    image_id, boxes, feats = parse_line(fields, where, feat_dim)
                    feat_dim = feats.shape[1]
                    write_image_features(att_dir, fc_dir, box_dir, image_id, feats, boxes)
                    k = feats.shape[0]
                    stats["converted"] += 1
                    stats["regions_min"] = k if stats["regions_min"] is None else min(stats["regions_min"], k)
                    stats["regions_max"] = k if stats["regions_max"] is None else max(stats["regions_max"], k)
    stats["feat_dim"] = feat_dim
    return stats
