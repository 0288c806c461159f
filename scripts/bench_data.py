"""Benchmark of the data pipeline: `prepro` at full COCO size, the loader's batch rate at full feature size.

1. prepro on a full-size dataset_coco.json: 123,287 images x 5 captions in Karpathy's split sizes (82,783
   train, 30,504 restval, 5,000 val, 5,000 test), the captions being real COCO captions repeated (``--captions``:
   a COCO caption file; default the 2,500 of tests/data).
2. the loader at full feature size: 2048-d region features, 10-100 regions per image, batch 10 images x 5
   captions, for 0, 1 and 2 worker processes. A few hundred generated npz files are reused by a few thousand
   images (symlinks), so the page cache is warm: this measures decoding and collation, not the disk. Also the
   trainer's wait per batch when each training step takes 50 ms: with workers, loading is hidden behind it.
3. `bu` conversion (TSV lines/s) and `check` (images/s, header mode) on the same full-size features.

Prints a table and writes artifacts/bench/data.json. Work files go to artifacts/tmp/bench_data (removed
after). Run: python scripts/bench_data.py [--images 123287] [--batches 200] [--keep]
"""

import argparse
import base64
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT / "tests" / "data" / "captions_val2017_500.json"
SPLITS = (("train", 82783), ("restval", 30504), ("val", 5000), ("test", 5000))


def caption_pool(path: Path = COCO) -> tuple[list[list[str]], str]:
    """Tokenised captions to fill the big file with."""
    import string

    strip = str.maketrans("", "", string.punctuation)
    anns = json.loads(Path(path).read_text())["annotations"]
    return [a["caption"].lower().translate(strip).split() for a in anns], f"{Path(path).name} captions, repeated"


def full_dataset_json(path: Path, n_images: int, captions: Path = COCO) -> str:
    pool, source = caption_pool(captions)
    scale = n_images / sum(n for _, n in SPLITS)
    splits = [s for s, n in SPLITS for _ in range(round(n * scale))][:n_images]
    splits += ["train"] * (n_images - len(splits))
    images, k = [], 0
    for i, split in enumerate(splits):
        sents = []
        for _ in range(5):
            toks = pool[k % len(pool)]
            sents.append({"tokens": toks, "raw": " ".join(toks), "imgid": i, "sentid": k})
            k += 1
        images.append(
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{i + 1:012d}.jpg",
                "imgid": i,
                "cocoid": i + 1,
                "split": split,
                "sentences": sents,
                "sentids": [s["sentid"] for s in sents],
            }
        )
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return source


def detector_like(rng: np.random.Generator, k: int, width: int = 2048) -> np.ndarray:
    """Non-negative, about half zeros, heavy-tailed: roughly how ResNet-101 Faster R-CNN pool5 features
    look."""
    x = rng.standard_normal((k, width), dtype=np.float32)
    return np.maximum(x, 0) ** 2


def bench_prepro(work: Path, n_images: int, captions: Path = COCO) -> dict:
    from aoanet.data.prepro import prepro_labels

    t = time.perf_counter()
    source = full_dataset_json(work / "dataset_coco.json", n_images, captions)
    t_make = time.perf_counter() - t
    t = time.perf_counter()
    summary = prepro_labels(work / "dataset_coco.json", work / "cocotalk.json", work / "cocotalk_label.h5")
    elapsed = time.perf_counter() - t
    return {
        "images": n_images,
        "captions": summary["captions"],
        "vocab_size": summary["vocab_size"],
        "text": source,
        "seconds": round(elapsed, 2),
        "images_per_s": round(n_images / elapsed),
        "captions_per_s": round(summary["captions"] / elapsed),
        "json_write_seconds": round(t_make, 2),
        "dataset_json_mb": round((work / "dataset_coco.json").stat().st_size / 2**20, 1),
    }


def make_feature_dir(work: Path, n_files: int, n_images: int) -> Path:
    """n_files real npz files (2048-d, 10-100 regions) and n_images ids symlinked onto them, plus labels."""
    from aoanet.data.prepro import prepro_labels

    rng = np.random.default_rng(0)
    real = work / "real_att"
    real.mkdir()
    for j in range(n_files):
        np.savez_compressed(real / f"{j}.npz", feat=detector_like(rng, int(rng.integers(10, 101))))
    att = work / "cocobu_att"
    att.mkdir()
    for i in range(1, n_images + 1):
        os.symlink(real / f"{(i - 1) % n_files}.npz", att / f"{i}.npz")
    full_dataset_json(work / "small.json", n_images)
    prepro_labels(work / "small.json", work / "small_talk.json", work / "small_label.h5")
    return att


