"""The whole pipeline on the embedded dataset drawn as pictures, with the project's own commands (`make demo`).

synth --render (the scenes as JPEG pictures) -> an EfficientNet-Lite0 extractor (ImageNet weights) -> extract ->
prepro -> ngrams -> nearest-neighbour baseline -> XE -> eval -> SCST -> eval -> export (fp32 + int8, with the
extractor) -> ONNX inference vs Paddle inference on the features, int8 vs fp32, and captioning the test split's
picture files (aoanet-infer --images) with onnxruntime and with Paddle, and where the model looked for one test
picture (aoanet-infer --attention). Prints a table and writes artifacts/demo/report.json (with each stage's
wall-clock and CPU seconds and the machine's load), artifacts/demo/captions.png and artifacts/demo/attention.png.
Everything lives under artifacts/demo/; the pictures, the extractor and the features are made once and reused, the
checkpoints and the export anew on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from benchlib import cpu_name

from aoanet.cpu import configure_math_library

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "artifacts" / "demo"
DATA = DEMO / "data"
EXTRACTOR = DEMO / "extractor"
BIN = Path(sys.executable).parent
METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
STAGES: dict = {}


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the commands it ran)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _load() -> float:
    return round(os.getloadavg()[0], 2)


@contextmanager
def stage(name: str):
    """Record a stage's wall-clock and CPU seconds and the 1-minute load average at its end: on a machine shared
    with other jobs the wall clock stretches, the CPU seconds much less."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    STAGES[name] = {
        "seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu, 1),
        "load_1min": _load(),
    }


