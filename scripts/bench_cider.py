"""Benchmark: aoanet.metrics.cider.CiderD against a straightforward per-caption CIDEr-D, side by side.

Workload (real COCO captions, captions_val2017.json): for each of the 5,000 images, its first 5 captions are the
candidates and all of its captions (5-7) the references -- 25,000 candidates, 5 per image, like SCST's 5 samples
per image. Document frequencies come from the same references (corpus mode). Also timed: SCST-sized calls of 10
images x (5 samples + 1 greedy) = 60 candidates.

    python scripts/bench_cider.py [--captions PATH] [--out artifacts/bench/cider.json] [--repeat 3]

The straightforward implementation below is also the independent reference of tests/test_cider.py: it follows
the formula caption by caption with Python dicts and shares no code with aoanet.metrics.cider.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "coco" / "captions_val2017.json"
DEFAULT_OUT = REPO / "artifacts" / "bench" / "cider.json"


# ---- the straightforward implementation (independent of aoanet.metrics.cider) ---------------------------------


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


# ---- benchmark ------------------------------------------------------------------------------------------------


def load_references(path: Path) -> list[list[list[str]]]:
    data = json.loads(path.read_text())
    by_image: dict[int, list] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(simple_tokenize(ann["caption"]))
    return [by_image[i] for i in sorted(by_image)]


def best_of(repeat: int, fn):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--repeat", type=int, default=3, help="fast timings: best of N")
    args = ap.parse_args(argv)
    if not args.captions.exists():
        print(f"captions not found: {args.captions}", file=sys.stderr)
        return 2

    import numpy as np

    sys.path.insert(0, str(REPO))
    from aoanet.metrics.cider import CiderD

    references = load_references(args.captions)
    candidates = [c for refs in references for c in refs[:5]]
    image_of = [b for b, refs in enumerate(references) for _ in refs[:5]]
    refs_of = [references[b] for b in image_of]
    n = len(candidates)

    t0 = time.perf_counter()
    scorer = CiderD.from_corpus(references)
    setup = time.perf_counter() - t0
    t_groups, fast = best_of(args.repeat, lambda: scorer.score_groups(candidates, references, image_of))
    t_call, fast_call = best_of(args.repeat, lambda: scorer(candidates, refs_of))

    df = straightforward_df(references)
    t0 = time.perf_counter()
    slow = np.array([straightforward_cider_d(c, r, df, len(references)) for c, r in zip(candidates, refs_of,
                                                                                      strict=True)])
    t_slow = time.perf_counter() - t0
    max_diff = float(max(np.abs(fast - slow).max(), np.abs(fast_call - slow).max()))

    # SCST-sized calls: 10 images x (5 samples + 1 greedy), token lists of words
    batches = [list(range(b, b + 10)) for b in range(0, 5000, 10)][:100]

    def scst_fast():
        for imgs in batches:
            cands = [c for b in imgs for c in references[b][:5] + references[b][:1]]
            scorer.score_groups(cands, [references[b] for b in imgs], 6)

    def scst_slow():
        for imgs in batches:
            for b in imgs:
                for c in references[b][:5] + references[b][:1]:
                    straightforward_cider_d(c, references[b], df, len(references))

    t_scst_fast, _ = best_of(args.repeat, scst_fast)
    t_scst_slow, _ = best_of(1, scst_slow)

    result = {
        "workload": {
            "captions_file": args.captions.name,
            "images": len(references),
            "candidates": n,
            "candidates_per_image": 5,
            "references_per_candidate_mean": round(sum(map(len, refs_of)) / n, 3),
            "document_frequency": "corpus (from the same references)",
            "ngrams_in_df": scorer.num_ngrams,
        },
        "straightforward_s": round(t_slow, 4),
        "cider_d_score_groups_s": round(t_groups, 4),
        "cider_d_call_s": round(t_call, 4),
        "from_corpus_setup_s": round(setup, 4),
        "captions_per_s": {
            "straightforward": round(n / t_slow),
            "score_groups": round(n / t_groups),
            "call": round(n / t_call),
        },
        "speedup_score_groups": round(t_slow / t_groups, 2),
        "speedup_call": round(t_slow / t_call, 2),
        "max_abs_diff": max_diff,
        "scst_batch": {
            "candidates_per_call": 60,
            "calls": len(batches),
            "straightforward_ms_per_call": round(1e3 * t_scst_slow / len(batches), 3),
            "cider_d_ms_per_call": round(1e3 * t_scst_fast / len(batches), 3),
            "speedup": round(t_scst_slow / t_scst_fast, 2),
        },
        "timing": f"fast: best of {args.repeat}; straightforward: one run",
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "processor": platform.processor() or platform.machine()},
    }

    rows = [
        ("straightforward (per caption)", t_slow, n / t_slow, 1.0),
        ("CiderD.score_groups", t_groups, n / t_groups, t_slow / t_groups),
        ("CiderD.__call__", t_call, n / t_call, t_slow / t_call),
    ]
    print(f"CIDEr-D, {n} candidates x {result['workload']['references_per_candidate_mean']} refs "
          f"({len(references)} images, corpus df)")
    print(f"{'implementation':32s} {'seconds':>9s} {'captions/s':>12s} {'speedup':>9s}")
    for name, sec, rate, speed in rows:
        print(f"{name:32s} {sec:9.3f} {rate:12.0f} {speed:8.1f}x")
    print(f"max |difference| = {max_diff:.3g}")
    s = result["scst_batch"]
    print(f"SCST-sized call (60 candidates, 10 images): straightforward {s['straightforward_ms_per_call']:.2f} ms, "
          f"CiderD {s['cider_d_ms_per_call']:.2f} ms ({s['speedup']:.1f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