def bench_loader(work: Path, att: Path, n_batches: int, step_ms: float = 50.0) -> list[dict]:
    """Batches/s with an idle consumer, and the trainer's wait per batch while it is busy for step_ms per
    step (a sleep, standing in for the XE step): what a worker saves the training loop."""
    from aoanet.data.loader import CaptionData, build_loader

    data = CaptionData(work / "small_talk.json", work / "small_label.h5", att, att_feat_size=2048)
    rows = []
    for workers in (0, 1, 2):
        with build_loader(data, "train", batch_size=10, seed=1, num_workers=workers) as loader:
            it = iter(loader)
            next(it)  # start-up (pool creation) is not part of the rate
            t, n, regions = time.perf_counter(), 0, 0
            for batch in it:
                n += 1
                regions += int(batch["att_masks"].sum())
                if n == n_batches:
                    break
            elapsed = time.perf_counter() - t
            waits = []
            for _ in range(min(n_batches, 60)):
                time.sleep(step_ms / 1000)
                t0 = time.perf_counter()
                next(it)
                waits.append(time.perf_counter() - t0)
        rows.append(
            {
                "num_workers": workers,
                "batches": n,
                "batches_per_s": round(n / elapsed, 1),
                "images_per_s": round(10 * n / elapsed),
                "mean_regions": round(regions / (10 * n), 1),
                "mb_per_s_features": round(regions * 2048 * 4 / elapsed / 2**20),
                "wait_ms_per_batch_busy_trainer": round(1000 * float(np.median(waits)), 1),
                "busy_step_ms": step_ms,
            }
        )
    return rows


def bench_bu(work: Path, n_lines: int) -> dict:
    from aoanet.data.bottom_up import convert_tsv

    rng = np.random.default_rng(1)
    b64 = lambda a: base64.b64encode(a.astype(np.float32).tobytes()).decode()
    with open(work / "feats.tsv", "w") as f:
        for i in range(n_lines):
            k = int(rng.integers(10, 101))
            f.write(
                "\t".join(
                    [
                        str(i + 1),
                        "640",
                        "480",
                        str(k),
                        b64(rng.random((k, 4)) * 400),
                        b64(detector_like(rng, k)),
                    ]
                )
                + "\n"
            )
    t = time.perf_counter()
    convert_tsv([work / "feats.tsv"], work / "bu_att", work / "bu_fc", work / "bu_box")
    elapsed = time.perf_counter() - t
    t = time.perf_counter()
    stats = convert_tsv([work / "feats.tsv"], work / "bu_att", work / "bu_fc", work / "bu_box")
    rerun = time.perf_counter() - t
    return {
        "lines": n_lines,
        "seconds": round(elapsed, 2),
        "lines_per_s": round(n_lines / elapsed, 1),
        "tsv_mb": round((work / "feats.tsv").stat().st_size / 2**20),
        "rerun_skip_seconds": round(rerun, 2),
        "rerun_skipped": stats["skipped"],
    }


def bench_check(work: Path, att: Path) -> dict:
    from aoanet.data.check import check_features

    ids = [int(p.stem) for p in att.iterdir()]
    t = time.perf_counter()
    problems, _ = check_features(ids, att, None, None, 2048)
    elapsed = time.perf_counter() - t
    assert not problems, problems[:3]
    return {"images": len(ids), "seconds": round(elapsed, 2), "images_per_s": round(len(ids) / elapsed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=123287, help="images in the prepro benchmark")
    ap.add_argument("--captions", type=Path, default=COCO, help="a COCO caption file to draw the captions from")
    ap.add_argument("--loader-images", type=int, default=3000)
    ap.add_argument("--npz-files", type=int, default=300)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--bu-lines", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts/bench/data.json")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not progress bars, is the output here
    work = ROOT / "artifacts/tmp/bench_data"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        prepro = bench_prepro(work, args.images, args.captions)
        p = prepro
        print(
            f"prepro   {p['images']:>7} images {p['captions']:>7} captions  {p['seconds']:>6.1f} s  "
            f"{p['images_per_s']:>6} images/s  vocab {p['vocab_size']}  ({p['text']})",
            flush=True,
        )
        att = make_feature_dir(work, args.npz_files, args.loader_images)
        loader = bench_loader(work, att, args.batches)
        print("\nloader: 2048-d features, 10-100 regions, batch 10 images x 5 captions (warm page cache);")
        print("wait ms = the trainer's median wait for the next batch when each step takes 50 ms")
        print(f"{'workers':>8} {'batches/s':>10} {'images/s':>9} {'regions':>8} {'MB/s':>6} {'wait ms':>8}")
        for r in loader:
            print(
                f"{r['num_workers']:>8} {r['batches_per_s']:>10} {r['images_per_s']:>9} "
                f"{r['mean_regions']:>8} {r['mb_per_s_features']:>6} {r['wait_ms_per_batch_busy_trainer']:>8}"
            )
        bu = bench_bu(work, args.bu_lines)
        print(
            f"\nbu       {bu['lines']} TSV lines ({bu['tsv_mb']} MB)  {bu['seconds']} s  "
            f"{bu['lines_per_s']} lines/s; re-run skips all in {bu['rerun_skip_seconds']} s"
        )
        chk = bench_check(work, att)
        print(f"check    {chk['images']} images (headers)  {chk['seconds']} s  {chk['images_per_s']} images/s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "data pipeline",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
        "prepro": prepro,
        "loader": loader,
        "bu": bu,
        "check": chk,
        "notes": "loader rates with a warm page cache (npz files reused through symlinks); the machine may "
        "have been shared with other jobs while this ran",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
