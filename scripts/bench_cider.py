"""Benchmark: aoanet.metrics.cider.CiderD against a straightforward per-caption CIDEr-D, side by side.

Workload (real COCO captions; ``--captions`` a COCO caption file, e.g. the official captions_val2017.json, default
the 500-image subset of tests/data): for each image, its first 5 captions are the candidates and all of its
captions the references (for the full val2017 file: 25,000 candidates, 5 per image), like SCST's 5
samples per image. Document frequencies come from the same references (corpus mode). Run twice: with the
captions as token ids ending in the EOS 0 (what the SCST trainer passes; the headline number) and as words.
Also timed: SCST-sized calls of 10 images x (5 samples + 1 greedy) = 60 candidates.

    python scripts/bench_cider.py [--captions PATH] [--out artifacts/bench/cider.json] [--repeat 3]

The straightforward implementation below is also the independent reference of tests/test_cider.py: it follows
the formula caption by caption with Python dicts and shares no code with aoanet.metrics.cider.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO / "tests" / "data" / "captions_val2017_500.json"
DEFAULT_OUT = REPO / "artifacts" / "bench" / "cider.json"


# ---- the straightforward implementation (independent of aoanet.metrics.cider) ------------------------------


def simple_tokenize(caption: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace."""
    return re.sub(r"[^a-z0-9 ]+", " ", caption.lower()).split()


def ngram_counts(tokens, n: int = 4) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            g = tuple(tokens[i : i + k])
            counts[g] = counts.get(g, 0) + 1
    return counts


def straightforward_df(references) -> dict[tuple, int]:
    """Document frequency: one count per image for every n-gram of any of its references."""
    df: dict[tuple, int] = defaultdict(int)
    for refs in references:
        for g in {g for r in refs for g in ngram_counts(list(r))}:
            df[g] += 1
    return dict(df)


