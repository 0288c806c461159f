"""cocotalk.json + cocotalk_label.h5: loading them and checking that they agree (docs/data.md, "Formats").

:func:`inspect_labels` collects every problem (for ``aoanet-data check``); :func:`load_labels` is the strict
version the loader uses, raising one DataError that lists them. Labels are read into memory whole: at full
COCO size they are 616k x 16 uint32 = 40 MB, and per-item h5 reads in loader workers would be slower and need
h5py handles that survive fork.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from aoanet.data.errors import DataError, Problem, raise_problems
from aoanet.data.karpathy import SPLITS, load_json

H5_FIELDS = ("labels", "label_start_ix", "label_end_ix")


@dataclass
class LabelSet:
    """The vocabulary, the images (cocotalk.json order) and their label rows."""

    vocab: dict[str, str]  # ix_to_word, keys "1".."V"
    images: list[dict]  # {"id", "split", "file_path"}
    labels: np.ndarray  # (M, L) uint32
    start: np.ndarray  # (N,) int64, 0-based first row of each image
    end: np.ndarray  # (N,) int64, exclusive

    def rows(self, ix: int) -> np.ndarray:
        return self.labels[self.start[ix] : self.end[ix]]


def _check_json(path: Path, problems: list[Problem]) -> tuple[dict, list] | None:
    try:
        data = load_json(path, "cocotalk json")
    except DataError as e:
        problems.append(Problem(path, None, str(e).removeprefix(f"{path}: ")))
        return None
    vocab, images = data.get("ix_to_word"), data.get("images")
    ok = True
    if not isinstance(vocab, dict) or not vocab:
        problems.append(Problem(path, None, "field 'ix_to_word' must be a non-empty object"))
        ok = False
    elif set(vocab) != {str(i) for i in range(1, len(vocab) + 1)}:
        problems.append(
            Problem(path, None, f'field \'ix_to_word\' keys must be "1".."{len(vocab)}" (1-based, no gaps)')
        )
        ok = False
    if not isinstance(images, list) or not images:
        problems.append(Problem(path, None, "field 'images' must be a non-empty list"))
        return None
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            problems.append(Problem(path, None, f"images[{i}]: field 'id' missing or not an integer"))
            ok = False
        elif img.get("split") not in SPLITS:
            problems.append(
                Problem(
                    path,
                    img["id"],
                    f"field 'split' is {img.get('split')!r}, expected one of {', '.join(SPLITS)}",
                )
            )
            ok = False
    return (vocab, images) if ok else None


def _read_h5(path: Path, problems: list[Problem]) -> dict | None:
    if not path.is_file():
        problems.append(Problem(path, None, "label h5 not found"))
        return None
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_FIELDS if k not in f]
            if missing:
                problems.append(Problem(path, None, f"missing dataset(s) {', '.join(missing)}"))
                return None
            out = {k: f[k][()] for k in (*H5_FIELDS, "label_length") if k in f}
    except OSError as e:
        problems.append(Problem(path, None, f"cannot read HDF5 file ({e})"))
        return None
    if out["labels"].ndim != 2:
        problems.append(Problem(path, None, f"dataset 'labels' must be 2-D, got shape {out['labels'].shape}"))
        return None
    return out


def _check_rows(h5_path: Path, h5: dict, ids: list[int], vocab_size: int, problems: list[Problem]) -> bool:
    """Per-image pointer and token checks; one problem per bad image."""
    labels = h5["labels"]
    m = labels.shape[0]
    start, end = h5["label_start_ix"].astype(np.int64), h5["label_end_ix"].astype(np.int64)
    bad_ptr = (start < 1) | (end < start) | (end > m)
    for i in np.flatnonzero(bad_ptr):
        problems.append(
            Problem(
                h5_path,
                ids[i],
                f"label_start_ix={start[i]} label_end_ix={end[i]}: not a "
                f"1-based inclusive range within the {m} label rows",
            )
        )
    if bad_ptr.any():
        return False
    # Which image each row belongs to, so row-level findings can name the image id.
    owner = np.full(m, -1, dtype=np.int64)
    for i in range(len(ids)):
        owner[start[i] - 1 : end[i]] = i
    too_big = labels.max(axis=1) > vocab_size
    nonzero = labels != 0
    # A token after a 0 means the row is not "tokens then padding".
    gap = (~nonzero[:, :-1] & nonzero[:, 1:]).any(axis=1)
    findings = [
        (too_big, f"token id above the vocabulary size {vocab_size}"),
        (gap, "a non-zero token after a 0 (rows must be tokens then zero padding)"),
    ]
    if "label_length" in h5:
        length = h5["label_length"]
        if length.shape != (m,):
            problems.append(Problem(h5_path, None, f"dataset 'label_length' has shape {length.shape}, expected ({m},)"))
        else:
            findings.append((length != nonzero.sum(axis=1), "label_length disagrees with the row's tokens"))
    for mask, message in findings:
        rows = np.flatnonzero(mask & (owner >= 0))
        for i in np.unique(owner[rows]):
            r = rows[owner[rows] == i]
            problems.append(
                Problem(
                    h5_path,
                    ids[i],
                    f"label row(s) {', '.join(map(str, r[:5].tolist()))}{' ...' if len(r) > 5 else ''}: {message}",
                )
            )
    return not any(mask.any() for mask, _ in findings)


def inspect_labels(input_json: str | os.PathLike, input_label_h5: str | os.PathLike):
    """Return (LabelSet or None, problems). The LabelSet is None whenever a problem was found."""
    json_path, h5_path = Path(input_json), Path(input_label_h5)
    problems: list[Problem] = []
    meta = _check_json(json_path, problems)
    h5 = _read_h5(h5_path, problems)
    if meta is None or h5 is None:
        return None, problems
    vocab, images = meta
    n = len(images)
    for k in ("label_start_ix", "label_end_ix"):
        if h5[k].shape != (n,):
            problems.append(
                Problem(
                    h5_path,
                    None,
                    f"dataset '{k}' has shape {h5[k].shape} but {json_path} lists "
                    f"{n} images: the h5 and the json disagree",
                )
            )
    if problems:
        return None, problems
    ids = [img["id"] for img in images]
    if not _check_rows(h5_path, h5, ids, len(vocab), problems) or problems:
        return None, problems
    labelset = LabelSet(
        vocab=vocab,
        images=images,
        labels=h5["labels"],
        start=h5["label_start_ix"].astype(np.int64) - 1,
        end=h5["label_end_ix"].astype(np.int64),
    )
    return labelset, problems


def load_labels(input_json: str | os.PathLike, input_label_h5: str | os.PathLike) -> LabelSet:
    labelset, problems = inspect_labels(input_json, input_label_h5)
    raise_problems(problems, f"{input_json} + {input_label_h5}")
    return labelset
