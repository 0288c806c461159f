"""Training-step benchmark of the FULL-SIZE AoANet on this machine's CPU.

XE (default): R = 1024, vocabulary 9,487, 10 images x 5 captions, 10-100 regions of 2048-d, label smoothing 0.2.
SCST (--stage scst): greedy baseline + 5 samples per image + CIDEr-D reward + backward.
Reports iterations/s and the share of time in data loading, forward, backward and the optimizer (and, for SCST,
the reward), side by side with the reference's way of feeding XE (features repeated 5x before the encoder).
Writes artifacts/bench/train.json (or train_scst.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from aoanet.cpu import configure_math_library  # noqa: E402

configure_math_library()  # before Paddle is imported

import paddle  # noqa: E402

from aoanet.model import build_model  # noqa: E402
from aoanet.train.losses import language_model_loss, reward_loss  # noqa: E402
from aoanet.train.trainer import set_threads  # noqa: E402

V, F, SPI, IMAGES, SEQ = 9487, 2048, 5, 10, 16


def make_feature_dir(root: Path, n_images: int, rng) -> list[int]:
    """Full-size features in the reference layout (cocobu_att/<id>.npz, key feat) for the loading share."""
    att = root / "cocobu_att"
    att.mkdir(parents=True, exist_ok=True)
    counts = []
    for i in range(n_images):
        k = int(rng.integers(10, 101))
        np.savez_compressed(att / f"{i}.npz", feat=np.abs(rng.normal(0, 1, (k, F))).astype("float32"))
        counts.append(k)
    return counts


def load_batch(root: Path, ids, rng):
    feats = [np.load(root / "cocobu_att" / f"{i}.npz")["feat"] for i in ids]
    n = max(f.shape[0] for f in feats)
    att = np.zeros((len(ids), n, F), "float32")
    mask = np.zeros((len(ids), n), "float32")
    for j, f in enumerate(feats):
        att[j, : f.shape[0]] = f
        mask[j, : f.shape[0]] = 1
    lengths = rng.integers(8, SEQ + 1, len(ids) * SPI)
    labels = np.zeros((len(ids) * SPI, SEQ + 2), "int64")
    masks = np.zeros_like(labels, dtype="float32")
    for r, n_tok in enumerate(lengths):
        labels[r, 1 : n_tok + 1] = rng.integers(1, V, n_tok)
        masks[r, : n_tok + 2] = 1
    gts = [labels[j * SPI : (j + 1) * SPI, 1:-1] for j in range(len(ids))]
    return att, mask, labels, masks, gts


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rates(parts: dict, iters: int) -> dict:
    """Iterations/s, seconds/iteration and each phase's share of the time, from the per-phase seconds."""
    total = sum(parts.values())
    return {
        "iters_per_s": iters / total,
        "seconds_per_iter": total / iters,
        "share": {k: v / total for k, v in parts.items()},
    }


def bench_xe(model, opt, root, ids, iters, rng, repeat_before_encoder=False):
    parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for it in range(iters + 1):  # the first iteration is warm-up
        batch_ids = ids[(it * IMAGES) % len(ids) :][:IMAGES]
        (att, mask, labels, masks, _), t_data = timed(lambda ids=batch_ids: load_batch(root, ids, rng))
        t0 = time.perf_counter()
        feats, fmask = paddle.to_tensor(att), paddle.to_tensor(mask)
        lab, lmask = paddle.to_tensor(labels), paddle.to_tensor(masks)
        if repeat_before_encoder:  # the reference's loader: 5 copies of each image through the encoder
            feats, fmask = (paddle.repeat_interleave(x, SPI, axis=0) for x in (feats, fmask))
            lp = model(feats, fmask, lab, seq_per_img=1)
        else:
            lp = model(feats, fmask, lab, seq_per_img=SPI)
        loss = language_model_loss(lp, lab[:, 1:], lmask[:, 1:], 0.2)
        float(loss)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.clear_grad()
        t3 = time.perf_counter()
        if it > 0:
            parts["data"] += t_data
            parts["forward"] += t1 - t0
            parts["backward"] += t2 - t1
            parts["optimizer"] += t3 - t2
    return rates(parts, iters)


def bench_scst(model, opt, root, ids, iters, rng):
    from aoanet.metrics.cider import CiderD
    from aoanet.train.scst import self_critical_rewards

    parts = {"data": 0.0, "greedy": 0.0, "sample": 0.0, "reward": 0.0, "backward": 0.0, "optimizer": 0.0}
    scorer = None
    for it in range(iters + 1):
        batch_ids = ids[(it * IMAGES) % len(ids) :][:IMAGES]
        (att, mask, labels, masks, gts), t_data = timed(lambda ids=batch_ids: load_batch(root, ids, rng))
        if scorer is None:  # df from a synthetic corpus of the same shape as the reward's
            scorer = CiderD.from_corpus([[tuple(r) for r in g] for g in gts] * 50)
        feats, fmask = paddle.to_tensor(att), paddle.to_tensor(mask)
        t0 = time.perf_counter()
        model.eval()
        greedy = model.decode(feats, fmask, beam_size=1).seqs
        model.train()
        t1 = time.perf_counter()
        seqs, logps = model.sample(feats, fmask, sample_n=SPI)
        t2 = time.perf_counter()
        rewards, _ = self_critical_rewards(scorer, seqs.numpy(), greedy, gts, SPI)
        t3 = time.perf_counter()
        loss = reward_loss(logps, seqs, rewards)
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        opt.clear_grad()
        t5 = time.perf_counter()
        if it > 0:
            for k, v in zip(parts, (t_data, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[k] += v
    return rates(parts, iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", choices=["xe", "scst"], default="xe")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    paddle.seed(0)
    model = build_model(V)
    model.train()
    opt = paddle.optimizer.Adam(
        learning_rate=2e-4, parameters=model.parameters(), grad_clip=paddle.nn.ClipGradByValue(0.1)
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_feature_dir(root, 4 * IMAGES, rng)
        ids = list(range(4 * IMAGES))
        if args.stage == "xe":
            ours = bench_xe(model, opt, root, ids, args.iters, rng)
            ref = bench_xe(model, opt, root, ids, args.iters, rng, repeat_before_encoder=True)
            result = {
                "encode_once_then_expand": ours,
                "reference_repeat_before_encoder": ref,
                "speedup_vs_repeat": ours["iters_per_s"] / ref["iters_per_s"],
            }
        else:
            result = {"scst": bench_scst(model, opt, root, ids, args.iters, rng)}
    result.update(
        {
            "stage": args.stage,
            "model": "AoANet full size (R=1024, V=9487, 6 refiner layers)",
            "batch": f"{IMAGES} images x {SPI}",
            "regions": "10-100 x 2048",
            "iters": args.iters,
            "threads": args.threads or os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "paddle": paddle.__version__,
        }
    )
    print(f"{'variant':40s} {'it/s':>8s} {'s/it':>8s}  shares")
    for name, r in result.items():
        if isinstance(r, dict) and "iters_per_s" in r:
            shares = " ".join(f"{k}={v:.0%}" for k, v in r["share"].items())
            print(f"{name:40s} {r['iters_per_s']:8.3f} {r['seconds_per_iter']:8.2f}  {shares}")
    if "speedup_vs_repeat" in result:
        print(f"encode once per image vs the reference's 5x repeat: {result['speedup_vs_repeat']:.2f}x")
    out = Path(
        args.out or ROOT / "artifacts" / "bench" / f"train{'' if args.stage == 'xe' else '_scst'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
