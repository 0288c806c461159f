"""Region features for the runtime: finding the images to caption, reading and checking their files, batching.

Two layouts are read:

* the authors' (docs/data.md, "Formats"): ``DATA_DIR/cocotalk.json`` lists the images (``id``,
  ``split``) and ``DATA_DIR/cocobu_att/<id>.npz`` holds each one's regions (key ``feat``, (K, F) float32);
* a plain folder of ``<id>.npz`` (key ``feat``) or ``<id>.npy`` files, one (K, F) array per image.

Only numpy here (the runtime never imports the training package). Every error is a ``FeatureError`` naming the
file and the image id.

Bounds (docs/robustness.md): an image may have at most ``max_regions`` regions (default 1000; detectors give
10-100), checked from the file's header before anything is decoded; and batches are planned so that the estimated
working memory of each (``MemoryModel``, which grows with the square of the region count through the refiner's
self-attention) stays under ``max_batch_bytes`` (default 2 GiB): images with many regions are decoded in smaller
batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_JSON = "cocotalk.json"
ATT_DIR = "cocobu_att"
BOX_DIR = "cocobu_box"  # beside ATT_DIR: each image's regions as boxes, (K, 4) x1 y1 x2 y2 in pixels
FEAT_KEY = "feat"
SPLITS = ("train", "val", "test", "restval", "all")
DEFAULT_MAX_REGIONS = 1000
DEFAULT_MAX_BATCH_BYTES = 2 * 2**30


class FeatureError(ValueError):
    """Missing, unreadable or malformed region features (the message names the file and the image id)."""


@dataclass(frozen=True)
class ImageFile:
    image_id: int | str  # an int when the id is numeric (COCO), else the file's stem
    path: Path


# ---------------------------------------------------------------------------------------------- listing
def _image_id(stem: str) -> int | str:
    return int(stem) if stem.isdigit() else stem


def _in_split(img_split: str, split: str) -> bool:
    # The training side's rule: "train" includes restval.
    return split == "all" or img_split == split or (split == "train" and img_split == "restval")


def list_images(
    data_dir: str | os.PathLike | None = None,
    split: str = "test",
    input_json: str | os.PathLike | None = None,
    att_dir: str | os.PathLike | None = None,
) -> list[ImageFile]:
    """The images to caption, in a fixed order.

    With ``input_json`` (or ``DATA_DIR/cocotalk.json`` present): the images of ``split`` in the json's order,
    features in ``att_dir`` (default ``DATA_DIR/cocobu_att``, or ``cocobu_att`` next to the json).
    Otherwise ``data_dir`` (or ``att_dir``) is a plain folder of ``<id>.npz`` / ``<id>.npy``, taken whole
    (``split`` does not apply), sorted by id.
    """
    if split not in SPLITS:
        raise FeatureError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    data = Path(data_dir) if data_dir is not None else None
    if input_json is None and data is not None and (data / INPUT_JSON).is_file():
        input_json = data / INPUT_JSON
    if input_json is not None:
        input_json = Path(input_json)
        if att_dir is None:
            att_dir = (data if data is not None else input_json.parent) / ATT_DIR
        return _list_from_json(input_json, Path(att_dir), split)
    folder = Path(att_dir) if att_dir is not None else data
    if folder is None:
        raise FeatureError("give a data directory (or --input-json / --att-dir)")
    return _list_folder(folder)


def _list_from_json(input_json: Path, att_dir: Path, split: str) -> list[ImageFile]:
    try:
        info = json.loads(input_json.read_text())
    except FileNotFoundError:
        raise FeatureError(f"{input_json}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureError(f"{input_json}: cannot read it as JSON ({e})") from None
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(images, list):
        raise FeatureError(f"{input_json}: no 'images' list (is it a cocotalk.json?)")
    if not att_dir.is_dir():
        raise FeatureError(f"{att_dir}: feature directory not found (the {ATT_DIR}/ of {input_json})")
    out, seen_splits = [], set()
    for pos, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or "split" not in img:
            raise FeatureError(f"{input_json}: image #{pos} has no 'id' or 'split'")
        seen_splits.add(img["split"])
        if _in_split(img["split"], split):
            image_id = _image_id(str(img["id"]))
            out.append(ImageFile(image_id, att_dir / f"{img['id']}.npz"))
    if not out:
        raise FeatureError(
            f"{input_json}: split {split!r} has no images (splits present: {', '.join(sorted(seen_splits))})"
        )
    return out


def _list_folder(folder: Path) -> list[ImageFile]:
    if not folder.is_dir():
        raise FeatureError(f"{folder}: directory not found")
    by_id: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix not in (".npz", ".npy") or not path.is_file():
            continue
        if path.stem in by_id:
            raise FeatureError(
                f"{folder}: image id {path.stem} has two feature files ({by_id[path.stem].name}, {path.name})"
            )
        by_id[path.stem] = path
    if not by_id:
        raise FeatureError(f"{folder}: no {INPUT_JSON}, and no <id>.npz / <id>.npy feature files")
    # Numeric ids in numeric order, then the others by name.
    stems = sorted(by_id, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
    return [ImageFile(_image_id(s), by_id[s]) for s in stems]


# ---------------------------------------------------------------------------------------------- reading
def _where(path: Path, image_id) -> str:
    return f"{path} (image id {image_id})"


def _check_shape(shape, dtype, where: str, width: int | None) -> int:
    if len(shape) != 2:
        raise FeatureError(f"{where}: features must be 2-D (regions, width), got shape {tuple(shape)}")
    if shape[0] < 1:
        raise FeatureError(f"{where}: 0 regions (shape {tuple(shape)}); every image needs at least one")
    if width is not None and shape[1] != width:
        raise FeatureError(f"{where}: feature width {shape[1]}, the model expects {width}")
    if not np.issubdtype(dtype, np.floating):
        raise FeatureError(f"{where}: features have dtype {dtype}, expected float32")
    return int(shape[0])


@contextlib.contextmanager
def _reading(where: str):
    """Turn the ways a feature file can fail to read into one FeatureError naming the file and image."""
    try:
        yield
    except FileNotFoundError:
        raise FeatureError(f"{where}: feature file missing") from None
    except FeatureError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise FeatureError(f"{where}: cannot read the feature file ({type(e).__name__}: {e})") from None


def read_npy_header(f) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from the header of the ``.npy`` data at ``f``'s position, leaving ``f`` at the data; raises
    ValueError (or EOFError) when it is not one."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(f)
    return shape, dtype


def check_regions(count: int, where: str, max_regions: int | None) -> int:
    if max_regions is not None and count > max_regions:
        raise FeatureError(
            f"{where}: {count} regions, over the limit of {max_regions} per image (detectors give 10-100; memory "
            "grows with the square of the region count); raise it with --max-regions if this is intended"
        )
    return count


def region_count(image: ImageFile, width: int | None = None, max_regions: int | None = DEFAULT_MAX_REGIONS) -> int:
    """The region count of an image's file, from its header only (no decompression); checks the file is
    there, has the right key, shape and width, and at most ``max_regions`` regions (None: no limit). Fast enough to
    check a whole split before decoding."""
    path, where = image.path, _where(image.path, image.image_id)
    with _reading(where):
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                if f"{FEAT_KEY}.npy" not in z.namelist():
                    names = ", ".join(n.removesuffix(".npy") for n in z.namelist()) or "nothing"
                    raise FeatureError(f"{where}: no array '{FEAT_KEY}' in the npz (has: {names})")
                with z.open(f"{FEAT_KEY}.npy") as f:
                    shape, dtype = read_npy_header(f)
        else:
            with open(path, "rb") as f:
                shape, dtype = read_npy_header(f)
    return check_regions(_check_shape(shape, dtype, where, width), where, max_regions)


def read_features(image: ImageFile, width: int | None = None) -> np.ndarray:
    """The (K, F) float32 regions of one image, checked: readable, key ``feat`` (npz), 2-D, K >= 1, F ==
    ``width`` (when given), finite."""
    path, where = image.path, _where(image.path, image.image_id)
    with _reading(where):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if FEAT_KEY not in npz.files:
                    names = ", ".join(npz.files) or "nothing"
                    raise FeatureError(f"{where}: no array '{FEAT_KEY}' in the npz (has: {names})")
                feat = npz[FEAT_KEY]
        else:
            feat = np.load(path, allow_pickle=False)
    if not isinstance(feat, np.ndarray):
        raise FeatureError(f"{where}: not an array")
    _check_shape(feat.shape, feat.dtype, where, width)
    feat = np.asarray(feat, dtype=np.float32)
    if not np.isfinite(feat).all():
        raise FeatureError(f"{where}: features contain NaN or infinite values")
    return feat


# ---------------------------------------------------------------------------------------------- boxes
def box_path(image: ImageFile) -> Path:
    """Where an image's region boxes are in the reference layout: ``<id>.npy`` in the folder ``cocobu_box`` beside
    the folder of its features (DATA/cocobu_att/<id>.npz -> DATA/cocobu_box/<id>.npy)."""
    return image.path.parent.parent / BOX_DIR / f"{image.path.stem}.npy"


def check_boxes(image: ImageFile, regions: int) -> Path | None:
    """The path of the image's box file (``box_path``) after checking its header: (regions, 4), floating point;
    None when there is no such file. A file that is there but malformed is a FeatureError naming it."""
    path = box_path(image)
    if not path.is_file():
        return None
    where = _where(path, image.image_id)
    with _reading(where):
        with open(path, "rb") as f:
            shape, dtype = read_npy_header(f)
    if tuple(shape) != (regions, 4) or not np.issubdtype(dtype, np.floating):
        raise FeatureError(
            f"{where}: boxes of shape {tuple(shape)} ({dtype}); the image has {regions} regions, so ({regions}, 4) "
            "floats (x1 y1 x2 y2) are expected"
        )
    return path


def read_boxes(image: ImageFile, regions: int) -> np.ndarray:
    """float64 (regions, 4) boxes of an image (``check_boxes`` first), checked finite."""
    path = box_path(image)
    where = _where(path, image.image_id)
    with _reading(where):
        boxes = np.load(path, allow_pickle=False)
    if not isinstance(boxes, np.ndarray) or boxes.shape != (regions, 4) or not np.isfinite(boxes).all():
        raise FeatureError(f"{where}: boxes must be ({regions}, 4) finite numbers")
    return boxes.astype(np.float64)


# ---------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class MemoryModel:
    """An estimate of the working memory of captioning a batch (encoder and beam search), from the model's sizes.

    Per image padded to N regions: 4 bytes x (N x (F + 24 R) for the region features and the refiner's activations,
    + 3 x heads x N^2 for the self-attention scores); per batch, 16 MB more (kernels' scratch space). The factors come
    from peaks measured on a full-size model with both backends (``scripts/bench_memory.py``, docs/robustness.md),
    the Paddle dynamic graph being the larger."""

    BATCH_BYTES = 16 * 2**20

    att_feat_size: int
    rnn_size: int
    num_heads: int

    def image_bytes(self, regions: int) -> int:
        n = int(regions)
        return 4 * (n * (self.att_feat_size + 24 * self.rnn_size) + 3 * self.num_heads * n * n)

    def batch_bytes(self, images: int, regions: int) -> int:
        return self.BATCH_BYTES + int(images) * self.image_bytes(regions)


def batch_plan(
    region_counts: Sequence[int],
    batch_size: int,
    memory: MemoryModel | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
) -> list[np.ndarray]:
    """Split images into batches of at most ``batch_size``, grouping similar region counts (stable sort, most
    regions first) so that padding wastes little; each batch is an int64 array of positions. With ``memory``, a
    batch also holds no more images than fit in ``max_batch_bytes`` at its (largest) region count; an image that
    alone exceeds it is an error naming its position. Both backends of ``aoanet-infer`` decode the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    counts = np.asarray(region_counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    batches, start = [], 0
    while start < order.size:
        size = batch_size
        if memory is not None:
            regions = int(counts[order[start]])
            per_image = memory.image_bytes(regions)
            if memory.batch_bytes(1, regions) > max_batch_bytes:
                raise BatchMemoryError(int(order[start]), regions, memory.batch_bytes(1, regions), max_batch_bytes)
            size = max(1, min(batch_size, (max_batch_bytes - memory.BATCH_BYTES) // per_image))
        batches.append(order[start : start + size])
        start += size
    return batches


class BatchMemoryError(FeatureError):
    """One image needs more working memory than a batch may use (``position``: its index in the input)."""

    def __init__(self, position: int, regions: int, needed: int, limit: int):
        self.position = position
        super().__init__(
            f"image #{position}: {regions} regions need ~{needed / 2**20:.0f} MB of working memory, over the batch "
            f"limit of {limit / 2**20:.0f} MB (--max-batch-mb)"
        )


def pad_batch(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (K_i, F) arrays -> (att_feats float32 [B, max K, F] zero-padded, att_masks [B, max K])."""
    if len(feats) == 0:
        raise ValueError("pad_batch needs at least one image")
    n = max(f.shape[0] for f in feats)
    width = feats[0].shape[1]
    att = np.zeros((len(feats), n, width), dtype=np.float32)
    mask = np.zeros((len(feats), n), dtype=np.float32)
    for i, f in enumerate(feats):
        att[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1.0
    return att, mask
