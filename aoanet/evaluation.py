"""Captioning a split with the Paddle model and scoring it with the coco-caption metrics (docs/training.md,
"Evaluation")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from aoanet.data.errors import DataError
from aoanet_runtime.beam import NonFiniteError
from aoanet_runtime.vocab import decode_sequence


def load_references(path) -> dict[int, list[str]]:
    """Raw reference captions per image id, from Karpathy's dataset_coco.json or a COCO captions annotation file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"references file not found: {path} (set data.references_json)")
    raw = json.loads(path.read_text())
    refs: dict[int, list[str]] = {}
    if isinstance(raw, dict) and "annotations" in raw:  # COCO format
        for ann in raw["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    elif isinstance(raw, dict) and "images" in raw:  # Karpathy format
        for img in raw["images"]:
            image_id = int(img.get("cocoid", img.get("id", img.get("imgid"))))
            refs[image_id] = [s.get("raw") or " ".join(s["tokens"]) for s in img["sentences"]]
    else:
        raise ValueError(
            f"{path}: neither a COCO annotation file ('annotations') nor a Karpathy split ('images')"
        )
    return refs


def predict(
    model,
    data,
    split: str,
    beam_size: int = 1,
    max_length: int = 20,
    batch_size: int = 50,
    num_images: int = -1,
    num_workers: int = 0,
    progress: bool = True,
    vocab: dict | None = None,
    **decode_options,
) -> list[dict]:
    """Captions for a split in the COCO results format: [{"image_id", "caption"}] in split order.

    ``vocab`` (ix_to_word) decodes the tokens: pass the checkpoint's own, which need not equal the data's
    cocotalk.json (a converted model keeps the authors' word order). Default: the data's vocabulary.
    """
    from aoanet.data.loader import build_loader

    loader = build_loader(data, split=split, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total = len(data.split_ix(split)) if num_images < 0 else min(num_images, len(data.split_ix(split)))
    was_training = model.training
    model.eval()
    results: list[dict] = []
    bar = tqdm(
        total=total, desc=f"decode {split} (beam {beam_size})", unit="img", disable=not progress, leave=False
    )
    try:
        for batch in loader:
            take = min(len(batch["image_ids"]), total - len(results))
            feats = paddle.to_tensor(np.asarray(batch["att_feats"][:take]))
            masks = paddle.to_tensor(np.asarray(batch["att_masks"][:take]))
            try:
                res = model.decode(feats, masks, beam_size=beam_size, max_length=max_length, **decode_options)
            except NonFiniteError as e:
                ids = [int(batch["image_ids"][i]) for i in e.images]
                raise DataError(f"image id(s) {ids} of split {split!r}: the model's outputs are not finite (NaN or "
                                "inf) for their features: out of the range this model handles") from None
            for image_id, caption in zip(
                batch["image_ids"][:take], decode_sequence(vocab or data.vocab, res.seqs)
            ):
                results.append({"image_id": int(image_id), "caption": caption})
            bar.update(take)
            if len(results) >= total:
                break
    finally:
        bar.close()
        model.train(was_training)
    return results


def evaluate_predictions(predictions: list[dict], references: dict[int, list[str]], spice=None) -> dict:
    from aoanet.metrics.coco_eval import language_eval

    refs = {p["image_id"]: references[p["image_id"]] for p in predictions if p["image_id"] in references}
    missing = [p["image_id"] for p in predictions if p["image_id"] not in references]
    if missing:
        raise KeyError(f"no reference captions for image id(s) {missing[:5]} (of {len(missing)})")
    return language_eval(predictions, refs, spice=spice)
