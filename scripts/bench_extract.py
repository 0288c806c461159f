"""Image extraction and end-to-end captioning of picture files on this machine's CPU.

1. Extraction images/s of EfficientNet-Lite0 (its ImageNet weights, 224 x 224) and ResNet-101 (448 x 448, the
   default size; random weights: the speed does not depend on them), onnxruntime, batch ``--batch-size``, on
   pre-processed inputs: ``--rounds`` interleaved rounds, each timing both once, so that the ratio of the two is
   measured side by side (median and range of the per-round figures).
2. End to end, picture files -> captions with the demo's model (``artifacts/demo/export``, or a random model of the
   demo's size with the EfficientNet-Lite0 extractor when there is none): COCO-sized JPEGs (the embedded dataset's
   scenes drawn at 640 x 480), beam ``--beam-size``. Sequentially, stage by stage, to get each stage's share: decode
   (Pillow, with JPEG draft), pre-process (resize, normalise), extract, caption (encoder + beam search); then the
   pipelined rate of ``aoanet-infer --images`` (``aoanet_runtime.cli.caption_pictures``: decoding on a thread
   while the previous batch is extracted and captioned), best of ``--repeats``.

Writes artifacts/bench/extract.json (with the CPU model and the load average) and prints a table.

    python scripts/bench_extract.py [--pictures 200] [--rounds 5] [--work /tmp/aoanet-bench-extract]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from benchlib import machine  # noqa: E402

from aoanet.cpu import configure_math_library  # noqa: E402

configure_math_library()  # before Paddle is imported


def ensure_extractor(work: Path, backbone: str, extra: list[str]) -> Path:
    from typer.testing import CliRunner

    from aoanet.cli.data import app

    out = work / backbone
    if not (out / "extractor.json").is_file():
        res = CliRunner().invoke(app, ["extractor", "--backbone", backbone, "--out", str(out), *extra])
        if res.exit_code != 0:
            raise SystemExit(res.output)
    return out


def ensure_model(work: Path, lite0: Path) -> Path:
    """The demo's export when it is there, else a random model of the demo's size served with ``lite0``."""
    demo = ROOT / "artifacts" / "demo" / "export"
    if (demo / "extractor.onnx").is_file():
        return demo
    out = work / "export"
    if (out / "manifest.json").is_file():
        return out
    import paddle
    import yaml

    from aoanet.model import build_model
    from aoanet.train.checkpoint import save_model_dir
    from aoanet.vision.extract import extractor_hashes
    from aoanet_export import export_checkpoint

    options = yaml.safe_load((ROOT / "configs" / "demo.yml").read_text())["model"]
    paddle.seed(0)
    model = build_model(145, **options)
    ckpt = work / "ckpt"
    spec = json.loads((lite0 / "extractor.json").read_text())
    record = {"dir": str(lite0), "backbone": spec["backbone"], "feature_width": spec["feature_width"],
              "sha256": extractor_hashes(lite0), "spec": spec}
    save_model_dir(ckpt, model, {str(i): f"w{i}" for i in range(1, 146)}, extractor=record)
    export_checkpoint(ckpt, out)
    return out


def pictures(work: Path, n: int) -> list[Path]:
    """n scenes of the embedded dataset drawn at 640 x 480-ish (COCO's sizes), as JPEGs."""
    from aoanet.data.synth_world import sample_scene
    from aoanet.vision.render import render_scene

    d = work / "pictures"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = d / f"{i + 1}.jpg"
        if not path.is_file():
            scene = sample_scene(np.random.default_rng([7, i]))
            render_scene(scene, np.random.default_rng([7, i, 1]), scale=1.0).save(path, quality=90)
        paths.append(path)
    return paths


def extraction_rates(extractors: dict, batch: int, rounds: int) -> dict:
    """images/s of each extractor on pre-processed inputs, interleaved rounds."""
    inputs = {}
    for name, ex in extractors.items():
        w, h = ex.spec.input_size(ex.spec.min_side, ex.spec.min_side)
        inputs[name] = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
        ex.run(inputs[name][:2])  # warm-up
    per_round = {name: [] for name in extractors}
    for _ in range(rounds):
        for name, ex in extractors.items():
            t = time.perf_counter()
            ex.run(inputs[name])
            per_round[name].append(batch / (time.perf_counter() - t))
    out = {}
    for name, rates in per_round.items():
        out[name] = {
            "input": list(inputs[name].shape[2:][::-1]),
            "images_per_s_median": statistics.median(rates),
            "images_per_s_range": [min(rates), max(rates)],
        }
    names = list(extractors)
    if len(names) == 2:
        ratios = [a / b for a, b in zip(per_round[names[0]], per_round[names[1]])]
        out["ratio"] = {"of": f"{names[0]} / {names[1]}", "median": statistics.median(ratios),
                        "range": [min(ratios), max(ratios)]}
    return out


def stage_shares(captioner, paths: list[Path], beam: int, batch: int) -> dict:
    """Each stage timed on its own over every picture (one thread of Python, the sessions' own threads)."""
    from aoanet_runtime.features import pad_batch
    from aoanet_runtime.images import load_rgb, preprocess

    ex = captioner.extractor
    spec = ex.spec
    seconds = {"decode": 0.0, "preprocess": 0.0, "extract": 0.0, "caption": 0.0}
    captioner.caption_images(paths[:batch], beam_size=beam, extract_batch_size=batch)  # warm-up: first runs of a shape
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        t = time.perf_counter()
        imgs = [load_rgb(p, min_size=spec.min_side) for p in chunk]
        t1 = time.perf_counter()
        xs = [(preprocess(im, spec.input_size(*im.size), spec.resize_filter, spec.mean, spec.std), im.size)
              for im in imgs]
        t2 = time.perf_counter()
        feats = ex.features_of(xs)
        t3 = time.perf_counter()
        att, masks = pad_batch([f.att for f in feats])
        captioner.decode(att, masks, beam, 20)
        t4 = time.perf_counter()
        for key, a, b in (("decode", t, t1), ("preprocess", t1, t2), ("extract", t2, t3), ("caption", t3, t4)):
            seconds[key] += b - a
    total = sum(seconds.values())
    return {
        "seconds": seconds,
        "share": {k: v / total for k, v in seconds.items()},
        "images_per_s_sequential": len(paths) / total,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pictures", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="extraction batch (section 1)")
    p.add_argument("--caption-batch", type=int, default=50, help="pictures per batch end to end")
    p.add_argument("--beam-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/aoanet-bench-extract"))
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "extract.json")
    args = p.parse_args()

    from aoanet_runtime.backends import OnnxBackend
    from aoanet_runtime.cli import caption_pictures
    from aoanet_runtime.extractor import Extractor
    from aoanet_runtime.images import list_image_files

    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"CPU: {machine()['cpu']} ({os.cpu_count()} CPUs); load average before: {load_before}", flush=True)
    lite0 = ensure_extractor(args.work, "efficientnet_lite0", [])
    r101 = ensure_extractor(args.work, "resnet101", [])
    extractors = {"efficientnet_lite0": Extractor.from_dir(lite0), "resnet101": Extractor.from_dir(r101)}
    extraction = extraction_rates(extractors, args.batch_size, args.rounds)
    for name in extractors:
        e = extraction[name]
        print(f"{name:20s} {e['input']}: {e['images_per_s_median']:7.1f} images/s (median of {args.rounds}; "
              f"range {e['images_per_s_range'][0]:.1f}-{e['images_per_s_range'][1]:.1f})", flush=True)
    print(f"ratio {extraction['ratio']['of']}: {extraction['ratio']['median']:.2f}", flush=True)

    export_dir = ensure_model(args.work, lite0)
    paths = pictures(args.work, args.pictures)
    backend = OnnxBackend(export_dir)
    captioner = backend.captioner
    shares = stage_shares(captioner, paths[: min(len(paths), 100)], args.beam_size, args.caption_batch)
    print("sequential stages: " + ", ".join(f"{k} {v:.0%}" for k, v in shares["share"].items())
          + f" ({shares['images_per_s_sequential']:.1f} images/s)", flush=True)
    refs = list_image_files(paths)
    caption_pictures(backend, captioner.extractor, refs[: args.caption_batch], args.beam_size, 20,
                     args.caption_batch, {}, progress=False)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        caption_pictures(backend, captioner.extractor, refs, args.beam_size, 20, args.caption_batch, {},
                         progress=False)
        best = min(best, time.perf_counter() - t)
    end_to_end = len(refs) / best
    print(f"end to end (aoanet-infer --images, pipelined): {end_to_end:.1f} images/s", flush=True)

    manifest = json.loads((export_dir / "manifest.json").read_text())
    result = {
        "machine": {**machine(),
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "extraction": extraction,
        "end_to_end": {
            "model": str(export_dir.relative_to(ROOT)) if export_dir.is_relative_to(ROOT) else "random demo-size",
            "model_options": {k: manifest["model_options"][k] for k in ("rnn_size", "att_feat_size", "refine_layers")},
            "pictures": len(refs),
            "picture_size": "640x480-ish JPEG (quality 90)",
            "beam_size": args.beam_size,
            "batch": args.caption_batch,
            "images_per_s_pipelined": end_to_end,
            "sequential": shares,
        },
        "versions": {"python": sys.version.split()[0], "onnxruntime": __import__("onnxruntime").__version__,
                     "pillow": __import__("PIL").__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
