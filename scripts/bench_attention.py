"""What the attention output costs: the FULL-SIZE AoANet's decoder with and without it, side by side in one run.

Random weights (``build_model(9487)``: R = 1024, 8 heads, 6 refiner layers), exported by the current code
(format 6: the decoder has the output ``attention``). The "before" decoder is the same graph with that output
removed and the nodes only it needed pruned (what format 5 exported). Contenders, in interleaved rounds (the order
rotating each round, a ratio to "before" per round; medians and ranges):

* ``before``: format 5's decoder, captioning without attention;
* ``after``: format 6's decoder, captioning without asking for attention (the output exists, is not fetched);
* ``after_attention``: format 6's decoder with ``return_attention=True`` (fetched every step, carried by the
  search, returned per image).

Captioning is ``Captioner.caption`` of ``--images`` images of 36 regions x 2048, beam 3, batches of 50, 20 steps.
Also one decoder run at the shape of a beam step (150 rows, 36 regions), interleaved the same way, and the time to
draw and write one image's attention picture and JSON (``AttentionWriter``: a 640 x 480 JPEG with a 7 x 7 grid, 36
region boxes on a canvas, bars). Writes artifacts/bench/attention.json and prints a table.

    python scripts/bench_attention.py [--images 100] [--rounds 5] [--work /tmp/aoanet-bench-attention]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from aoanet.cpu import configure_math_library  # noqa: E402

configure_math_library()  # before Paddle is imported

from benchlib import N_REGIONS, F, V, machine, random_decoder_feeds, random_export, rotating_rounds  # noqa: E402


def without_attention(decoder_path: Path) -> bytes:
    """The decoder graph as format 5 exported it: no ``attention`` output, nothing computed for it alone."""
    import onnx

    from aoanet_export.onnx_convert import prune_unused

    graph = onnx.load(str(decoder_path))
    kept = [o for o in graph.graph.output if o.name != "attention"]
    if len(kept) == len(graph.graph.output):
        raise SystemExit(f"{decoder_path} has no attention output: is it an export of the current code?")
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    dropped = prune_unused(graph)
    print(f"format-5 decoder: attention output removed, {dropped} node(s) only it needed pruned", flush=True)
    return graph.SerializeToString()


def interleave(contenders: dict, rounds: int) -> dict:
    """Each round runs every contender once, the order rotating; per round each one's time relative to the first
    contender's (the baseline). -> seconds per contender and round, and the ratios' median and range."""
    names = list(contenders)
    times = rotating_rounds(contenders, rounds)
    base = names[0]
    ratios = {name: [t / b for t, b in zip(times[name], times[base], strict=True)] for name in names[1:]}
    return {
        "baseline": base,
        "rounds": rounds,
        "seconds": times,
        "median_seconds": {name: float(np.median(v)) for name, v in times.items()},
        "time_vs_baseline": {
            name: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for name, v in ratios.items()
        },
    }


def drawing_cost(repeats: int) -> dict:
    """Seconds to draw and write one image's attention (12 words, 8 heads) with AttentionWriter."""
    from PIL import Image, ImageFilter

    from aoanet_runtime.attention import AttentionWriter
    from aoanet_runtime.extractor import cell_boxes

    rng = np.random.default_rng(0)
    tokens = "a man riding a wave on top of a surfboard in the ocean".split()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        picture = Path(tmp) / "picture.jpg"
        noise = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        noise.filter(ImageFilter.GaussianBlur(4)).save(picture, quality=90)
        writer = AttentionWriter(Path(tmp) / "attention")
        xy = rng.uniform(0, 500, (N_REGIONS, 2))
        cases = {
            "grid_7x7_on_a_640x480_jpeg": dict(picture=picture, boxes=cell_boxes(7, 7) * np.array([640, 480] * 2),
                                                grid=(7, 7), n=49),
            "36_boxes_on_a_canvas": dict(boxes=np.concatenate([xy, xy + rng.uniform(20, 200, (N_REGIONS, 2))], 1),
                                         n=N_REGIONS),
            "bars_36_regions": dict(n=N_REGIONS),
        }
        for name, case in cases.items():
            n = case.pop("n")
            weights = rng.dirichlet(np.ones(n), size=(len(tokens), 8)).astype(np.float32)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                writer.draw_one(1, " ".join(tokens), tokens, weights, **case)
                best = min(best, time.perf_counter() - t)
            out[name] = {"seconds": best, "png_bytes": (Path(tmp) / "attention" / "1.png").stat().st_size}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--step-repeats", type=int, default=20, help="decoder runs per contender and round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work", type=Path, default=Path("/tmp/aoanet-bench-attention"))
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "attention.json")
    args = p.parse_args()

    import onnxruntime as ort

    from aoanet_runtime import Captioner
    from aoanet_runtime.contract import ATTENTION_OUTPUT, CANDIDATE_OUTPUTS
    from aoanet_runtime.sessions import session_options

    load_before = os.getloadavg()
    _, export_dir = random_export(args.work)
    full = Captioner.from_dir(export_dir, threads=args.threads)
    before_decoder = ort.InferenceSession(without_attention(export_dir / "decoder.onnx"),
                                          sess_options=session_options(args.threads),
                                          providers=["CPUExecutionProvider"])
    before = Captioner(full.encoder, before_decoder, full.manifest)
    assert full.has_attention and not before.has_attention

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((args.images, N_REGIONS, F))).astype(np.float32)
    masks = np.ones(feats.shape[:2], np.float32)
    kw = dict(beam_size=args.beam_size, batch_size=args.batch_size)

    # the same captions from all three (and warm-up)
    want = before.caption(feats, masks, **kw)
    got = full.caption(feats, masks, **kw)
    with_att = full.caption(feats, masks, return_attention=True, **kw)
    assert got.captions == want.captions == with_att.captions, "the decoders disagree"

    print(f"captioning {args.images} images, beam {args.beam_size}, {args.rounds} interleaved rounds ...", flush=True)
    captioning = interleave({
        "before": lambda: before.caption(feats, masks, **kw),
        "after": lambda: full.caption(feats, masks, **kw),
        "after_attention": lambda: full.caption(feats, masks, return_attention=True, **kw),
    }, args.rounds)
    captioning["images"] = args.images
    captioning["images_per_s_median"] = {
        name: args.images / s for name, s in captioning["median_seconds"].items()
    }

    # one decoder run at a beam step's shape: 50 images x 3 beams, fetching what the search fetches
    r, heads = full.rnn_size, int(full.manifest["sizes"]["num_heads"])
    rows, images = args.batch_size * args.beam_size, args.batch_size
    feeds = random_decoder_feeds(rng, rows, images, N_REGIONS, r, heads, topk=args.beam_size + 1)
    fetch = list(CANDIDATE_OUTPUTS)

    def steps(session, outputs):
        return lambda: [session.run(outputs, feeds) for _ in range(args.step_repeats)]

    print(f"decoder runs ({rows} rows, {N_REGIONS} regions), {args.rounds} interleaved rounds ...", flush=True)
    step = interleave({
        "before": steps(before_decoder, fetch),
        "after": steps(full.decoder, fetch),
        "after_attention": steps(full.decoder, [*fetch, ATTENTION_OUTPUT]),
    }, args.rounds)
    step["ms_per_run_median"] = {name: 1000 * s / args.step_repeats for name, s in step["median_seconds"].items()}
    step.update(rows=rows, regions=N_REGIONS, runs_per_round=args.step_repeats)

    print("drawing ...", flush=True)
    drawing = drawing_cost(5)

    report = {
        "machine": {**machine(), "threads": args.threads,
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "model": {"vocab_size": V, "rnn_size": r, "num_heads": heads, "att_feat_size": F, "regions": N_REGIONS,
                  "weights": "random (build_model(9487))"},
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__},
        "captioning": {**captioning, "beam_size": args.beam_size, "batch_size": args.batch_size},
        "decoder_run": step,
        "drawing_per_image": drawing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print(f"\nCPU: {report['machine']['cpu']} ({os.cpu_count()} CPUs), load {load_before[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'':28s}{'median':>10s}{'vs before (median, range)':>34s}")
    for title, part, unit, scale in (("captioning, s per job", captioning, "s", 1.0),
                                     ("decoder run, ms", step, "ms", 1000.0 / args.step_repeats)):
        print(title)
        for name in ("before", "after", "after_attention"):
            ratio = part["time_vs_baseline"].get(name)
            spread = f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if ratio else "1"
            print(f"  {name:26s}{part['median_seconds'][name] * scale:9.2f}{unit:<3s}{spread:>28s}")
    print("drawing one image's attention (12 words): " + ", ".join(
        f"{k} {1000 * v['seconds']:.0f} ms" for k, v in drawing.items()))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