def straightforward_cider_d(candidate, refs, df, ref_len, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of one candidate against its references, recomputing every vector (as the reference does)."""
    log_ref_len = math.log(float(ref_len))

    def vectorise(tokens):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in ngram_counts(list(tokens), n).items():
            w = float(tf) * (log_ref_len - math.log(max(1.0, float(df.get(g, 0.0)))))
            vec[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
            if len(g) == 2:  # the reference's "length": the sum of the bigram counts
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    vec_c, norm_c, len_c = vectorise(candidate)
    total = 0.0
    for ref in refs:
        vec_r, norm_r, len_r = vectorise(ref)
        penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
        for k in range(n):
            s = 0.0
            for g, w in vec_c[k].items():
                r = vec_r[k].get(g, 0.0)
                s += min(w, r) * r
            if norm_c[k] != 0 and norm_r[k] != 0:
                s /= norm_c[k] * norm_r[k]
            total += s * penalty
    return total / n / len(refs) * 10.0


# ---- benchmark ---------------------------------------------------------------------------------------------


def load_references(path: Path) -> list[list[list[str]]]:
    data = json.loads(path.read_text())
    by_image: dict[int, list] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(simple_tokenize(ann["caption"]))
    return [by_image[i] for i in sorted(by_image)]


class Timing:
    """Best of N runs, in process CPU time (used for the speedups: robust to other jobs on a shared machine)
    and in wall clock time."""

    def __init__(self, repeat: int, fn):
        self.cpu, self.wall, self.out = math.inf, math.inf, None
        for _ in range(repeat):
            c, w = time.process_time(), time.perf_counter()
            self.out = fn()
            self.cpu = min(self.cpu, time.process_time() - c)
            self.wall = min(self.wall, time.perf_counter() - w)


def to_token_ids(references):
    """Words -> ids 1..V (every word of the file), each caption ending with the EOS 0, as the trainer passes
    them (a caption cut after its first 0, the 0 kept)."""
    vocab: dict[str, int] = {}
    return [[tuple(vocab.setdefault(w, len(vocab) + 1) for w in ref) + (0,) for ref in refs]
            for refs in references]


def run_workload(name, references, repeat, CiderD, np):
    candidates = [c for refs in references for c in refs[:5]]
    image_of = [b for b, refs in enumerate(references) for _ in refs[:5]]
    refs_of = [references[b] for b in image_of]
    n = len(candidates)
    t0 = time.perf_counter()
    scorer = CiderD.from_corpus(references)
    setup = time.perf_counter() - t0
    groups = Timing(repeat, lambda: scorer.score_groups(candidates, references, image_of))
    call = Timing(repeat, lambda: scorer(candidates, refs_of))
    df = straightforward_df(references)
    slow = Timing(1, lambda: np.array([straightforward_cider_d(c, r, df, len(references))
                                       for c, r in zip(candidates, refs_of, strict=True)]))
    max_diff = float(max(np.abs(groups.out - slow.out).max(), np.abs(call.out - slow.out).max()))

    # SCST-sized calls: 10 images x (5 samples + 1 greedy) = 60 candidates
    batches = [list(range(b, b + 10)) for b in range(0, len(references), 10)][:100]

    def scst_fast():
        for imgs in batches:
            cands = [c for b in imgs for c in list(references[b][:5]) + [references[b][0]]]
            scorer.score_groups(cands, [references[b] for b in imgs], 6)

    def scst_slow():
        for imgs in batches:
            for b in imgs:
                for c in list(references[b][:5]) + [references[b][0]]:
                    straightforward_cider_d(c, references[b], df, len(references))

    scst_f, scst_s = Timing(repeat, scst_fast), Timing(1, scst_slow)
    return {
        "tokens": name,
        "candidates": n,
        "references_per_candidate_mean": round(sum(map(len, refs_of)) / n, 3),
        "ngrams_in_df": scorer.num_ngrams,
        "from_corpus_setup_s": round(setup, 4),
        "cpu_s": {"straightforward": round(slow.cpu, 4), "score_groups": round(groups.cpu, 4),
                  "call": round(call.cpu, 4)},
        "wall_s": {"straightforward": round(slow.wall, 4), "score_groups": round(groups.wall, 4),
                   "call": round(call.wall, 4)},
        "captions_per_s_cpu": {"straightforward": round(n / slow.cpu), "score_groups": round(n / groups.cpu),
                               "call": round(n / call.cpu)},
        "speedup_score_groups": round(slow.cpu / groups.cpu, 2),
        "speedup_call": round(slow.cpu / call.cpu, 2),
        "speedup_score_groups_wall": round(slow.wall / groups.wall, 2),
        "max_abs_diff": max_diff,
        "scst_sized_call": {
            "candidates_per_call": 60,
            "calls": len(batches),
            "straightforward_ms_per_call_cpu": round(1e3 * scst_s.cpu / len(batches), 3),
            "cider_d_ms_per_call_cpu": round(1e3 * scst_f.cpu / len(batches), 3),
            "cider_d_ms_per_call_wall": round(1e3 * scst_f.wall / len(batches), 3),
            "speedup": round(scst_s.cpu / scst_f.cpu, 2),
        },
    }


def scst_with_training_sized_df(references_ids, repeat, CiderD, np):
    """SCST-sized calls against a document-frequency table of training size (the real coco-train df has
    ~2-3M n-grams; this one is synthetic: 2.5M random n-grams over a 9,487-token vocabulary)."""
    rng = np.random.default_rng(0)
    df: dict[tuple, int] = {}
    for n, count in ((1, 9487), (2, 300_000), (3, 900_000), (4, 1_290_513)):
        grams = rng.integers(1, 9488, (count, n)).tolist()
        df.update(zip(map(tuple, grams), rng.integers(1, 5000, count).tolist(), strict=True))
    t0 = time.perf_counter()
    scorer = CiderD(df, 113287)
    setup = time.perf_counter() - t0
    batches = [references_ids[b : b + 10] for b in range(0, 1000, 10)]

    def run():
        for refs in batches:
            scorer.score_groups([c for r in refs for c in list(r[:5]) + [r[0]]], refs, 6)

    t = Timing(repeat, run)
    return {"ngrams_in_df": len(df), "construct_s": round(setup, 3), "calls": len(batches),
            "candidates_per_call": 60, "cider_d_ms_per_call_cpu": round(1e3 * t.cpu / len(batches), 3),
            "cider_d_ms_per_call_wall": round(1e3 * t.wall / len(batches), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--repeat", type=int, default=5,
                    help="CiderD timings: best of N (the straightforward implementation: one run)")
    args = ap.parse_args(argv)
    if not args.captions.exists():
        print(f"captions not found: {args.captions}", file=sys.stderr)
        return 2

    import numpy as np

    sys.path.insert(0, str(REPO))
    from aoanet.metrics.cider import CiderD

    words = load_references(args.captions)
    results = [run_workload("token ids + EOS 0 (the SCST reward's input)", to_token_ids(words), args.repeat,
                            CiderD, np),
               run_workload("words", words, args.repeat, CiderD, np)]
    large_df = scst_with_training_sized_df(to_token_ids(words), args.repeat, CiderD, np)
    head = results[0]
    out = {
        "workload": {
            "captions_file": args.captions.name,
            "images": len(words),
            "candidates": head["candidates"],
            "candidates_per_image": 5,
            "references": "all captions of the candidate's image (the candidate included)",
            "document_frequency": "corpus mode: from the same references, ref_len = number of images",
        },
        "speedup": head["speedup_score_groups"],
        "results": results,
        "scst_sized_call_training_sized_df": large_df,
        "timing": f"side by side in one process; CiderD best of {args.repeat} runs, straightforward one run; "
                  f"speedups from process CPU time (the machine is shared), wall clock also recorded",
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "load_average_1min": round(os.getloadavg()[0], 2)},
    }
    print(f"CIDEr-D: {head['candidates']} candidates (5 per image, {len(words)} images) x "
          f"{head['references_per_candidate_mean']} references, corpus df; CPU seconds (wall in brackets)")
    print(f"{'tokens':8s} {'implementation':30s} {'cpu s':>7s} {'(wall s)':>9s} {'captions/s':>11s} "
          f"{'speedup':>8s}")
    for r, short in zip(results, ["ids+EOS", "words"], strict=True):
        for name, key in (("straightforward (per caption)", "straightforward"),
                          ("CiderD.score_groups", "score_groups"), ("CiderD.__call__", "call")):
            cpu, wall = r["cpu_s"][key], r["wall_s"][key]
            speed = r["cpu_s"]["straightforward"] / cpu
            print(f"{short:8s} {name:30s} {cpu:7.3f} {f'({wall:.3f})':>9s} {r['candidates'] / cpu:11.0f} "
                  f"{speed:7.1f}x")
        c = r["scst_sized_call"]
        slow_ms = c["straightforward_ms_per_call_cpu"]
        print(f"{short:8s} {'SCST-sized call, 60 captions':30s} {c['cider_d_ms_per_call_cpu']:5.2f}ms "
              f"{'':21s} {c['speedup']:7.1f}x  (straightforward {slow_ms:.2f} ms)")
        print(f"{short:8s} max |difference| = {r['max_abs_diff']:.3g}")
    print(f"SCST-sized call with a training-sized df ({large_df['ngrams_in_df']:,} n-grams, synthetic): "
          f"{large_df['cider_d_ms_per_call_cpu']:.2f} ms CPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
