"""The nearest-neighbour caption baseline: what copying a caption from the most similar training image scores.

For each image of ``split``, find the training (train + restval) image whose mean feature (``cocobu_fc``) is
closest in Euclidean distance and return that image's first caption (its tokens joined by spaces). A
captioning model that really reads the regions should score well above this; the demo reports the ratio of its
XE model's CIDEr to the baseline's (``xe_vs_baseline_cider``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aoanet.data.errors import DataError
from aoanet.data.features import npy_path
from aoanet.data.karpathy import image_id, in_split, load_dataset


def _load_fc(fc_dir: Path, images: list[dict], what: str) -> np.ndarray:
    rows = []
    for img in tqdm(images, desc=f"fc features ({what})", unit="img", mininterval=1.0):
        iid = image_id(img)
        path = npy_path(fc_dir, iid)
        try:
            fc = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} (image id {iid}): cannot read fc feature ({e})") from e
        if fc.ndim != 1 or (rows and fc.shape != rows[0].shape):
            raise DataError(
                f"{path} (image id {iid}): fc feature has shape {fc.shape}, expected "
                f"{rows[0].shape if rows else '(F,)'}"
            )
        rows.append(fc.astype(np.float32))
    return np.stack(rows)


def nearest_neighbour_captions(
    dataset_json_path_or_dir: str | os.PathLike, fc_dir: str | os.PathLike, split: str = "test"
) -> list[dict]:
    """``[{"image_id": int, "caption": str}]`` for every image of ``split``, in file order."""
    path = Path(dataset_json_path_or_dir)
    if path.is_dir():
        path = path / "dataset_coco.json"
    images = load_dataset(path)
    train = [img for img in images if in_split(img["split"], "train")]
    queries = [img for img in images if in_split(img["split"], split)]
    if not train or not queries:
        raise DataError(f"{path}: need training images and {split!r} images (have {len(train)} and {len(queries)})")
    fc_dir = Path(fc_dir)
    train_fc, query_fc = _load_fc(fc_dir, train, "train"), _load_fc(fc_dir, queries, split)
    if train_fc.shape[1] != query_fc.shape[1]:
        raise DataError(
            f"{fc_dir}: fc widths differ between train ({train_fc.shape[1]}) and {split} ({query_fc.shape[1]})"
        )
    # ||q - t||^2 = |q|^2 - 2 q.t + |t|^2; |q|^2 is constant per query. Chunked to bound memory at COCO scale.
    t_sq = (train_fc.astype(np.float64) ** 2).sum(axis=1)
    nearest = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), 1024):
        d = t_sq[None, :] - 2.0 * (query_fc[s : s + 1024].astype(np.float64) @ train_fc.T.astype(np.float64))
        nearest[s : s + 1024] = d.argmin(axis=1)
    return [
        {"image_id": image_id(q), "caption": " ".join(train[int(j)]["sentences"][0]["tokens"])}
        for q, j in zip(queries, nearest, strict=True)
    ]
