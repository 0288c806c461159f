"""Inference benchmark of the FULL-SIZE AoANet on this machine's CPU, every backend in one run.

Random weights (``build_model(9487)``: R = 1024, 6 refiner layers), 36 regions of 2048-d per image, beam 3,
20 steps. Measures images/s for:

* onnxruntime, batched (``Captioner.caption``, ``--batch-size`` images per encoder run and beam batch), fp32
  and int8 (``aoanet-export --int8``; lossy, so also the fraction of captions equal to fp32's);
* onnxruntime with several batches decoded at once (``Captioner.from_dir(streams=...)``), fp32 and int8;
* onnxruntime, one image at a time;
* Paddle's dynamic graph (``AoAModel.decode``, batched), and one image at a time (the reference code's way);
* Paddle's static graph (``paddle.inference`` on the export's ``static/``), driving the same beam search;

plus the FLOPs per image (matmul FLOPs of the encoder and of every decoder row-step actually run, from the
shapes), the machine's measured fp32 matmul rate (numpy and an onnxruntime MatMul, 1024x1024 @ 1024x4096,
best of several, same thread count) and the roofline fraction = achieved FLOP/s of onnxruntime batched / that
rate. Also sweeps the onnxruntime session options (intra-op threads x spinning). Every timing is the best of
``--repeats`` runs (the machine may be shared). Then the speed-ups over the dynamic graph again, interleaved:
``--rounds`` rounds each running every backend once, a ratio per round (median and range), so that a drift of the
machine's speed between phases cannot bias them. Writes artifacts/bench/infer.json and prints a table.

    python scripts/bench_infer.py [--images 100] [--work /tmp/aoanet-bench-infer] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from benchlib import N_REGIONS, F, V, cpu_isa, cpu_name, random_decoder_feeds, random_export, rotating_rounds  # noqa: E402

from aoanet.cpu import configure_math_library  # noqa: E402

configure_math_library()  # before Paddle is imported



# ----------------------------------------------------------------------------------------------- FLOPs
def encoder_flops(o, n_images: int, regions: int) -> float:
    """Matmul FLOPs of ``encode`` for n_images x regions (att_embed, refiner, ctx2att)."""
    r, f, n = o["rnn_size"], o["att_feat_size"], regions
    per_layer = 3 * n * r * r + 2 * n * n * r + n * (2 * r) * (2 * r)  # q/k/v, scores + weighted sum, AoA
    macs = n * f * r + o["refine_layers"] * per_layer + n * r * 2 * r
    return 2.0 * macs * n_images


def decoder_flops(o, row_steps: int, regions: int, vocab1: int) -> float:
    """Matmul FLOPs of ``row_steps`` steps of the exported decoder (FoldedStep: the LSTM's [m + c; h] product,
    the word's share being a table lookup; query, attention, att2ctx, logit)."""
    r, n = o["rnn_size"], regions
    macs = 2 * r * 4 * r + r * r + 2 * n * r + (2 * r) * (2 * r) + r * vocab1
    return 2.0 * macs * row_steps


# ----------------------------------------------------------------------------------------------- helpers
class Counting:
    """A session wrapper that times every run and counts the decoder rows it was given."""

    def __init__(self, session, name: str, stats: dict):
        self.session, self.name, self.stats = session, name, stats

    def run(self, outputs, feeds):
        t = time.perf_counter()
        result = self.session.run(outputs, feeds)
        self.stats[f"{self.name}_s"] += time.perf_counter() - t
        self.stats[f"{self.name}_runs"] += 1
        if self.name == "decoder":
            self.stats["row_steps"] += int(feeds["it"].shape[0])
        else:
            self.stats["encoded_images"] += int(feeds["att_feats"].shape[0])
        return result

    def __getattr__(self, name):
        return getattr(self.session, name)


def new_stats() -> dict:
    return dict.fromkeys(("encoder_s", "decoder_s", "encoder_runs", "decoder_runs", "row_steps", "encoded_images"), 0)


class StaticSession:
    """paddle.inference predictor behind onnxruntime's ``run(output_names, feeds)`` (the predictor returns
    every output, in the contract's order ``names``)."""

    def __init__(self, files, threads: int, names):
        from aoanet_export.static import StaticPredictor

        self.predictor, self.names = StaticPredictor(files, threads), list(names)

    def run(self, outputs, feeds):
        results = self.predictor(feeds)
        return [results[self.names.index(name)] for name in outputs]


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def interleave(contenders: dict, rounds: int, images: int) -> dict:
    """Run every contender once per round, the order rotating, and take each round's ratio of images/s to the
    first contender (the baseline): medians and ranges over the rounds."""
    names = list(contenders)
    times = rotating_rounds(contenders, rounds)
    base = names[0]
    ratios = {
        name: [b / t for b, t in zip(times[base], times[name], strict=True)] for name in names[1:]
    }
    return {
        "rounds": rounds,
        "baseline": base,
        "images_per_s_median": {name: images / float(np.median(times[name])) for name in names},
        "speedup_vs_paddle_eager": {
            name: {"median": float(np.median(v)), "min": min(v), "max": max(v), "rounds": v}
            for name, v in ratios.items()
        },
    }


def matmul_rates(threads: int, repeats: int = 10) -> dict:
    """fp32 GFLOP/s of (1024x1024) @ (1024x4096): numpy's BLAS and an onnxruntime MatMul session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.random((1024, 1024), dtype=np.float32)
    b = rng.random((1024, 4096), dtype=np.float32)
    flops = 2.0 * 1024 * 1024 * 4096
    a @ b
    t_np, _ = best_of(lambda: a @ b, repeats)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 1024])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [None, 4096])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out = {"numpy_gflops": flops / t_np / 1e9}
    for spin in ("0", "1"):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"A": a})
        t, _ = best_of(lambda s=session: s.run(None, {"A": a}), repeats)
        out[f"onnxruntime_spin{spin}_gflops"] = flops / t / 1e9
    out["gflops"] = max(out.values())
    # onnxruntime's two int8 kernels on this CPU: u8 x u8 (the x64quantprecision option) and u8 x s8 (VNNI/AMX
    # where present; on AVX2 alone it saturates: docs/int8.md). Which one a session runs shows in its optimized
    # graph: onnxruntime rewrites the int8 weights to uint8 for the u8 x u8 kernel.
    out["int8_weights_after_optimization"] = {}
    for key, u8u8 in (("int8_gops", None), ("int8_u8u8_gops", True), ("int8_u8s8_gops", False)):
        out[key], weights = int8_matmul_rate(model, a, threads, repeats, u8u8=u8u8)
        out["int8_weights_after_optimization"][key.removesuffix("_gops")] = weights
    return out


def int8_matmul_rate(
    fp32_model, a: np.ndarray, threads: int, repeats: int, u8u8: bool | None = None
) -> tuple[float, str]:
    """GOP/s (2 per multiply-add) of the same product quantized as the --int8 graphs are (quantize_dynamic,
    per-channel int8 weights, activations quantized at run time): the ceiling for the int8 backend. ``u8u8``:
    None runs it as the runtime does on this CPU; True/False forces onnxruntime's u8 x u8 kernel (the
    x64quantprecision option) or its u8 x s8 one (VNNI/AMX where the CPU has them). Also the element type of the
    weights in onnxruntime's optimized graph ("UINT8": the u8 x u8 kernel runs; "INT8": u8 x s8)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from aoanet_export import quantize
    from aoanet_runtime.sessions import session_options

    with tempfile.TemporaryDirectory() as work:
        src, dst = Path(work) / "matmul.onnx", Path(work) / "matmul.int8.onnx"
        onnx.save(fp32_model, str(src))
        quantize.quantize_file(src, dst)
        # as the runtime runs the int8 graphs (spinning off; the u8 x u8 kernel on CPUs without VNNI), or with the
        # entries the runtime picks for a CPU without int8 dot products (u8 x u8) or with them (u8 x s8)
        cpuinfo = None if u8u8 is None else ("flags\t: avx2\n" if u8u8 else "flags\t: avx2 avx512_vnni\n")
        options = session_options(threads, spinning=False, cpuinfo=cpuinfo)
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        session = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
        integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        weights = sorted({onnx.TensorProto.DataType.Name(t.data_type)
                          for t in onnx.load(options.optimized_model_filepath).graph.initializer
                          if t.data_type in integer and t.dims})  # the weight matrices, not the zero points
    session.run(None, {"A": a})
    t, _ = best_of(lambda: session.run(None, {"A": a}), repeats)
    return 2.0 * a.shape[0] * a.shape[1] * 4096 / t / 1e9, "+".join(weights)


