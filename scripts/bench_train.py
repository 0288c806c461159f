"""Training-step and decoding benchmark of the FULL-SIZE AoANet, optionally side by side with the authors' code.

The work (docs/benchmarks.md, "Training speed") is that of the speed anchor used to time the authors' PyTorch
code: R = E = 1024, 2048-d features, 8 heads, 6 refiner layers, vocabulary 9,487 + 1, default initialisation;
10 images x 36 regions (|N(0, 1)| features, seed 20190), 5 captions of 16 random words per image (seed 777).

* ``xe``: forward with teacher forcing, label smoothing 0.2, backward, clipping by value 0.1, Adam (lr 2e-4);
  built as the trainer builds its step (``aoanet.train.optim.build_optimizer``, ``AoAModel.forward``).
* ``scst``: greedy baseline (eval mode) + 5 samples per image (train mode) of at most 20 words, CIDEr-D reward
  (document frequencies of the 10 images' references and 490 more random ones), backward, clipping, Adam
  (lr 2e-5).
* ``greedy``, ``beam2``, ``beam3``: ``AoAModel.decode`` of the 10 images, max length 20, eval mode, no grad.

Each measure runs in a fresh process (peak memory is per process): 2 warm-up and 5 timed iterations, the
median reported, with the step's matmul FLOPs counted from the shapes (encoder, every decoder row-step run;
backward 2x forward except the gradients nobody needs), the achieved GFLOP/s and its fraction of this machine's
Paddle matmul rate (the best of the step's large products and a square one, probed in the same process just
before each timed iteration; the median of the per-iteration fractions).

``--authors CMD`` runs the authors' side in interleaved rounds: per round and measure, CMD (with ``{measure}``
replaced) and this project's worker one after the other (the order alternating between rounds); CMD must print
a JSON line with ``median_s``, ``times_s`` and ``peak_rss_mb`` (the anchor harness does). Ratios are taken per
round, so that a change of the machine's load between rounds does not bias them, and also between each side's
fastest iteration over all rounds ("best-of": each side's speed when the shared machine was quiet).
``--variants`` measures this project in several settings, each against the first: ``default`` (as shipped),
``mkl-none`` (``MKL_DEBUG_CPU_TYPE`` set empty: no override, MKL picks its own path), ``mkl-5`` (forced AVX2
path), ``glibc-malloc`` (without ``aoanet.cpu.configure_allocator``), ``strided`` (Paddle's strided views on,
its default: ``FLAGS_use_stride_kernel=1``), ``before`` (the step as it was before docs/benchmarks.md's
"Training speed": autograd through the per-step decoder, plain autograd Linear/LayerNorm, Paddle's
ClipGradByValue, one Adam kernel per parameter, glibc's malloc defaults, strided views).
Writes artifacts/bench/train.json.

    python scripts/bench_train.py [--measures xe,scst,greedy,beam2,beam3] [--rounds 2]
        [--authors "/path/python /path/authors_bench.py {measure}" --authors-cwd /path/AoANet]
        [--variants default,mkl-none,before]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
V, F, R, E, HEADS, LAYERS = 9487, 2048, 1024, 1024, 8, 6
IMAGES, SPI, REGIONS, WORDS, MAX_LEN = 10, 5, 36, 16, 20
WARMUP, ITERS = 2, 5
MEASURES = ("xe", "scst", "greedy", "beam2", "beam3")
TARGETS = {"xe": 2.0, "scst": 1.5, "greedy": 1.5, "beam2": 1.5, "beam3": 1.5}  # speed-up over the authors' code
XE_FRACTION_TARGET = 0.40


# ----------------------------------------------------------------------------------------------- the work
def features(n_images=IMAGES):
    rng = np.random.default_rng(20190)
    return np.abs(rng.standard_normal((50, REGIONS, F))).astype(np.float32)[:n_images].copy()


def labels():
    """[50, 18]: column 0 BOS, 16 random words, a final 0; every caption is 16 words long."""
    rng = np.random.default_rng(777)
    lab = np.zeros((IMAGES * SPI, WORDS + 2), np.int64)
    lab[:, 1 : WORDS + 1] = rng.integers(1, V + 1, (IMAGES * SPI, WORDS))
    gts = [lab[i * SPI : (i + 1) * SPI, 1 : WORDS + 1].copy() for i in range(IMAGES)]
    return lab, np.ones_like(lab, dtype=np.float32), gts


def df_corpus(gts):
    rng = np.random.default_rng(4242)
    extra = [rng.integers(1, V + 1, (SPI, WORDS)) for _ in range(490)]
    return [[tuple(int(x) for x in r) for r in refs] for refs in list(gts) + extra]


# ----------------------------------------------------------------------------------------------- FLOPs
def encoder_flops(images: int, backward: bool) -> float:
    """Matmul FLOPs of the encoder on ``images`` x 36 regions; backward: weight and input gradients (none for
    the features)."""
    n = REGIONS
    linear = n * F * R + LAYERS * (3 * n * R * R + n * (2 * R) ** 2) + n * R * 2 * R
    attention = LAYERS * 2 * n * n * R
    if not backward:
        return 2.0 * images * (linear + attention)
    return 2.0 * images * (2 * linear - n * F * R + 2 * attention)


def decoder_flops(row_steps: int, backward: bool) -> float:
    """Matmul FLOPs of ``row_steps`` decoder row-steps: the word's share of the LSTM gates, the recurrent
    product, query, attention over the regions, AoA and the output layer; backward 2x (input and weight
    gradients of each, the word embeddings' included)."""
    macs = E * 4 * R + 2 * R * 4 * R + R * R + 2 * REGIONS * R + (2 * R) ** 2 + R * (V + 1)
    return 2.0 * macs * row_steps * (2 if backward else 1)


def steps_run(seqs) -> int:
    """Decoder steps a batch ran: until every row emitted EOS (0), at most MAX_LEN."""
    seqs = np.asarray(seqs)
    ended = (seqs == 0).any(axis=1)
    if not ended.all():
        return seqs.shape[1]
    return int((seqs == 0).argmax(axis=1).max()) + 1


def step_flops(measure: str, info: dict, encoder_rows: int) -> float:
    """FLOPs of one iteration; ``encoder_rows`` = images through the encoder (this project 10, the authors 50:
    their loader repeats each image 5x before the encoder)."""
    if measure == "xe":
        steps = WORDS + 1
        return (encoder_flops(encoder_rows, False) + encoder_flops(encoder_rows, True)
                + decoder_flops(IMAGES * SPI * steps, False) + decoder_flops(IMAGES * SPI * steps, True))
    if measure == "scst":
        greedy_rows = encoder_rows  # the authors' greedy baseline runs on the repeated rows too
        return (encoder_flops(encoder_rows, False) + decoder_flops(greedy_rows * info["greedy_steps"], False)
                + encoder_flops(encoder_rows, False) + encoder_flops(encoder_rows, True)
                + decoder_flops(IMAGES * SPI * info["sample_steps"], False)
                + decoder_flops(IMAGES * SPI * info["sample_steps"], True))
    return encoder_flops(IMAGES, False) + decoder_flops(info["decoder_row_steps"], False)


# ----------------------------------------------------------------------------------------------- the machine
def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            info["model"] = value
        elif key == "vendor_id":
            info["vendor"] = value
        elif key in ("cpu family", "model") and key not in info:
            info[key] = value
        elif key == "flags":
            flags = set(value.split())
            info["flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
            break
    return info


MATMUL_SHAPES = {"850x1024x9488": (850, 1024, 9488), "850x2048x4096": (850, 2048, 4096),
                 "2048x2048x2048": (2048, 2048, 2048)}


class MatmulRate:
    """This machine's Paddle float32 matmul rate, from the step's large shapes (its output layer over all time
    steps, its batched gates) and a square one: the best GFLOP/s of each, probed between the timed iterations
    so that the rate and the step see the same load."""

    def __init__(self, paddle):
        self.paddle = paddle
        self.operands = {name: (paddle.randn([m, k]), paddle.randn([k, n]))
                         for name, (m, k, n) in MATMUL_SHAPES.items()}
        self.best = dict.fromkeys(MATMUL_SHAPES, 0.0)
        self.probes = []  # the best of each probe, one per timed iteration
        self.faults = 0

    def probe(self) -> float:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        best = 0.0
        for name, (a, b) in self.operands.items():
            m, k, n = MATMUL_SHAPES[name]
            self.paddle.matmul(a, b).numpy()
            rate = 2.0 * m * k * n / _timed(lambda a=a, b=b: self.paddle.matmul(a, b).numpy()) / 1e9
            self.best[name] = max(self.best[name], rate)
            best = max(best, rate)
        self.probes.append(best)
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # not the step's
        return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------- one measure
VARIANTS = ("default", "mkl-none", "mkl-5", "glibc-malloc", "strided", "before")


def worker(measure: str, threads: int, iters: int, variant: str = "default") -> dict:
    from aoanet.cpu import configure_allocator, configure_math_library

    configure_math_library()  # before Paddle is imported (leaves a value set by the caller alone)
    allocator = {} if variant in ("glibc-malloc", "before") else configure_allocator()  # as the commands do
    import paddle

    from aoanet.config import TrainConfig
    from aoanet.model import build_model
    from aoanet.train.losses import language_model_loss, reward_loss
    from aoanet.train.optim import build_optimizer
    from aoanet.train.trainer import set_threads

    set_threads(threads)
    paddle.seed(0)
    np.random.seed(0)
    model = build_model(V)
    feats = paddle.to_tensor(features())
    masks = paddle.ones([IMAGES, REGIONS], dtype="float32")
    lab, lmask, gts = labels()
    labels_t, lmask_t = paddle.to_tensor(lab), paddle.to_tensor(lmask)
    info: dict = {}
    phases: dict = {}

    def phase(name, t0):
        t = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + (t - t0)
        return t

    forward, sample = model.__call__, model.sample
    if variant == "before":
        from aoanet.model import layers

        layers.fast_backward = lambda training: False  # plain autograd Linear and LayerNorm
        forward, sample = model.forward_stepwise, model.sample_stepwise
    if measure in ("xe", "scst"):
        lr = 2e-4 if measure == "xe" else 2e-5
        opt = build_optimizer(TrainConfig(learning_rate=lr, grad_clip=0.1), model.parameters())
        if variant == "before":
            opt = paddle.optimizer.Adam(learning_rate=lr, parameters=model.parameters(),
                                        grad_clip=paddle.nn.ClipGradByValue(0.1))
        model.train()
    if measure == "xe":

        def step():
            t = time.perf_counter()
            logprobs = forward(feats, masks, labels_t, seq_per_img=SPI)
            loss = language_model_loss(logprobs, labels_t[:, 1:], lmask_t[:, 1:], 0.2)
            float(loss)
            t = phase("forward", t)
            loss.backward()
            t = phase("backward", t)
            opt.step()
            opt.clear_grad()
            phase("optimizer", t)

    elif measure == "scst":
        from aoanet.metrics.cider import CiderD
        from aoanet.train.scst import self_critical_rewards

        scorer = CiderD.from_corpus(df_corpus(gts))

        def step():
            t = time.perf_counter()
            model.eval()
            greedy = model.decode(feats, masks, beam_size=1, max_length=MAX_LEN).seqs
            model.train()
            t = phase("greedy", t)
            seqs, logps = sample(feats, masks, sample_n=SPI, max_length=MAX_LEN)
            t = phase("sample", t)
            rewards, _ = self_critical_rewards(scorer, seqs.numpy(), greedy, gts, SPI)
            t = phase("reward", t)
            loss = reward_loss(logps, seqs, rewards)
            loss.backward()
            t = phase("backward", t)
            opt.step()
            opt.clear_grad()
            phase("optimizer", t)
            info["greedy_steps"] = steps_run(greedy)
            info["sample_steps"] = steps_run(seqs.numpy())

    else:
        beam = {"greedy": 1, "beam2": 2, "beam3": 3}[measure]
        model.eval()
        from aoanet.model import aoa

        counted = {"rows": 0}

        def counting(inner, tokens_at):
            def step(*a, **k):
                counted["rows"] += int(a[tokens_at].shape[0])
                return inner(*a, **k)
            return step

        # decode runs InferenceStep in eval mode (model._step otherwise): count the rows either takes
        model._step = counting(model._step, 0)
        aoa.InferenceStep.__call__ = counting(aoa.InferenceStep.__call__, 1)  # after self

        def step():
            t = time.perf_counter()
            counted["rows"] = 0
            with paddle.no_grad():
                res = model.decode(feats, None, beam_size=beam, max_length=MAX_LEN)
            phase("decode", t)
            info["decoder_row_steps"] = counted["rows"]
            info["caption_len_mean"] = float((res.seqs > 0).sum(1).mean())

    rate = MatmulRate(paddle)
    for _ in range(WARMUP):
        step()
    phases.clear()
    times, fractions = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(iters):
        probe = rate.probe()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        fractions.append(step_flops(measure, info, IMAGES) / times[-1] / 1e9 / probe)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults - rate.faults
    median = statistics.median(times)
    flops = step_flops(measure, info, IMAGES)
    total = sum(phases.values())
    return {
        "impl": "paddle",
        "measure": measure,
        "median_s": median,
        "times_s": times,
        "images_per_s": IMAGES / median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "page_faults_per_iter": faults / iters,
        "phases": {k: v / total for k, v in phases.items()},
        "flops": flops,
        "gflops_per_s": flops / median / 1e9,
        "matmul_gflops_per_s": {**rate.best, "per_iteration": rate.probes, "median": statistics.median(rate.probes)},
        # per timed iteration: the step's GFLOP/s over the matmul rate probed just before it
        "fraction_of_matmul_rate": statistics.median(fractions),
        "fractions_per_iteration": fractions,
        "variant": variant,
        "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE"),
        "FLAGS_use_stride_kernel": paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"],
        "allocator": allocator,
        "paddle": paddle.__version__,
        **info,
    }


# ----------------------------------------------------------------------------------------------- the driver
def run_json(cmd, cwd=None, env=None) -> dict:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def ours(measure, args, variant: str) -> dict:
    env = dict(os.environ)
    env.pop("MKL_DEBUG_CPU_TYPE", None)  # aoanet.cpu decides
    if variant == "mkl-none":
        env["MKL_DEBUG_CPU_TYPE"] = ""  # set, so aoanet.cpu leaves it; empty, so MKL picks its own path
    elif variant == "mkl-5":
        env["MKL_DEBUG_CPU_TYPE"] = "5"
    env.pop("FLAGS_use_stride_kernel", None)
    if variant in ("strided", "before"):
        env["FLAGS_use_stride_kernel"] = "1"
    cmd = [sys.executable, __file__, "--worker", measure, "--variant", variant, "--threads", str(args.threads),
           "--iters", str(args.iters)]
    return run_json(cmd, env=env)


def authors(measure, args) -> dict:
    env = dict(os.environ, THREADS=str(args.threads or os.cpu_count()))
    cmd = shlex.split(args.authors.replace("{measure}", measure))
    out = run_json(cmd, cwd=args.authors_cwd, env=env)
    encoder_rows = out.get("encoder_rows", IMAGES)
    if measure in ("xe", "scst"):
        info = {"greedy_steps": MAX_LEN, "sample_steps": MAX_LEN}  # random weights: no EOS within 20 words
        out["flops"] = step_flops(measure, info, encoder_rows)
    else:
        out["flops"] = step_flops(measure, {"decoder_row_steps": int(out.get("decoder_rows_per_iter", 0))}, IMAGES)
    out["gflops_per_s"] = out["flops"] / out["median_s"] / 1e9
    return out


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measures", default=",".join(MEASURES))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--iters", type=int, default=ITERS)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--authors", default=None, help="command timing the authors' code, with {measure}")
    ap.add_argument("--authors-cwd", default=None)
    ap.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "train.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.iters, args.variant)), flush=True)
        return 0

    measures = [m for m in args.measures.split(",") if m]
    unknown = set(measures) - set(MEASURES)
    if unknown:
        ap.error(f"unknown measure(s) {sorted(unknown)}; known: {', '.join(MEASURES)}")
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(set(variants) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    runs = {m: [] for m in measures}
    report = {"cpu": cpu_info(), "threads": args.threads or os.cpu_count(), "load_average_before": load(),
              "work": f"{IMAGES} images x {REGIONS} regions x {F}; {SPI} captions of {WORDS} words per image; "
                      f"V={V}; R=E={R}; {LAYERS} refiner layers; max length {MAX_LEN}",
              "iterations": {"warmup": WARMUP, "timed": args.iters}, "rounds": args.rounds}
    for rnd in range(args.rounds):
        for measure in measures:
            entry = {"round": rnd, "load_average": load()}
            sides = ["authors", "ours"] if rnd % 2 == 0 else ["ours", "authors"]
            for side in sides:
                if side == "authors" and args.authors:
                    entry["authors"] = authors(measure, args)
                    print(f"round {rnd} {measure:6s} authors  {entry['authors']['median_s']:8.3f} s", flush=True)
                elif side == "ours":
                    for variant in variants:
                        r = ours(measure, args, variant)
                        entry[f"ours[{variant}]"] = r
                        print(f"round {rnd} {measure:6s} paddle[{variant}] {r['median_s']:8.3f} s  "
                              f"{r['gflops_per_s']:6.1f} GFLOP/s = {r['fraction_of_matmul_rate']:.0%} of matmul "
                              f"({r['matmul_gflops_per_s']['median']:.0f})", flush=True)
            runs[measure].append(entry)
    report["load_average_after"] = load()
    report["runs"] = runs
    report["summary"] = summarize(runs, variants)
    print_summary(report["summary"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def summarize(runs: dict, variants) -> dict:
    summary = {}
    for measure, entries in runs.items():
        s = {}
        for variant in variants:
            key = f"ours[{variant}]"
            mine = [e[key] for e in entries]
            s[key] = {
                "median_s": statistics.median(r["median_s"] for r in mine),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                "gflops_per_s": statistics.median(r["gflops_per_s"] for r in mine),
                "fraction_of_matmul_rate": statistics.median(r["fraction_of_matmul_rate"] for r in mine),
                "flops": mine[0]["flops"],
            }
            s[key]["best_s"] = min(min(r["times_s"]) for r in mine)
            if all("authors" in e for e in entries):
                ratios = [e["authors"]["median_s"] / e[key]["median_s"] for e in entries]
                # each side's fastest iteration over all rounds: its speed when the shared machine was quiet
                best = min(min(e["authors"]["times_s"]) for e in entries) / s[key]["best_s"]
                s[key]["speedup_vs_authors"] = {"median": statistics.median(ratios), "per_round": ratios,
                                                "best_of": best, "target": TARGETS[measure]}
                s[key]["peak_rss_vs_authors"] = (max(e[key]["peak_rss_mb"] for e in entries)
                                                 / max(e["authors"]["peak_rss_mb"] for e in entries))
        if all("authors" in e for e in entries):
            a = [e["authors"] for e in entries]
            s["authors"] = {"median_s": statistics.median(r["median_s"] for r in a),
                            "best_s": min(min(r["times_s"]) for r in a),
                            "peak_rss_mb": max(r["peak_rss_mb"] for r in a), "flops": a[0]["flops"],
                            "gflops_per_s": statistics.median(r["gflops_per_s"] for r in a)}
        if len(variants) > 1:
            base = f"ours[{variants[0]}]"
            for variant in variants[1:]:
                # how much faster the first setting (as shipped) is than this one, per round
                ratios = [e[f"ours[{variant}]"]["median_s"] / e[base]["median_s"] for e in entries]
                s[f"ours[{variant}]"][f"{base}_speedup_over_this"] = {
                    "median": statistics.median(ratios), "per_round": ratios,
                    "best_of": s[f"ours[{variant}]"]["best_s"] / s[base]["best_s"]}
        summary[measure] = s
    return summary


def print_summary(summary: dict):
    print(f"\n{'measure':8s} {'variant':18s} {'s/iter':>8s} {'best s':>8s} {'GFLOP/s':>8s} {'matmul%':>8s} "
          f"{'peak MB':>8s} {'vs authors (rounds / best-of)':>30s}")
    for measure, s in summary.items():
        if "authors" in s:
            a = s["authors"]
            print(f"{measure:8s} {'authors':18s} {a['median_s']:8.3f} {a['best_s']:8.3f} {a['gflops_per_s']:8.1f} "
                  f"{'':>8s} {a['peak_rss_mb']:8.0f}")
        for key, r in s.items():
            if key == "authors":
                continue
            sp = r.get("speedup_vs_authors")
            versus = f"{sp['median']:.2f}x / {sp['best_of']:.2f}x" if sp else ""
            print(f"{measure:8s} {key:18s} {r['median_s']:8.3f} {r['best_s']:8.3f} {r['gflops_per_s']:8.1f} "
                  f"{r['fraction_of_matmul_rate']:8.0%} {r['peak_rss_mb']:8.0f} {versus:>30s}")


if __name__ == "__main__":
    sys.exit(main())
