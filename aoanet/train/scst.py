"""Self-critical rewards (docs/model.md, "SCST reward"): CIDEr-D of each sample minus a baseline, in the
reference's token-id form."""

from __future__ import annotations

import numpy as np


def ids_until_eos(row) -> tuple[int, ...]:
    """Token ids up to and including the first 0 (kept, like the reference's array_to_str); all ids if none."""
    row = np.asarray(row)
    zeros = np.flatnonzero(row == 0)
    end = int(zeros[0]) + 1 if zeros.size else len(row)
    return tuple(int(x) for x in row[:end])


def self_critical_rewards(
    scorer, samples, greedy, gts, sample_n: int, baseline: str = "greedy", weight: float = 1.0
):
    """Per-sample rewards [B*sample_n] and a dict of averages.

    samples: int [B*sample_n, T] (image-major); greedy: int [B, T] or None for the new self-critical baseline
    (the mean score of the other samples of the same image); gts: B arrays of label rows (the references).
    """
    n_img = len(gts)
    if samples.shape[0] != n_img * sample_n:
        raise ValueError(f"{samples.shape[0]} samples for {n_img} images x sample_n={sample_n}")
    refs = [[ids_until_eos(r) for r in np.asarray(g)] for g in gts]
    cands = [ids_until_eos(r) for r in samples]
    cand_refs = [refs[i // sample_n] for i in range(len(cands))]
    if baseline == "greedy":
        if greedy is None:
            raise ValueError("the greedy baseline needs greedy captions")
        cands += [ids_until_eos(r) for r in greedy]
        cand_refs += refs
    scores = np.asarray(scorer(cands, cand_refs), dtype=np.float64) * weight
    sample_scores = scores[: n_img * sample_n].reshape(n_img, sample_n)
    if baseline == "greedy":
        base = np.repeat(scores[n_img * sample_n :].reshape(n_img, 1), sample_n, axis=1)
    else:
        base = (sample_scores.sum(1, keepdims=True) - sample_scores) / (sample_n - 1)
    rewards = (sample_scores - base).reshape(-1)
    info = {
        "reward": float(rewards.mean()),
        "sample_cider": float(sample_scores.mean()),
        "baseline_cider": float(base.mean()),
    }
    return rewards, info