def run(*args, **kwargs):
    cmd = [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *map(str, args[1:])]
    print("\n$ " + " ".join([args[0], *map(str, args[1:])]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def read_json(path):
    return json.loads(Path(path).read_text())


def stage_data(images: int):
    dataset = DATA / "dataset_coco.json"
    if dataset.is_file() and not read_json(dataset).get("rendered"):
        # a data directory of the earlier, feature-only demo: its features are not the pictures' (start again)
        shutil.rmtree(DATA)
    if not dataset.is_file():
        run("aoanet-data", "synth", "--out", DATA, "--images", images, "--render")
    if not (EXTRACTOR / "extractor.json").is_file():
        run("aoanet-data", "extractor", "--backbone", "efficientnet_lite0", "--out", EXTRACTOR)
    # resumable: a re-run extracts only what is missing
    run("aoanet-data", "extract", "--images", DATA / "images", "--extractor", EXTRACTOR, "--out", DATA,
        "--no-progress")


def stage_labels():
    run(
        "aoanet-data",
        "prepro",
        "--input-json",
        DATA / "dataset_coco.json",
        "--output-json",
        DATA / "cocotalk.json",
        "--output-h5",
        DATA / "cocotalk_label.h5",
    )
    run(
        "aoanet-data",
        "ngrams",
        "--input-json",
        DATA / "dataset_coco.json",
        "--dict-json",
        DATA / "cocotalk.json",
        "--out",
        DATA / "coco-train-ngrams.json.gz",
    )
    run("aoanet-data", "check", DATA)


def baseline_nn() -> dict:
    from aoanet.data.baseline import nearest_neighbour_captions
    from aoanet.evaluation import evaluate_predictions, load_references

    preds = nearest_neighbour_captions(DATA / "dataset_coco.json", DATA / "cocobu_fc", split="test")
    return evaluate_predictions(preds, load_references(DATA / "dataset_coco.json"), spice=False)


def evaluate(checkpoint: Path, name: str, beam_size: int) -> dict:
    out = DEMO / f"{name}_test_captions.json"
    run(
        "aoanet-eval",
        "--checkpoint",
        checkpoint,
        "--split",
        "test",
        "--beam-size",
        beam_size,
        "--out",
        out,
        "--metrics-out",
        DEMO / f"{name}_test_metrics.json",
    )
    metrics = read_json(DEMO / f"{name}_test_metrics.json")
    return {k: metrics[k] for k in (*METRICS, "SPICE") if k in metrics}


def infer_parity(export_dir: Path, checkpoint: Path, beam_sizes=(1, 2, 3)) -> dict:
    equal, total, rates = 0, 0, []
    for k in beam_sizes:
        onnx_out, paddle_out = DEMO / f"infer_onnx_b{k}.json", DEMO / f"infer_paddle_b{k}.json"
        t = time.perf_counter()
        common = ["--features", DATA, "--split", "test", "--beam-size", k]
        run("aoanet-infer", "--backend", "onnx", "--model", export_dir, *common, "--out", onnx_out)
        elapsed = time.perf_counter() - t
        run("aoanet-infer", "--backend", "paddle", "--checkpoint", checkpoint, *common, "--out", paddle_out)
        a = {p["image_id"]: p["caption"] for p in read_json(onnx_out)}
        b = {p["image_id"]: p["caption"] for p in read_json(paddle_out)}
        if set(a) != set(b):
            raise SystemExit(f"onnx and paddle captioned different images at beam {k}")
        equal += sum(a[i] == b[i] for i in a)
        total += len(a)
        rates.append(len(a) / elapsed)
    return {
        "captions_equal_paddle": equal / total,
        "images_compared": total,
        "beam_sizes": list(beam_sizes),
        "images_per_s": max(rates),
        "images_per_s_note": "end to end incl. process start, beam sizes 1-3",
    }


def infer_int8(export_dir: Path, beam_size: int, beam_sizes=(1, 2, 3), out_dir: Path = DEMO) -> dict:
    """int8 vs fp32 ONNX captions of the test split: agreement (beams 1-3, the fp32 files written by
    infer_parity), CIDEr of both at the demo's beam, and the captioning speed of both in this process."""
    from aoanet.evaluation import evaluate_predictions, load_references

    equal, total = 0, 0
    captions = {}
    for k in sorted({*beam_sizes, beam_size}):
        fp32_out, int8_out = out_dir / f"infer_onnx_b{k}.json", out_dir / f"infer_onnx_int8_b{k}.json"
        common = ["--model", export_dir, "--features", DATA, "--split", "test", "--beam-size", k]
        if k not in beam_sizes:  # not written by infer_parity in this run
            run("aoanet-infer", *common, "--out", fp32_out)
        run("aoanet-infer", *common, "--precision", "int8", "--out", int8_out)
        a = {p["image_id"]: p["caption"] for p in read_json(fp32_out)}
        b = {p["image_id"]: p["caption"] for p in read_json(int8_out)}
        if set(a) != set(b):
            raise SystemExit(f"int8 and fp32 captioned different images at beam {k}")
        if k in beam_sizes:
            equal += sum(a[i] == b[i] for i in a)
            total += len(a)
        if k == beam_size:
            captions = {"fp32": read_json(fp32_out), "int8": read_json(int8_out)}
    references = load_references(DATA / "dataset_coco.json")
    cider = {name: evaluate_predictions(preds, references, spice=False)["CIDEr"] for name, preds in captions.items()}
    return {
        "captions_equal_fp32": equal / total,
        "images_compared": total,
        "beam_sizes": list(beam_sizes),
        "cider": {**cider, "beam_size": beam_size},
        "images_per_s": {**captioning_speed(export_dir, beam_size), "beam_size": beam_size},
        "images_per_s_note": "captioning only (test-split features in memory), best of 3",
    }


def test_pictures() -> list[dict]:
    dataset = read_json(DATA / "dataset_coco.json")
    return [img for img in dataset["images"] if img["split"] == "test"]


def infer_images(export_dir: Path, checkpoint: Path, beam_size: int) -> dict:
    """The test split's picture files captioned by aoanet-infer --images with onnxruntime and with Paddle (the
    same extractor graph feeds both): CIDEr, equality of the two backends' captions and with the captions of the
    extracted features (infer_parity's files), and the end-to-end rate (files -> captions, incl. process start)."""
    from aoanet.evaluation import evaluate_predictions, load_references

    listing = DEMO / "test_images.txt"
    listing.write_text("".join(f"{DATA / img['filepath'] / img['filename']}\n" for img in test_pictures()))
    outs, seconds = {}, {}
    for backend, where in (("onnx", ["--model", export_dir]), ("paddle", ["--checkpoint", checkpoint])):
        outs[backend] = DEMO / f"infer_images_{backend}_b{beam_size}.json"
        t = time.perf_counter()
        run("aoanet-infer", "--backend", backend, *where, "--images", listing, "--beam-size", beam_size,
            "--out", outs[backend], "--no-progress")
        seconds[backend] = time.perf_counter() - t
    onnx_caps = {p["image_id"]: p["caption"] for p in read_json(outs["onnx"])}
    paddle_caps = {p["image_id"]: p["caption"] for p in read_json(outs["paddle"])}
    feature_caps = {p["image_id"]: p["caption"] for p in read_json(DEMO / f"infer_onnx_b{beam_size}.json")}
    if set(onnx_caps) != set(paddle_caps) or set(onnx_caps) != set(feature_caps):
        raise SystemExit("the picture and feature runs captioned different images")
    preds = [{"image_id": i, "caption": c} for i, c in onnx_caps.items()]
    metrics = evaluate_predictions(preds, load_references(DATA / "dataset_coco.json"), spice=False)
    return {
        "beam_size": beam_size,
        "images": len(onnx_caps),
        "CIDEr": metrics["CIDEr"],
        "metrics": {k: metrics[k] for k in METRICS},
        "captions_equal_paddle": sum(onnx_caps[i] == paddle_caps[i] for i in onnx_caps) / len(onnx_caps),
        "captions_equal_features": sum(onnx_caps[i] == feature_caps[i] for i in onnx_caps) / len(onnx_caps),
        "images_per_s": {b: len(onnx_caps) / s for b, s in seconds.items()},
        "images_per_s_note": "files -> captions incl. process start (decode, pre-process, extract, caption)",
    }


def attention_picture(export_dir: Path, beam_size: int) -> dict:
    """aoanet-infer --attention on the first test picture: its attention picture copied to
    artifacts/demo/attention.png (docs/attention.md shows one)."""
    picture = test_pictures()[0]
    path = DATA / picture["filepath"] / picture["filename"]
    out_dir = DEMO / "attention"
    shutil.rmtree(out_dir, ignore_errors=True)
    run("aoanet-infer", "--model", export_dir, "--images", path, "--beam-size", beam_size, "--out",
        DEMO / "attention_captions.json", "--attention", out_dir, "--no-progress")
    record = read_json(out_dir / f"{path.stem}.json")
    shutil.copyfile(out_dir / f"{path.stem}.png", DEMO / "attention.png")
    return {"image_id": record["image_id"], "caption": record["caption"], "grid": record["grid"],
            "heads": record["heads"], "picture": str((DEMO / "attention.png").relative_to(ROOT))}


def captions_figure(captions_json: Path, out: Path, count: int = 16) -> None:
    """16 test pictures with their generated captions, 4 x 4."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    results = read_json(captions_json)[:count]
    fig, axes = plt.subplots(4, 4, figsize=(16, 14))
    for ax, r in zip(axes.ravel(), results):
        ax.imshow(Image.open(r["file_name"]))
        ax.set_title("\n".join(textwrap.wrap(r["caption"], 38)), fontsize=10)
        ax.axis("off")
    for ax in axes.ravel()[len(results):]:
        ax.axis("off")
    fig.suptitle("AoANet on EfficientNet-Lite0 grid features: test pictures (aoanet-infer --images, onnxruntime)")
    fig.tight_layout()
    fig.savefig(out, dpi=60)
    plt.close(fig)


def captioning_speed(export_dir: Path, beam_size: int, repeats: int = 3) -> dict:
    from aoanet_runtime import Captioner
    from aoanet_runtime.features import list_images, read_features

    images = list_images(DATA, "test")
    rates = {}
    for precision in ("fp32", "int8"):
        captioner = Captioner.from_dir(export_dir, precision=precision)
        feats = [read_features(image, captioner.att_feat_size) for image in images]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            captioner.caption(feats, beam_size=beam_size)
            best = min(best, time.perf_counter() - start)
        rates[precision] = len(feats) / best
    return rates


def table(report: dict) -> str:
    rows = [
        ("baseline_nn", report.get("baseline_nn", {})),
        ("xe", report.get("xe", {})),
        ("scst", report.get("scst", {})),
    ]
    lines = [f"{'stage':12s}" + "".join(f"{m:>9s}" for m in METRICS)]
    for name, m in rows:
        if m:
            lines.append(f"{name:12s}" + "".join(f"{m.get(k, float('nan')):9.3f}" for k in METRICS))
    if "export" in report:
        lines.append(f"export: max |logprob diff| paddle vs onnx = {report['export']['max_abs_diff_logprobs']:.2e}")
    if "infer" in report:
        i = report["infer"]
        lines.append(
            f"infer: captions equal to paddle = {i['captions_equal_paddle']:.3f} "
            f"({i['images_compared']} captions), {i['images_per_s']:.1f} images/s"
        )
        if "images" in i:
            m = i["images"]
            lines.append(
                f"infer --images: CIDEr {m['CIDEr']:.3f} (beam {m['beam_size']}), captions equal to paddle = "
                f"{m['captions_equal_paddle']:.3f}, to the features' = {m['captions_equal_features']:.3f}"
            )
        if "attention" in report:
            a = report["attention"]
            lines.append(f"attention: image {a['image_id']} \"{a['caption']}\" -> {a['picture']}")
        if "int8" in i:
            q = i["int8"]
            lines.append(
                f"infer int8: captions equal to fp32 = {q['captions_equal_fp32']:.3f} ({q['images_compared']} "
                f"captions); beam {q['cider']['beam_size']}: CIDEr {q['cider']['int8']:.3f} (fp32 "
                f"{q['cider']['fp32']:.3f}), {q['images_per_s']['int8']:.0f} images/s (fp32 "
                f"{q['images_per_s']['fp32']:.0f})"
            )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=4000, help="size of the embedded dataset")
    ap.add_argument("--beam-size", type=int, default=2, help="test-time beam (the authors report beam 2)")
    ap.add_argument("--skip-scst", action="store_true")
    args = ap.parse_args()
    configure_math_library()  # the demo runs the commands in this process and in child processes
    started = time.time()
    DEMO.mkdir(parents=True, exist_ok=True)
    for stale in ("xe", "scst", "export"):
        shutil.rmtree(DEMO / stale, ignore_errors=True)
    report: dict = {
        "dataset": {"images": args.images, "dir": str(DATA.relative_to(ROOT)), "pictures": "rendered scenes"},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_1min_at_start": _load()},
    }

    with stage("pictures_and_features"):
        stage_data(args.images)
    report["extractor"] = {
        k: read_json(EXTRACTOR / "extractor.json")[k] for k in ("backbone", "layer", "size", "feature_width")
    }
    with stage("labels"):
        stage_labels()
    with stage("baseline_nn"):
        report["baseline_nn"] = {k: v for k, v in baseline_nn().items() if k in METRICS}

    with stage("xe"):
        run("aoanet-train", "xe", "--config", "configs/demo.yml")
        report["xe"] = evaluate(DEMO / "xe", "xe", args.beam_size)
    final = DEMO / "xe"
    if not args.skip_scst:
        with stage("scst"):
            run("aoanet-train", "scst", "--config", "configs/demo_rl.yml", "--start-from", DEMO / "xe")
            report["scst"] = evaluate(DEMO / "scst", "scst", args.beam_size)
        final = DEMO / "scst"
        report["scst_vs_xe_cider"] = report["scst"]["CIDEr"] / report["xe"]["CIDEr"]
    report["xe_vs_baseline_cider"] = report["xe"]["CIDEr"] / report["baseline_nn"]["CIDEr"]

    with stage("export"):
        run("aoanet-export", "--checkpoint", final, "--out", DEMO / "export", "--force", "--int8")
    parity = read_json(DEMO / "export" / "parity.json")
    report["export"] = {"max_abs_diff_logprobs": parity["max_abs_diff_logprobs"], "checkpoint": final.name}
    with stage("infer_features"):
        report["infer"] = infer_parity(DEMO / "export", final)
        report["infer"]["int8"] = infer_int8(DEMO / "export", args.beam_size)
    with stage("infer_images"):
        report["infer"]["images"] = infer_images(DEMO / "export", final, args.beam_size)
        captions_figure(DEMO / f"infer_images_onnx_b{args.beam_size}.json", DEMO / "captions.png")
    with stage("attention"):
        report["attention"] = attention_picture(DEMO / "export", args.beam_size)
    report["stages"] = STAGES
    report["machine"]["load_1min_at_end"] = _load()
    report["seconds"] = round(time.time() - started, 1)

    (DEMO / "report.json").write_text(json.dumps(report, indent=1))
    print("\n" + table(report))
    print("\nstages (wall s / CPU s / load): " + ", ".join(
        f"{k} {v['seconds']:.0f}/{v['cpu_seconds']:.0f}/{v['load_1min']:.1f}" for k, v in STAGES.items()
    ))
    print(f"\nreport: {DEMO / 'report.json'}  ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
