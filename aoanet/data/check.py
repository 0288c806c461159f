"""``aoanet-data check``: validate a prepared data directory and list every problem found.

It checks cocotalk.json against cocotalk_label.h5 (:func:`aoanet.data.labels.inspect_labels`), then every
image's feature files: the att npz exists and has a 2-D ``feat`` with at least one region and the expected
width, the fc vector has that width, the boxes are (K, 4) with the same K. By default only the array headers
and the files' sizes are read (fast on 123k images: a truncated file is found, a NaN or a corrupted byte is not);
``full=True`` decodes every array and also catches corrupt data and NaNs. If
``dataset_coco.json`` is in the directory, its images and caption counts are compared with cocotalk. Nothing
stops at the first problem.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aoanet.data.errors import DataError, Problem
from aoanet.data.features import (
    ATT_DIR,
    BOX_DIR,
    FC_DIR,
    att_path,
    npy_header,
    npy_path,
    npz_header,
    read_att,
)
from aoanet.data.karpathy import image_id, load_dataset, load_json
from aoanet.data.labels import inspect_labels


def _att_shape(path: Path, iid: int, full: bool) -> tuple[tuple | None, str | None]:
    """(shape, None) or (None, problem message) for one att file."""
    if not path.is_file():
        return None, "feature file missing"
    try:
        if full:
            return read_att(path, iid).shape, None
        shape, dtype = npz_header(path)
    except DataError as e:
        return None, str(e).split(": ", 1)[-1]
    except KeyError:
        return None, "no array 'feat' in the npz"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return None, f"cannot read feature file ({type(e).__name__}: {e})"
    except (zipfile.LargeZipFile, RuntimeError) as e:  # RuntimeError: encrypted or unsupported zip members
        return None, f"cannot read feature file ({type(e).__name__}: {e})"
    if len(shape) != 2 or shape[0] < 1 or not np.issubdtype(dtype, np.floating):
        return None, f"'feat' must be float (regions >= 1, width), got {dtype} {shape}"
    return shape, None


def _npy_shape(path: Path, full: bool) -> tuple[tuple | None, str | None]:
    if not path.is_file():
        return None, "file missing"
    try:
        if full:
            arr = np.load(path)
            if not np.isfinite(arr).all():
                return None, "contains NaN or infinite values"
            return arr.shape, None
        return npy_header(path)[0], None
    except (OSError, ValueError, EOFError) as e:
        return None, f"cannot read ({type(e).__name__}: {e})"


def check_features(
    ids: list[int],
    att_dir: Path,
    fc_dir: Path | None,
    box_dir: Path | None,
    att_feat_size: int | None,
    full: bool = False,
) -> tuple[list[Problem], dict]:
    problems: list[Problem] = []
    for d in (att_dir, fc_dir, box_dir):
        if d is not None and not d.is_dir():
            problems.append(Problem(d, None, "feature directory not found"))
    if not att_dir.is_dir():
        return problems, {}
    fc_dir = fc_dir if fc_dir is not None and fc_dir.is_dir() else None
    box_dir = box_dir if box_dir is not None and box_dir.is_dir() else None
    shapes: dict[int, tuple] = {}
    for iid in tqdm(ids, desc="check features", unit="img", mininterval=1.0):
        path = att_path(att_dir, iid)
        shape, msg = _att_shape(path, iid, full)
        if msg:
            problems.append(Problem(path, iid, msg))
        else:
            shapes[iid] = shape
    widths = Counter(s[1] for s in shapes.values())
    # Without a configured width, the most common one is taken as right and the others reported.
    width = att_feat_size if att_feat_size is not None else (widths.most_common(1)[0][0] if widths else None)
    for iid, shape in shapes.items():
        if shape[1] != width:
            problems.append(
                Problem(
                    att_path(att_dir, iid),
                    iid,
                    f"feature width {shape[1]} disagrees with "
                    f"{'att_feat_size' if att_feat_size is not None else 'the other images'}"
                    f"={width}",
                )
            )
    for iid in tqdm(ids, desc="check fc/box", unit="img", mininterval=1.0, disable=not (fc_dir or box_dir)):
        k = shapes.get(iid, (None,))[0]
        if fc_dir is not None:
            path = npy_path(fc_dir, iid)
            shape, msg = _npy_shape(path, full)
            if msg or shape != (width,):
                problems.append(Problem(path, iid, msg or f"fc feature has shape {shape}, expected ({width},)"))
        if box_dir is not None:
            path = npy_path(box_dir, iid)
            shape, msg = _npy_shape(path, full)
            if msg or len(shape) != 2 or shape[1] != 4 or (k is not None and shape[0] != k):
                problems.append(
                    Problem(
                        path,
                        iid,
                        msg or f"boxes have shape {shape}, expected ({k}, 4) to match the {k} regions of the att file",
                    )
                )
    regions = [s[0] for s in shapes.values()]
    stats = {
        "feat_dim": width,
        "regions_min": min(regions, default=None),
        "regions_max": max(regions, default=None),
    }
    return problems, stats


def check_raw(dataset_json: Path, labelset) -> list[Problem]:
    """dataset_coco.json vs cocotalk: same images in the same order, same number of captions each."""
    try:
        raw = load_dataset(dataset_json)
    except DataError as e:
        return [Problem(dataset_json, None, str(e).split(": ", 1)[-1])]
    problems = []
    if len(raw) != len(labelset.images):
        return [Problem(dataset_json, None, f"{len(raw)} images but cocotalk.json has {len(labelset.images)}")]
    for i, (r, img) in enumerate(zip(raw, labelset.images, strict=True)):
        if image_id(r) != img["id"]:
            problems.append(
                Problem(
                    dataset_json,
                    image_id(r),
                    f"images[{i}] is image id {image_id(r)}, cocotalk.json has {img['id']} there",
                )
            )
        elif len(r["sentences"]) != labelset.end[i] - labelset.start[i]:
            problems.append(
                Problem(
                    dataset_json,
                    img["id"],
                    f"{len(r['sentences'])} captions but the label h5 has {labelset.end[i] - labelset.start[i]} rows",
                )
            )
    return problems


def _image_ids(input_json: Path) -> list[int] | None:
    """The image ids of a cocotalk.json that is readable enough to name its images, else None."""
    try:
        images = load_json(input_json, "cocotalk json").get("images")
    except DataError:
        return None
    if not isinstance(images, list) or not all(isinstance(im, dict) and isinstance(im.get("id"), int) for im in images):
        return None
    return [im["id"] for im in images]


def check_data_dir(
    data_dir: str | os.PathLike,
    input_json=None,
    input_h5=None,
    att_dir=None,
    fc_dir=None,
    box_dir=None,
    att_feat_size: int | None = None,
    full: bool = False,
) -> tuple[list[Problem], dict]:
    """Every problem of a prepared data directory, and a summary of what was found."""
    d = Path(data_dir)
    input_json = Path(input_json) if input_json else d / "cocotalk.json"
    input_h5 = Path(input_h5) if input_h5 else d / "cocotalk_label.h5"
    labelset, problems = inspect_labels(input_json, input_h5)
    summary: dict = {}
    if labelset is not None:
        ids = [img["id"] for img in labelset.images]
        summary.update(
            images=len(ids),
            captions=int(labelset.labels.shape[0]),
            vocab_size=len(labelset.vocab),
            seq_length=int(labelset.labels.shape[1]),
            splits=dict(Counter(img["split"] for img in labelset.images)),
        )
    else:
        # The labels are broken, but the feature files can still be checked if the json names the images.
        ids = _image_ids(input_json)
        if ids is None:
            return problems, summary
    feat_problems, stats = check_features(
        ids,
        Path(att_dir) if att_dir else d / ATT_DIR,
        Path(fc_dir) if fc_dir else d / FC_DIR,
        Path(box_dir) if box_dir else d / BOX_DIR,
        att_feat_size,
        full,
    )
    problems += feat_problems
    summary.update(stats)
    raw = d / "dataset_coco.json"
    if raw.is_file() and labelset is not None:
        problems += check_raw(raw, labelset)
    return problems, summary
