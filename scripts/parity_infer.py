"""Decoding parity of the two ``aoanet-infer`` backends: Paddle dynamic graph vs the ONNX export.

    python scripts/parity_infer.py --checkpoint CKPT_DIR --model EXPORT_DIR --features DATA_DIR \
        [--split test] [--beam-sizes 1 2 3] [--batch-size 50] [--num-images 200] [--out parity_infer.json]

Both backends decode the same batches (``aoanet_runtime.features.batch_plan``, as ``aoanet-infer`` does) through the
same search; reports, per beam size, the images whose captions differ (the target is none) and the largest
difference of the chosen tokens' log-probs where the captions agree (target <= 1e-4). Exit status 1 if either
target is missed. ``compare_backends`` is the function the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from aoanet.cpu import configure_math_library  # noqa: E402

configure_math_library()  # before Paddle is imported

LOGPROB_TOLERANCE = 1e-4


def compare_backends(model, captioner, batches, beam_size: int, max_length: int = 20, **options) -> dict:
    """batches: [(att_feats [B, N, F], att_masks [B, N]), ...]. -> figures for one beam size."""
    import paddle

    n_images = n_differ = 0
    max_lp = max_score = 0.0
    differ = []
    for att_feats, att_masks in batches:
        ours = captioner.decode(att_feats, att_masks, beam_size, max_length, **options)
        ref = model.decode(
            paddle.to_tensor(att_feats),
            paddle.to_tensor(att_masks),
            beam_size=beam_size,
            max_length=max_length,
            **options,
        )
        same = (ours.seqs == ref.seqs).all(axis=1)
        for i in np.nonzero(~same)[0]:
            differ.append(n_images + int(i))
        if same.any():
            max_lp = max(max_lp, float(np.abs(ours.logprobs[same] - ref.logprobs[same]).max()))
            max_score = max(max_score, float(np.abs(ours.scores[same] - ref.scores[same]).max()))
        n_images += len(same)
        n_differ += int((~same).sum())
    return {
        "beam_size": beam_size,
        "images": n_images,
        "captions_differ": n_differ,
        "differing_images": differ[:20],
        "max_abs_logprob_diff": max_lp,
        "max_abs_score_diff": max_score,
        "passed": n_differ == 0 and max_lp <= LOGPROB_TOLERANCE,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--model", required=True, type=Path, help="export directory")
    p.add_argument("--features", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--which", default="best")
    p.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--num-images", type=int, default=-1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import paddle

    from aoanet.train.checkpoint import load_model
    from aoanet_runtime import Captioner
    from aoanet_runtime.features import batch_plan, list_images, pad_batch, read_features, region_count

    paddle.base.core.set_num_threads(os.cpu_count() or 1)
    model, _ = load_model(args.checkpoint, args.which)
    captioner = Captioner.from_dir(args.model)
    images = list_images(args.features, args.split)
    if args.num_images >= 0:
        images = images[: args.num_images]
    width = captioner.att_feat_size
    plan = batch_plan([region_count(img, width) for img in images], args.batch_size)
    batches = [pad_batch([read_features(images[i], width) for i in pos]) for pos in plan]
    report = [compare_backends(model, captioner, batches, k, args.max_length) for k in args.beam_sizes]
    for r in report:
        print(
            f"beam {r['beam_size']}: {r['images']} images, {r['captions_differ']} captions differ, "
            f"max |log-prob diff| {r['max_abs_logprob_diff']:.2e} -> {'OK' if r['passed'] else 'FAILED'}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if all(r["passed"] for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
