"""``aoanet-data ngrams``: training-split n-gram document frequencies for the CIDEr-D reward (docs/data.md).

For every image of the split ("train" = train + restval, as in the reference) all its reference captions are
taken **untruncated**, mapped to token ids with the vocabulary of cocotalk.json (out-of-vocabulary words ->
UNK), and the EOS id 0 is appended. Tokens are Python ints (the reference stored them as strings of ids; the
reward in :mod:`aoanet.metrics.cider` works on the int label rows directly). ``ref_len`` is the number of
images. Counting and the file format belong to :mod:`aoanet.metrics.cider`.
"""

from __future__ import annotations

import os

from tqdm import tqdm

from aoanet.data.atomic import atomic_path
from aoanet.data.errors import DataError
from aoanet.data.karpathy import in_split, load_dataset, load_json
from aoanet.data.vocab import UNK
from aoanet.metrics.cider import document_frequency, save_document_frequency

EOS = 0


def split_references(input_json, dict_json, split: str = "train") -> list[list[list[int]]]:
    """Token-id references (EOS appended) of every image in ``split``: one list of captions per image."""
    vocab = load_json(dict_json, "vocabulary json (cocotalk.json)").get("ix_to_word")
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"{dict_json}: field 'ix_to_word' must be a non-empty object")
    w2i = {w: int(i) for i, w in vocab.items()}
    if UNK not in w2i:
        raise DataError(f"{dict_json}: field 'ix_to_word' has no {UNK!r} word to map rare words to")
    unk = w2i[UNK]
    images = load_dataset(input_json)
    refs = [
        [[w2i.get(w, unk) for w in s["tokens"]] + [EOS] for s in img["sentences"]]
        for img in tqdm(images, desc=f"references ({split})", unit="img", mininterval=1.0)
        if in_split(img["split"], split)
    ]
    if not refs:
        raise DataError(f"{input_json}: no image in split {split!r}")
    return refs


def prepro_ngrams(input_json, dict_json, out: str | os.PathLike, split: str = "train") -> dict:
    """Count and save the document frequencies; returns a summary for printing."""
    refs = split_references(input_json, dict_json, split)
    df = document_frequency(refs)
    with atomic_path(out) as tmp:
        save_document_frequency(tmp, df, ref_len=len(refs))
    return {"images": len(refs), "ngrams": len(df), "ref_len": len(refs), "out": str(out)}
