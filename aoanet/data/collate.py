"""Turning per-image items into a training batch of numpy arrays (docs/model.md, "Training"; features not repeated).

The caption window of an image is drawn from ``numpy.random.default_rng([seed, epoch, ix])``: it depends only
on which image, which epoch and the seed, never on the worker that loaded it or on where a run was resumed.
"""

from __future__ import annotations

import numpy as np


def caption_window(n_rows: int, seq_per_img: int, seed: int, epoch: int, ix: int) -> np.ndarray:
    """Row indices of the captions used for one image: a random contiguous window of ``seq_per_img`` rows
    when the image has that many, otherwise ``seq_per_img`` rows drawn with replacement."""
    rng = np.random.default_rng([seed, epoch, ix])
    if n_rows >= seq_per_img:
        first = int(rng.integers(0, n_rows - seq_per_img + 1))
        return np.arange(first, first + seq_per_img)
    return rng.integers(0, n_rows, size=seq_per_img)


def pad_regions(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad (K_i, F) arrays to the largest K: features [b, N, F], float mask [b, N] (1 = region)."""
    n = max(f.shape[0] for f in feats)
    att = np.zeros((len(feats), n, feats[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(feats), n), dtype=np.float32)
    for i, f in enumerate(feats):
        att[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1.0
    return att, mask


def collate(items: list[dict], seq_per_img: int, seed: int, epoch: int) -> dict:
    """Items ``{"ix", "image_id", "att_feats" (K, F), "labels" (n_i, L)}`` -> the batch dict of the loader."""
    att, att_mask = pad_regions([it["att_feats"] for it in items])
    seq_length = items[0]["labels"].shape[1]
    labels = np.zeros((len(items) * seq_per_img, seq_length + 2), dtype=np.int64)
    for i, it in enumerate(items):
        rows = it["labels"][caption_window(len(it["labels"]), seq_per_img, seed, epoch, it["ix"])]
        labels[i * seq_per_img : (i + 1) * seq_per_img, 1 : seq_length + 1] = rows
    # BOS, the words and one EOS count (authors: nonzeros + 2); the extra last column is the EOS of a
    # full-width caption.
    n_valid = (labels != 0).sum(axis=1) + 2
    masks = (np.arange(seq_length + 2)[None, :] < n_valid[:, None]).astype(np.float32)
    return {
        "att_feats": att,
        "att_masks": att_mask,
        "labels": labels,
        "masks": masks,
        "gts": [it["labels"].astype(np.int64) for it in items],
        "image_ids": [int(it["image_id"]) for it in items],
        "ix": [int(it["ix"]) for it in items],
    }
