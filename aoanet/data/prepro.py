"""``aoanet-data prepro``: dataset_coco.json -> cocotalk.json + cocotalk_label.h5 (docs/data.md).

- Vocabulary over all splits, words with count > ``word_count_threshold``, ordered as described in
  :mod:`aoanet.data.vocab` (descending count, then alphabetical; ``UNK`` last).
- Every caption becomes one row of ``labels`` (uint32, width ``max_length``, zero padded, truncated: a caption
  of ``max_length`` tokens or more has no terminating 0). Rare words map to the UNK index.
- ``label_start_ix`` / ``label_end_ix`` are 1-based inclusive row pointers per image, ``label_length`` is
  min(max_length, len(tokens)).
- An empty caption, an image without captions or a malformed field is an error naming the image id
  (see :func:`aoanet.data.karpathy.load_dataset`); nothing is written in that case.
Both outputs are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from aoanet.data import vocab as vocab_mod
from aoanet.data.atomic import atomic_path, write_json
from aoanet.data.karpathy import file_path, image_id, load_dataset


def encode_captions(images: list[dict], word_to_ix: dict[str, int], unk_ix: int, max_length: int):
    """All captions as label rows plus the per-image 1-based inclusive pointers and the per-row lengths."""
    n_rows = sum(len(img["sentences"]) for img in images)
    labels = np.zeros((n_rows, max_length), dtype=np.uint32)
    lengths = np.zeros(n_rows, dtype=np.uint32)
    start = np.zeros(len(images), dtype=np.uint32)
    end = np.zeros(len(images), dtype=np.uint32)
    row = 0
    for i, img in enumerate(tqdm(images, desc="encode captions", unit="img", mininterval=1.0)):
        start[i] = row + 1
        for s in img["sentences"]:
            ids = [word_to_ix.get(w, unk_ix) for w in s["tokens"][:max_length]]
            labels[row, : len(ids)] = ids
            lengths[row] = len(ids)
            row += 1
        end[i] = row
    return labels, start, end, lengths


def prepro_labels(
    input_json: str | os.PathLike,
    output_json: str | os.PathLike,
    output_h5: str | os.PathLike,
    word_count_threshold: int = 5,
    max_length: int = 16,
) -> dict:
    """Build the vocabulary and the label file; returns a summary (counts) for printing."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    images = load_dataset(input_json)
    counts = vocab_mod.count_words(s["tokens"] for img in images for s in img["sentences"])
    words = vocab_mod.build_vocab(counts, word_count_threshold)
    w2i = {w: i + 1 for i, w in enumerate(words)}
    unk_ix = len(words)
    labels, start, end, lengths = encode_captions(images, w2i, unk_ix, max_length)

    with atomic_path(output_h5) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=labels, dtype="uint32")
            f.create_dataset("label_start_ix", data=start, dtype="uint32")
            f.create_dataset("label_end_ix", data=end, dtype="uint32")
            f.create_dataset("label_length", data=lengths, dtype="uint32")
    write_json(
        output_json,
        {
            "ix_to_word": vocab_mod.ix_to_word(words),
            "images": [{"split": img["split"], "file_path": file_path(img), "id": image_id(img)} for img in images],
        },
    )
    n_rare = sum(c for w, c in counts.items() if w not in w2i)
    all_lengths = [len(s["tokens"]) for img in images for s in img["sentences"]]
    return {
        "images": len(images),
        "captions": int(labels.shape[0]),
        "vocab_size": len(words),
        "words_seen": len(counts),
        "unk_tokens": int(n_rare),
        "unk_fraction": n_rare / max(1, sum(counts.values())),
        "max_caption_length": max(all_lengths),
        "truncated_captions": int(sum(n > max_length for n in all_lengths)),
        "output_json": str(Path(output_json)),
        "output_h5": str(Path(output_h5)),
    }
