"""Reading Karpathy's ``dataset_coco.json`` (the raw captions with their splits) and checking its fields.

The file is ``{"images": [{"split", "cocoid" | "imgid", "filepath"?, "filename", "sentences": [{"tokens",
"raw", ...}]}]}``. The tokens are already lower-cased and stripped of punctuation; nothing here re-tokenises
them. The image id used everywhere (feature file names, results) is ``cocoid``, falling back to ``imgid`` for
the Flickr files, which have no COCO id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aoanet.data.errors import DataError

SPLITS = ("train", "restval", "val", "test")


def load_json(path: str | os.PathLike, what: str) -> dict:
    """Load a JSON object, turning a missing or unparsable file into a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def image_id(img: dict) -> int:
    """The id an image is known by: its COCO id, or ``imgid`` for datasets without one."""
    return int(img["cocoid"] if "cocoid" in img else img["imgid"])


def file_path(img: dict) -> str:
    """``filepath/filename`` as cocotalk.json stores it (just ``filename`` when there is no filepath)."""
    return f"{img['filepath']}/{img['filename']}" if img.get("filepath") else str(img.get("filename", ""))


def in_split(img_split: str, split: str) -> bool:
    """Whether an image of ``img_split`` belongs to ``split``; "train" includes restval (train_only=0)."""
    return split == "all" or img_split == split or (split == "train" and img_split == "restval")


def load_dataset(path: str | os.PathLike) -> list[dict]:
    """The ``images`` list of a Karpathy-style dataset json, with every field the pipeline uses checked.

    Raises DataError naming the file, the image (id and list position) and the field for: a missing or
    mistyped field, an unknown split, an image without captions, an empty caption, a token that is not a
    single word, and a duplicate image id.
    """
    path = Path(path)
    data = load_json(path, "dataset json")
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise DataError(f"{path}: field 'images' must be a non-empty list")
    seen: dict[int, int] = {}
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(img, dict):
            raise DataError(f"{where} is not an object")
        if "cocoid" not in img and "imgid" not in img:
            raise DataError(f"{where}: has neither field 'cocoid' nor 'imgid'")
        try:
            iid = image_id(img)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: field 'cocoid'/'imgid' is not an integer ({e})") from e
        where = f"{path}: image id {iid} (images[{i}])"
        if iid in seen:
            raise DataError(f"{where}: duplicate image id (also images[{seen[iid]}])")
        seen[iid] = i
        if img.get("split") not in SPLITS:
            raise DataError(f"{where}: field 'split' is {img.get('split')!r}, expected one of {', '.join(SPLITS)}")
        sents = img.get("sentences")
        if not isinstance(sents, list) or not sents:
            raise DataError(f"{where}: field 'sentences' must be a non-empty list (every image needs a caption)")
        for j, s in enumerate(sents):
            tokens = s.get("tokens") if isinstance(s, dict) else None
            sid = s.get("sentid", j) if isinstance(s, dict) else j
            if not isinstance(tokens, list):
                raise DataError(f"{where}, sentence {sid}: field 'tokens' must be a list of words")
            if not tokens:
                raise DataError(
                    f"{where}, sentence {sid}: empty caption (field 'tokens' is empty; raw: {s.get('raw', '')!r})"
                )
            for t in tokens:
                # A token with white space would change meaning when captions are joined and re-split.
                if not isinstance(t, str) or not t or t.split() != [t]:
                    raise DataError(f"{where}, sentence {sid}: field 'tokens' has {t!r}, not a single word")
    return images