def decoder_step_cost(session, rows: int, beams: int, r: int, heads: int, repeats: int) -> dict:
    """One decoder run over ``rows`` beams (``beams`` per image) with 36 regions and with 1: the difference is
    what the graph spends on the memory each step (attention over the regions), the matmuls being equal."""
    rng = np.random.default_rng(1)
    images = rows // beams
    out = {"rows": rows, "images": images}
    for n in (N_REGIONS, 1):
        feeds = random_decoder_feeds(rng, rows, images, n, r, heads, topk=beams + 1)  # as the search asks
        session.run(None, feeds)
        t, _ = best_of(lambda f=feeds: session.run(None, f), 5 * repeats)
        out[f"regions_{n}"] = 1000 * t
    out["p_att_share"] = 1 - out["regions_1"] / out[f"regions_{N_REGIONS}"]
    return out


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="images for the batched backends")
    p.add_argument("--single-images", type=int, default=10, help="images for onnxruntime one at a time")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved speed-up measurement")
    p.add_argument("--sweep-images", type=int, default=50, help="images per session-option setting (0: skip)")
    p.add_argument("--work", type=Path, default=Path("/tmp/aoanet-bench-infer"))
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "infer.json")
    p.add_argument("--rates-only", action="store_true",
                   help="only the matmul rates (fp32, int8 as the runtime runs it, int8 u8 x u8 and u8 x s8)")
    args = p.parse_args()
    if args.rates_only:
        rates = {"machine": {"cpu": cpu_name(), "isa": cpu_isa(), "threads": args.threads},
                 "product": "(1024 x 1024) @ (1024 x 4096), best of --repeats x 10",
                 "matmul_rate": matmul_rates(args.threads, 10 * args.repeats)}
        rates["machine"]["load_average_after"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rates, indent=1))
        print(json.dumps(rates["matmul_rate"], indent=1))
        print(f"wrote {args.out}")
        return 0

    import onnxruntime as ort

    from aoanet_runtime import Captioner

    _, export_dir = random_export(args.work, int8=True)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    o = manifest["model_options"]
    vocab1 = manifest["vocab_size"] + 1
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((args.images, N_REGIONS, F))).astype(np.float32)
    masks = np.ones(feats.shape[:2], np.float32)
    k, length, bs = args.beam_size, args.max_length, args.batch_size

    def caption_all(captioner):  # the measured job: every image, batch bs, beam k
        return captioner.caption(feats, beam_size=k, max_length=length, batch_size=bs)
    results: dict = {}
    print(f"load average before: {os.getloadavg()}", flush=True)

    # 1. the machine's matmul rate (first: nothing else has run threads yet)
    rates = matmul_rates(args.threads)
    print(f"matmul fp32 (1024x1024 @ 1024x4096, {args.threads} threads): {rates}", flush=True)

    # 2. onnxruntime session options
    sweep = []
    if args.sweep_images > 0:
        sub = feats[: args.sweep_images]
        for threads in sorted({1, args.threads}):
            for spinning in (False, True):
                c = Captioner.from_dir(export_dir, threads=threads, spinning=spinning, verify=False)
                c.caption(sub[:2], beam_size=k, max_length=length)  # warm-up
                t, _ = best_of(lambda c=c: c.caption(sub, beam_size=k, max_length=length, batch_size=bs), args.repeats)
                sweep.append({"threads": threads, "spinning": spinning, "images_per_s": len(sub) / t})
                print(
                    f"  onnxruntime threads={threads} spinning={spinning}: {len(sub) / t:.2f} images/s",
                    flush=True,
                )

    # 3. onnxruntime batched, with the runtime's defaults, instrumented; fp32 and int8
    def instrumented(captioner):
        stats = new_stats()
        captioner.encoder = Counting(captioner.encoder, "encoder", stats)
        captioner.decoder = Counting(captioner.decoder, "decoder", stats)
        captioner.caption(feats[:2], beam_size=k, max_length=length)
        best = None
        for _ in range(args.repeats):
            for key in stats:
                stats[key] = 0
            t0 = time.perf_counter()
            out = caption_all(captioner)
            elapsed = time.perf_counter() - t0
            if best is None or elapsed < best[0]:
                best = (elapsed, dict(stats))
        elapsed, stats = best
        enc_flops = encoder_flops(o, args.images, N_REGIONS)
        dec_flops = decoder_flops(o, stats["row_steps"], N_REGIONS, vocab1)
        return out, stats, enc_flops, dec_flops, {
            "images_per_s": args.images / elapsed,
            "seconds": elapsed,
            "encoder_s": stats["encoder_s"],
            "decoder_s": stats["decoder_s"],
            "search_and_glue_s": elapsed - stats["encoder_s"] - stats["decoder_s"],
            "decoder_runs": stats["decoder_runs"],
            "decoder_row_steps": stats["row_steps"],
            "encoder_gflops": enc_flops / stats["encoder_s"] / 1e9,
            "decoder_gflops": dec_flops / stats["decoder_s"] / 1e9,
        }

    captioner = Captioner.from_dir(export_dir, threads=args.threads)
    onnx_out, stats, enc_flops, dec_flops, results["onnxruntime_batched"] = instrumented(captioner)
    flops_per_image = (enc_flops + dec_flops) / args.images
    print(f"onnxruntime batched: {results['onnxruntime_batched']}", flush=True)
    int8_captioner = Captioner.from_dir(export_dir, threads=args.threads, precision="int8")
    int8_out, _, _, _, results["onnxruntime_int8_batched"] = instrumented(int8_captioner)
    print(f"onnxruntime int8 batched: {results['onnxruntime_int8_batched']}", flush=True)
    # several batches at once on worker threads, threads // streams intra-op threads each (Captioner streams)
    streams = max(2, args.threads)
    streamed_out, streams_captioners = {}, {}
    for precision, name in (("fp32", "onnxruntime_streams"), ("int8", "onnxruntime_int8_streams")):
        threads = max(1, args.threads // streams)
        c = Captioner.from_dir(export_dir, precision=precision, streams=streams, threads=threads)
        c.caption(feats[:2], beam_size=k, max_length=length)
        t, streamed_out[precision] = best_of(lambda c=c: caption_all(c), args.repeats)
        results[name] = {"images_per_s": args.images / t, "seconds": t, "streams": streams}
        streams_captioners[precision] = c
        print(f"onnxruntime {precision}, {streams} streams: {args.images / t:.2f} images/s", flush=True)
    step_cost = decoder_step_cost(captioner.decoder.session, bs * k, k, o["rnn_size"], o["num_heads"], args.repeats)
    print(f"decoder run over {bs * k} rows: {step_cost}", flush=True)

    # 4. onnxruntime one image at a time
    n1 = min(args.single_images, args.images)
    t, _ = best_of(lambda: captioner.caption(feats[:n1], beam_size=k, max_length=length, batch_size=1), args.repeats)
    results["onnxruntime_single"] = {"images_per_s": n1 / t, "seconds": t, "images": n1}
    print(f"onnxruntime one at a time: {n1 / t:.2f} images/s", flush=True)

    # 5. Paddle dynamic graph, batched (before any paddle.inference predictor exists: see 8)
    import paddle

    from aoanet.train.checkpoint import load_model

    paddle.base.core.set_num_threads(args.threads)

    model, _ = load_model(args.work / "checkpoint")

    def eager():
        seqs = []
        for s in range(0, args.images, bs):
            r = model.decode(
                paddle.to_tensor(feats[s : s + bs]),
                paddle.to_tensor(masks[s : s + bs]),
                beam_size=k,
                max_length=length,
            )
            seqs.append(r.seqs)
        return np.concatenate(seqs)

    eager_seqs = model.decode(paddle.to_tensor(feats[:2]), paddle.to_tensor(masks[:2]), beam_size=k).seqs
    t, eager_seqs = best_of(eager, args.repeats)
    results["paddle_eager"] = {"images_per_s": args.images / t, "seconds": t}
    print(f"paddle dynamic graph: {args.images / t:.2f} images/s", flush=True)

    # 6. Paddle dynamic graph, one image at a time: the reference code's way (its beam search loops over the
    # images of a batch, beam_size rows per decoder step)
    def eager_per_image():
        return [
            model.decode(
                paddle.to_tensor(feats[i : i + 1]), paddle.to_tensor(masks[i : i + 1]), beam_size=k, max_length=length
            ).seqs
            for i in range(n1)
        ]

    t, _ = best_of(eager_per_image, args.repeats)
    results["paddle_eager_per_image"] = {"images_per_s": n1 / t, "seconds": t, "images": n1}
    print(f"paddle dynamic graph, one image at a time: {n1 / t:.2f} images/s", flush=True)

    # 7. the speed-ups again, interleaved: each round runs every backend once (in a rotating order), and each
    # round gives its own ratios to the dynamic graph, so that the machine's drift between the phases above (the
    # load of a shared host changes over minutes) cannot bias a ratio.
    contenders = {
        "paddle_eager": eager,
        "onnxruntime_batched": lambda: caption_all(captioner),
        "onnxruntime_int8_batched": lambda: caption_all(int8_captioner),
        "onnxruntime_int8_streams": lambda: caption_all(streams_captioners["int8"]),
    }
    interleaved = interleave(contenders, args.rounds, args.images)
    for name, row in interleaved["speedup_vs_paddle_eager"].items():
        print(
            f"interleaved x{args.rounds}: {name} median {row['median']:.2f}x the dynamic graph "
            f"(rounds {row['min']:.2f}-{row['max']:.2f})",
            flush=True,
        )

    # 8. Paddle static graph (paddle.inference) through the same captioner code. Last: running a paddle.inference
    # predictor leaves the process's math library on 1 thread, and the dynamic graph then runs markedly slower
    # (paddle.base.core.set_num_threads restores it; docs/benchmarks.md), which would flatter every ratio to the
    # dynamic graph.
    from aoanet_export.static import StaticFiles
    from aoanet_runtime.contract import DECODER_OUTPUTS, ENCODER_OUTPUTS

    static_files = {
        name: StaticFiles(export_dir / entry["model_file"], export_dir / entry["params_file"])
        for name, entry in manifest["static"].items()
    }
    static = Captioner(
        StaticSession(static_files["encoder"], args.threads, ENCODER_OUTPUTS),
        StaticSession(static_files["decoder"], args.threads, DECODER_OUTPUTS),
        manifest,
    )
    static.caption(feats[:2], beam_size=k, max_length=length)
    t, static_out = best_of(lambda: caption_all(static), args.repeats)
    results["paddle_static"] = {"images_per_s": args.images / t, "seconds": t}
    print(f"paddle static (paddle.inference): {args.images / t:.2f} images/s", flush=True)

    # 9. summary
    achieved = flops_per_image * results["onnxruntime_batched"]["images_per_s"]
    report = {
        "machine": {
            "cpu": cpu_name(),
            "isa": cpu_isa(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average_after": os.getloadavg(),
        },
        "versions": {"onnxruntime": ort.__version__, "paddle": paddle.__version__, "numpy": np.__version__},
        "setup": {
            "vocab_size": V,
            "regions": N_REGIONS,
            "att_feat_size": F,
            "beam_size": k,
            "max_length": length,
            "batch_size": bs,
            "images": args.images,
            "repeats": args.repeats,
            "weights": "random (paddle.seed(0))",
        },
        "images_per_s": {name: r["images_per_s"] for name, r in results.items()},
        "details": results,
        "session_option_sweep": sweep,
        "flops_per_image": flops_per_image,
        "flops_per_image_encoder": enc_flops / args.images,
        "flops_per_image_decoder": dec_flops / args.images,
        "decoder_row_steps_per_image": stats["row_steps"] / args.images,
        "decoder_step_ms": step_cost,
        "matmul_rate": rates,
        "achieved_gflops": achieved / 1e9,
        "roofline_fraction": achieved / (rates["gflops"] * 1e9),
        # the same for int8: its achieved rate over the measured rate of a quantized matmul (same product)
        "int8_achieved_gops": flops_per_image * results["onnxruntime_int8_batched"]["images_per_s"] / 1e9,
        "int8_roofline_fraction": flops_per_image
        * results["onnxruntime_int8_batched"]["images_per_s"]
        / (rates["int8_gops"] * 1e9),
        "speedup_onnx_vs_paddle_eager": results["onnxruntime_batched"]["images_per_s"]
        / results["paddle_eager"]["images_per_s"],
        "speedup_onnx_vs_paddle_static": results["onnxruntime_batched"]["images_per_s"]
        / results["paddle_static"]["images_per_s"],
        "speedup_onnx_int8_vs_paddle_eager": results["onnxruntime_int8_batched"]["images_per_s"]
        / results["paddle_eager"]["images_per_s"],
        "speedup_onnx_vs_paddle_eager_per_image": results["onnxruntime_batched"]["images_per_s"]
        / results["paddle_eager_per_image"]["images_per_s"],
        # the fastest onnxruntime configuration of each precision (default single stream, or streams)
        "speedup_best_fp32_vs_paddle_eager": max(
            results[n]["images_per_s"] for n in ("onnxruntime_batched", "onnxruntime_streams")
        )
        / results["paddle_eager"]["images_per_s"],
        "speedup_best_int8_vs_paddle_eager": max(
            results[n]["images_per_s"] for n in ("onnxruntime_int8_batched", "onnxruntime_int8_streams")
        )
        / results["paddle_eager"]["images_per_s"],
        "interleaved": interleaved,
        "targets": {"speedup_onnx_vs_paddle_eager": 10.0, "roofline_fraction": 0.6},
        "same_captions": {
            "paddle_static_vs_onnx": bool(np.array_equal(static_out.seqs, onnx_out.seqs)),
            "paddle_eager_vs_onnx": bool(np.array_equal(eager_seqs, onnx_out.seqs)),
            "onnx_int8_vs_fp32_fraction": float(np.mean(np.all(int8_out.seqs == onnx_out.seqs, axis=1))),
            "onnx_streams_vs_one_stream": bool(np.array_equal(streamed_out["fp32"].seqs, onnx_out.seqs))
            and bool(np.array_equal(streamed_out["int8"].seqs, int8_out.seqs)),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print()
    print(f"{'backend':34s} {'images/s':>9s} {'vs eager':>9s}")
    for name, ips in report["images_per_s"].items():
        print(f"{name:34s} {ips:9.2f} {ips / report['images_per_s']['paddle_eager']:8.1f}x")
    print(
        f"FLOPs/image {flops_per_image / 1e9:.2f} G (encoder {enc_flops / args.images / 1e9:.2f}, decoder "
        f"{dec_flops / args.images / 1e9:.2f}); achieved {achieved / 1e9:.1f} GFLOP/s of a measured matmul "
        f"rate of {rates['gflops']:.1f} GFLOP/s -> roofline fraction {report['roofline_fraction']:.2f}"
    )
    print(
        f"int8: achieved {report['int8_achieved_gops']:.1f} GOP/s of a measured int8 matmul rate of "
        f"{rates['int8_gops']:.1f} GOP/s -> {report['int8_roofline_fraction']:.2f}"
    )
    print(
        f"int8 captions equal to fp32's: {report['same_captions']['onnx_int8_vs_fp32_fraction']:.1%} "
        "(random weights; see the demo report for a trained model)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
