"""``aoanet-data synth``: the embedded dataset, a generated captioning task in exactly the real formats.

It writes ``DIR/dataset_coco.json`` (Karpathy layout: ``images[i]`` with ``imgid``, ``cocoid``, ``filepath``,
``filename``, ``split``, ``sentences`` [{``tokens``, ``raw``, ``imgid``, ``sentid``}], ``sentids``, plus a
``scene`` summary that the pipeline ignores) and ``DIR/cocobu_att|cocobu_fc|cocobu_box``, so that prepro,
ngrams, check, the loader, training and evaluation run on it unchanged; or, with ``render``, the scenes as
pictures, ``DIR/images/<cocoid>.jpg`` (:mod:`aoanet.vision.render`), whose features an image extractor makes
(``aoanet-data extract``). What an image shows is described in :mod:`aoanet.data.synth_world`, how it is
captioned in :mod:`aoanet.data.synth_grammar`, its region features in :mod:`aoanet.data.synth_features`.

Default size, chosen so the demo can train a small AoANet (rnn_size 128-256) on a 2-core CPU in about five
minutes and still see every class and colour hundreds of times:

- 4,000 images: 2,700 train + 800 restval (3,500 for training), 250 val, 250 test (val = test = n/16, restval
  = n/5); 5 captions each; ids (``cocoid``) 1..n.
- feature width 128 (``att_feat_size: 128`` in the demo config), 10-30 regions per image (mean 15).
- vocabulary 146 words with UNK (threshold 5); captions 9.9 tokens on average, 3.6% longer than 16 (cut by
  prepro like real ones).
- on disk 62 MB (generation time: docs/data.md).

Everything is a function of ``seed`` (scene, captions, features of image i come from
``numpy.random.default_rng([seed, i])``, the splits from ``default_rng([seed, 2**32 - 1])``); the
random projections of the features are fixed for a given width. npz files embed a zip timestamp, so equality
is of the arrays, not of the file bytes.

Why a model beats the nearest-neighbour baseline (:mod:`aoanet.data.baseline`): a caption depends on the
class, colour, count and position of two or three objects plus the setting, and the references use all of
them. The mean feature retrieves a training image with some of the same classes and setting, but the exact
combination (which colour goes with which object, who is left of whom) almost never recurs, so a copied
caption gets partial credit; a model that attends to each object's region can say it (the scores of both, and
of a caption written from the true scene, are in docs/data.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from aoanet.data.atomic import write_json
from aoanet.data.errors import DataError
from aoanet.data.features import feature_dirs, write_image_features
from aoanet.data.synth_features import FeatureSpace
from aoanet.data.synth_grammar import caption, raw_sentence
from aoanet.data.synth_world import sample_scene

DEFAULT_IMAGES, DEFAULT_SEED, DEFAULT_FEAT_DIM = 4000, 123, 128
IMAGE_DIR = "images"  # the rendered pictures (``render``), named <cocoid>.jpg
JPEG_QUALITY = 90
CAPTIONS_PER_IMAGE = 5


def split_sizes(n: int) -> dict[str, int]:
    """How many images go to val, test and restval (the rest is train)."""
    if n < 8:
        raise ValueError(f"the synthetic dataset needs at least 8 images (got {n}) to fill four splits")
    val = test = max(1, round(n / 16))
    restval = max(1, round(n / 5))
    return {"train": n - val - test - restval, "restval": restval, "val": val, "test": test}


def _splits(n: int, seed: int) -> list[str]:
    sizes = split_sizes(n)
    names = ["val"] * sizes["val"] + ["test"] * sizes["test"] + ["restval"] * sizes["restval"]
    names += ["train"] * sizes["train"]
    order = np.random.default_rng([seed, 2**32 - 1]).permutation(n)  # entropy distinct from any image index
    out = [""] * n
    for name, i in zip(names, order, strict=True):
        out[i] = name
    return out


def make_synth(
    out_dir: str | os.PathLike,
    images: int = DEFAULT_IMAGES,
    seed: int = DEFAULT_SEED,
    feat_dim: int = DEFAULT_FEAT_DIM,
    render: bool = False,
) -> dict:
    """Generate the dataset into ``out_dir``; returns a summary (counts, sizes) for printing. The arguments are
    checked before anything is created.

    ``render``: draw each scene as a picture, ``DIR/images/<cocoid>.jpg`` (``aoanet.vision.render``), instead of
    writing region features: the features then come from an image extractor (``aoanet-data extract``). The
    captions and splits are the same either way."""
    if seed < 0:
        raise DataError(f"--seed must be >= 0, got {seed}")
    if feat_dim < 1:
        raise DataError(f"--feat-dim must be >= 1, got {feat_dim}")
    try:
        split_sizes(images)
        space = FeatureSpace(feat_dim)
    except ValueError as e:
        raise DataError(f"--images {images}: {e}" if "images" in str(e) else str(e)) from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    att_dir, fc_dir, box_dir = feature_dirs(out)
    if render:
        from aoanet.data.atomic import atomic_path
        from aoanet.vision.render import RENDER_SCALE, render_scene

        (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    else:
        for d in (att_dir, fc_dir, box_dir):
            d.mkdir(parents=True, exist_ok=True)
    splits = _splits(images, seed)
    entries, n_regions, lengths = [], [], []
    for i in tqdm(range(images), desc="synth images", unit="img"):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        cocoid = i + 1
        sentences = []
        for j in range(CAPTIONS_PER_IMAGE):
            tokens = caption(rng, scene)
            lengths.append(len(tokens))
            sentences.append(
                {
                    "tokens": tokens,
                    "raw": raw_sentence(tokens),
                    "imgid": i,
                    "sentid": i * CAPTIONS_PER_IMAGE + j,
                }
            )
        width, height = scene.width, scene.height
        if render:
            picture = render_scene(scene, np.random.default_rng([seed, i, 1]), RENDER_SCALE)
            width, height = picture.size
            with atomic_path(out / IMAGE_DIR / f"{cocoid}.jpg") as tmp, open(tmp, "wb") as f:
                picture.save(f, format="JPEG", quality=JPEG_QUALITY)
        else:
            feats, boxes = space.regions(scene, rng)
            n_regions.append(len(feats))
            pixels = boxes * np.array([scene.width, scene.height] * 2)
            write_image_features(att_dir, fc_dir, box_dir, cocoid, feats, pixels)
        entries.append(
            {
                "filepath": IMAGE_DIR,
                "filename": f"{cocoid}.jpg",
                "imgid": i,
                "cocoid": cocoid,
                "split": splits[i],
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "width": width,
                "height": height,
                "scene": scene.describe(),
            }
        )
    meta = {"dataset": "synth", "seed": seed}
    meta.update({"rendered": True} if render else {"feat_dim": feat_dim})
    write_json(out / "dataset_coco.json", {**meta, "images": entries})
    words = {t for e in entries for s in e["sentences"] for t in s["tokens"]}
    regions = (
        {"images_dir": str(out / IMAGE_DIR)}
        if render
        else {
            "feat_dim": feat_dim,
            "regions_min": int(min(n_regions)),
            "regions_mean": float(np.mean(n_regions)),
            "regions_max": int(max(n_regions)),
        }
    )
    return {
        "images": images,
        "splits": split_sizes(images),
        "seed": seed,
        **regions,
        "distinct_words": len(words),
        "caption_length_mean": float(np.mean(lengths)),
        "caption_length_max": int(max(lengths)),
        "captions_over_16": float(np.mean(np.asarray(lengths) > 16)),
        "out": str(out),
    }
