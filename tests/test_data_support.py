"""Shared helpers for the data-pipeline tests (no tests here): paths, small datasets, the CLI runner."""

import json
import re
import string
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from aoanet.cli.data import app

# Real captions: 500 images x 5 captions of COCO val2017 (tests/data/README.md). Part of the repository: a test
# that needs them fails without them.
COCO_CAPTIONS = Path(__file__).parent / "data" / "captions_val2017_500.json"


def run_cli(*args):
    """Invoke `aoanet-data` in-process; returns the typer Result (exit_code, output, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def prepare(data_dir: Path, threshold: int = 5) -> Path:
    """`aoanet-data prepro` on DIR/dataset_coco.json, writing the layout names."""
    r = run_cli(
        "prepro",
        "--input-json",
        data_dir / "dataset_coco.json",
        "--output-json",
        data_dir / "cocotalk.json",
        "--output-h5",
        data_dir / "cocotalk_label.h5",
        "--word-count-threshold",
        threshold,
    )
    assert r.exit_code == 0, r.output
    return data_dir


def karpathy_from_coco(captions_json: Path) -> dict:
    """The real COCO val2017 captions in Karpathy's layout: lower-case, punctuation stripped, split on white
    space. Splits by position: every 20th image val, the next one test, 1 in 5 restval, the rest train."""
    coco = json.loads(captions_json.read_text())
    by_image: dict[int, list] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    strip = str.maketrans("", "", string.punctuation)
    images, sentid = [], 0
    for i, img in enumerate(sorted(coco["images"], key=lambda im: im["id"])):
        split = "val" if i % 20 == 0 else "test" if i % 20 == 1 else "restval" if i % 5 == 2 else "train"
        sents = []
        for a in sorted(by_image.get(img["id"], []), key=lambda a: a["id"]):
            tokens = a["caption"].lower().translate(strip).split()
            sents.append({"tokens": tokens, "raw": a["caption"], "imgid": i, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": "val2017",
                "filename": img["file_name"],
                "imgid": i,
                "cocoid": img["id"],
                "split": split,
                "sentences": sents,
                "sentids": [s["sentid"] for s in sents],
            }
        )
    return {"dataset": "coco", "images": images}


def write_features(data_dir: Path, image_id: int, feat: np.ndarray, boxes: np.ndarray | None = None) -> None:
    """Feature files for one image, written the plain way (independent of the code under test)."""
    for sub in ("cocobu_att", "cocobu_fc", "cocobu_box"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(data_dir / "cocobu_att" / f"{image_id}.npz", feat=feat)
    np.save(data_dir / "cocobu_fc" / f"{image_id}.npy", feat.mean(0))
    np.save(
        data_dir / "cocobu_box" / f"{image_id}.npy",
        boxes if boxes is not None else np.tile([0, 0, 10, 10], (len(feat), 1)).astype(np.float32),
    )


def tiny_dataset(data_dir: Path, captions_per_image=(2, 5, 7, 5), feat_dim: int = 8, seed: int = 0) -> Path:
    """A hand-made, prepared dataset: image i (id 100 + i) has captions_per_image[i] captions and 3 + i
    regions; splits cycle train, restval, val, test. Captions differ, so every label row is recognisable."""
    rng = np.random.default_rng(seed)
    words = ["a", "dog", "cat", "on", "the", "red", "mat", "big"]
    images, sentid = [], 0
    splits = ["train", "restval", "val", "test"]
    for i, n in enumerate(captions_per_image):
        sents = []
        for j in range(n):
            tokens = [words[(i + j + k) % len(words)] for k in range(3 + j)]
            sents.append({"tokens": tokens, "raw": " ".join(tokens), "imgid": i, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": "x",
                "filename": f"{i}.jpg",
                "imgid": i,
                "cocoid": 100 + i,
                "split": splits[i % 4],
                "sentences": sents,
            }
        )
        write_features(data_dir, 100 + i, rng.random((3 + i, feat_dim), dtype=np.float32))
    (data_dir / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return prepare(data_dir, threshold=0)


def ids_in(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"image id (\d+)", text)}
