"""aoanet_runtime.beam against an independent, per-image transcription of the authors' beam search.

The reference below (``ref_beam_search``) follows the authors' ``models/CaptionModel.py``
beam_search/beam_step one image at a time, with Python lists of candidate dicts, and always runs
max_length steps; ``ref_greedy`` follows ``AttModel._sample`` (greedy). The models are tiny
deterministic numpy decoders, so no Paddle is needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from aoanet_runtime.beam import TRIGRAM_PENALTY, DecodeResult, _topk, beam_search, greedy, length_penalty_fn
from aoanet_runtime.vocab import bad_ending_ids, decode_sequence

# ----------------------------------------------------------------------------------------------------
# Toy decoders


def _rowwise_matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Not a BLAS call: a row's result must not depend on how many rows are in the batch.
    return (a[:, :, None] * w[None]).sum(axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    z = logits - m
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)


class ToyRNN:
    """h' = tanh(h Wh + E[it] + f Wf); logprobs = log_softmax(h Wo + bias + eos_slope * steps * [EOS]).

    Token 0 is BOS/EOS, the last index is UNK."""

    def __init__(
        self,
        vocab1=17,
        hidden=12,
        feat=6,
        seed=0,
        scale=2.5,
        eos_bias=0.0,
        eos_slope=0.0,
        unk_bias=0.0,
        quantize=0.0,
    ):
        rng = np.random.default_rng(seed)
        self.vocab1, self.hidden, self.feat = vocab1, hidden, feat
        self.emb = rng.normal(size=(vocab1, hidden))
        self.wh = rng.normal(size=(hidden, hidden)) * 0.6
        self.wf = rng.normal(size=(feat, hidden))
        self.wo = rng.normal(size=(hidden, vocab1)) * scale
        self.bias = np.zeros(vocab1)
        self.bias[0] += eos_bias
        self.bias[-1] += unk_bias
        self.eos_slope = eos_slope  # EOS gets likelier with every token, like a captioner's
        self.quantize = quantize  # > 0: logits rounded to this grid, so that many log-probs tie exactly
        self.calls: list[int] = []

    def images(self, n, seed=1):
        return np.random.default_rng(seed).normal(size=(n, self.feat))

    def init(self, feats: np.ndarray, repeat: int = 1) -> dict:
        feats = np.repeat(feats, repeat, axis=0)
        return {"h": np.zeros((feats.shape[0], self.hidden)), "f": feats, "n": np.zeros(feats.shape[0])}

    def step(self, it: np.ndarray, ctx: dict):
        assert it.dtype == np.int64 and it.shape == (ctx["h"].shape[0],)
        self.calls.append(it.shape[0])
        h = np.tanh(_rowwise_matmul(ctx["h"], self.wh) + self.emb[it] + _rowwise_matmul(ctx["f"], self.wf))
        logits = _rowwise_matmul(h, self.wo) + self.bias
        logits[:, 0] += self.eos_slope * ctx["n"]
        if self.quantize:
            logits = np.round(logits / self.quantize) * self.quantize
        return _log_softmax(logits), {"h": h, "f": ctx["f"], "n": ctx["n"] + 1}


class Markov:
    """log p(next | previous token) from a fixed table: lets a test pick exactly what the decoder prefers."""

    def __init__(self, table: np.ndarray):
        self.table = table.astype(np.float32)

    @staticmethod
    def build(vocab1: int, prefs: dict[int, list[tuple[int, float]]]) -> Markov:
        logits = np.full((vocab1, vocab1), -4.0)
        for prev, nexts in prefs.items():
            for word, logit in nexts:
                logits[prev, word] = logit
        return Markov(_log_softmax(logits))

    def init(self, n, repeat: int = 1) -> dict:
        n = n if isinstance(n, int) else len(n)
        return {"prev": np.zeros(n * repeat, dtype=np.int64)}

    def step(self, it, ctx):
        return self.table[it], {"prev": it}


def reorder_dict(ctx: dict, index: np.ndarray) -> dict:
    # Per-image constants (``f``) are left alone: reorder stays inside an image's block.
    return {k: (v if k == "f" else v[index]) for k, v in ctx.items()}


def keep_dict(ctx: dict, index: np.ndarray) -> dict:
    return {k: v[index] for k, v in ctx.items()}


def run_beam(model: ToyRNN, feats, beam_size, **kw) -> DecodeResult:
    return beam_search(
        model.step, reorder_dict, keep_dict, model.init(feats, beam_size), len(feats), beam_size, **kw
    )


# ----------------------------------------------------------------------------------------------------
# Independent reference implementations


def _truncate(seq, lps):
    seq, lps = list(seq), list(lps)
    if 0 in seq:
        end = seq.index(0)
        seq = seq[: end + 1] + [0] * (len(seq) - end - 1)
        lps = lps[: end + 1] + [0.0] * (len(lps) - end - 1)
    return seq, lps


def _trigram_mask(history: list[int], vocab1: int) -> np.ndarray:
    """The reference's block_trigrams mask for one row: counts of earlier trigrams completing history[-2:]."""
    t = len(history)
    trigrams: dict[tuple[int, int], list[int]] = {}
    for s in range(t - 2):
        trigrams.setdefault((history[s], history[s + 1]), []).append(history[s + 2])
    mask = np.zeros(vocab1, dtype=np.float32)
    for word in trigrams.get((history[t - 2], history[t - 1]), []):
        mask[word] += 1
    return mask


def _constrain(adj: np.ndarray, histories: list[list[int]], t: int, block_trigrams, bad_ids) -> np.ndarray:
    for q, hist in enumerate(histories):
        if bad_ids is not None and t > 0 and hist[t - 1] in bad_ids:
            adj[q, 0] = -np.inf
        if block_trigrams and t >= 3:
            adj[q] = adj[q] + _trigram_mask(hist[:t], adj.shape[1]) * np.float32(TRIGRAM_PENALTY)
    return adj


def ref_beam_search(
    model,
    feat,
    beam_size,
    max_length,
    length_penalty="",
    block_trigrams=False,
    bad_ids=None,
    suppress_unk=True,
):
    """One image, the authors' beam_search/beam_step: returns all done beams sorted by p (best first)."""
    penalty = length_penalty_fn(length_penalty) or (lambda n, s: s)
    ctx = model.init(feat[None], beam_size)
    logprobs, ctx = model.step(np.zeros(beam_size, dtype=np.int64), ctx)
    beam_seq = [[0] * max_length for _ in range(beam_size)]
    beam_lps = [[0.0] * max_length for _ in range(beam_size)]
    beam_sum = [0.0] * beam_size
    done = []
    for t in range(max_length):
        adj = _constrain(logprobs.copy(), beam_seq, t, block_trigrams, bad_ids)
        if suppress_unk:
            adj[:, -1] = adj[:, -1] - np.float32(1000)
        rows = 1 if t == 0 else beam_size
        ranked = [sorted(range(adj.shape[1]), key=lambda w, q=q: (-adj[q, w], w)) for q in range(rows)]
        candidates = []
        for c in range(beam_size):
            for q in range(rows):
                word = ranked[q][c]
                candidates.append(
                    {"c": word, "q": q, "p": beam_sum[q] + float(adj[q, word]), "r": float(logprobs[q, word])}
                )
        candidates = sorted(candidates, key=lambda x: -x["p"])
        new_seq, new_lps, parents = [], [], []
        for vix in range(beam_size):
            v = candidates[vix]
            new_seq.append(beam_seq[v["q"]][:t] + [v["c"]] + [0] * (max_length - t - 1))
            new_lps.append(beam_lps[v["q"]][:t] + [v["r"]] + [0.0] * (max_length - t - 1))
            beam_sum[vix] = v["p"]
            parents.append(v["q"])
        beam_seq, beam_lps = new_seq, new_lps
        ctx = {k: v[parents] for k, v in ctx.items()}
        for vix in range(beam_size):
            if beam_seq[vix][t] == 0 or t == max_length - 1:
                seq, lps = _truncate(beam_seq[vix], beam_lps[vix])
                done.append({"seq": seq, "logps": lps, "p": penalty(t + 1, beam_sum[vix])})
                beam_sum[vix] = -1000.0
        logprobs, ctx = model.step(np.array([s[t] for s in beam_seq], dtype=np.int64), ctx)
    return sorted(done, key=lambda x: -x["p"])


def ref_greedy(model, feats, max_length, block_trigrams=False, bad_ids=None):
    ctx = model.init(feats)
    n = len(feats)
    seqs = [[0] * max_length for _ in range(n)]
    lps = [[0.0] * max_length for _ in range(n)]
    unfinished = [True] * n
    it = np.zeros(n, dtype=np.int64)
    for t in range(max_length):
        logprobs, ctx = model.step(it, ctx)
        adj = _constrain(logprobs.copy(), seqs, t, block_trigrams, bad_ids)
        words = [int(np.argmax(adj[i])) for i in range(n)]
        for i in range(n):
            if unfinished[i]:
                seqs[i][t] = words[i]
                lps[i][t] = float(logprobs[i, words[i]])
            unfinished[i] = unfinished[i] and words[i] > 0
        if not any(unfinished):
            break
        it = np.array([seqs[i][t] for i in range(n)], dtype=np.int64)
    return np.array(seqs), np.array(lps)


def assert_matches_reference(res: DecodeResult, refs: list[list[dict]]):
    for b, done in enumerate(refs):
        best = done[0]
        np.testing.assert_array_equal(res.seqs[b], best["seq"], err_msg=f"image {b}")
        np.testing.assert_allclose(res.scores[b], best["p"], rtol=0, atol=1e-6, err_msg=f"image {b}")
        np.testing.assert_allclose(res.logprobs[b], best["logps"], rtol=0, atol=1e-6, err_msg=f"image {b}")


MODELS = {
    "smooth": dict(seed=0, eos_bias=0.5),
    # EOS likelier with length, like a captioner: images finish at different steps (early stop matters).
    "peaky": dict(seed=3, scale=2.0, eos_bias=-5.0, eos_slope=1.5),
    "tied": dict(seed=5, scale=1.5, quantize=0.5),  # many exactly equal log-probs
}


# ----------------------------------------------------------------------------------------------------
# Beam search == the reference


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
@pytest.mark.parametrize("early_stop", [True, False])
def test_beam_matches_reference(model_name, beam_size, early_stop):
    model = ToyRNN(**MODELS[model_name])
    feats = model.images(6, seed=beam_size)
    max_length = 12
    refs = [ref_beam_search(model, f, beam_size, max_length) for f in feats]
    res = run_beam(model, feats, beam_size, max_length=max_length, early_stop=early_stop)
    assert res.seqs.dtype == np.int64 and res.seqs.shape == (6, max_length)
    assert res.scores.dtype == np.float64 and res.scores.shape == (6,)
    assert res.logprobs.dtype == np.float32 and res.logprobs.shape == (6, max_length)
    assert_matches_reference(res, refs)


def test_reference_cases_are_not_trivial():
    """The toy models exercise what matters: captions ending by EOS and by max_length, beam != greedy."""
    lengths, hit_max, differs = set(), 0, 0
    for name in MODELS:
        model = ToyRNN(**MODELS[name])
        feats = model.images(6, seed=3)
        res = run_beam(model, feats, 3, max_length=12)
        g = greedy(model.step, model.init(feats), 6, max_length=12)
        lengths |= {int(np.count_nonzero(s)) for s in res.seqs}
        hit_max += int(np.count_nonzero(res.seqs[:, -1]))
        differs += int(np.any(res.seqs != g.seqs, axis=1).sum())
    assert len(lengths) >= 4 and hit_max >= 1 and differs >= 3


@pytest.mark.parametrize("length_penalty", ["wu_0.7", "avg_1", "wu_1.5"])
@pytest.mark.parametrize("beam_size", [2, 4])
def test_length_penalty_matches_reference(length_penalty, beam_size):
    model = ToyRNN(**MODELS["smooth"])
    feats = model.images(5, seed=7)
    refs = [ref_beam_search(model, f, beam_size, 12, length_penalty=length_penalty) for f in feats]
    res = run_beam(model, feats, beam_size, max_length=12, length_penalty=length_penalty)
    assert_matches_reference(res, refs)
    plain = run_beam(model, feats, beam_size, max_length=12)
    assert np.any(plain.scores != res.scores)


def test_length_penalty_formulas():
    assert length_penalty_fn("") is None
    np.testing.assert_allclose(length_penalty_fn("wu_1")(4, -9.0), -9.0 / (9 / 6))
    np.testing.assert_allclose(length_penalty_fn("avg_2")(4, -9.0), -9.0 / 4)
    with pytest.raises(ValueError):
        length_penalty_fn("foo_1")


def test_all_finished_beams_match_and_caption_is_the_best():
    model = ToyRNN(**MODELS["smooth"])
    feats = model.images(4, seed=11)
    beam_size, max_length = 3, 10
    refs = [ref_beam_search(model, f, beam_size, max_length) for f in feats]
    res = run_beam(model, feats, beam_size, max_length=max_length, early_stop=False, return_done=True)
    for b, done in enumerate(refs):
        n = int(res.done_counts[b])
        assert n == len(done) >= beam_size * 1
        np.testing.assert_allclose(res.done_scores[b, :n], [d["p"] for d in done], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(res.done_seqs[b, :n], [d["seq"] for d in done])
        assert np.all(np.isneginf(res.done_scores[b, n:]))
        assert res.scores[b] == res.done_scores[b, 0] == max(res.done_scores[b, :n])
        np.testing.assert_array_equal(res.seqs[b], res.done_seqs[b, 0])


# ----------------------------------------------------------------------------------------------------
# Greedy, UNK


def test_greedy_matches_reference():
    model = ToyRNN(**MODELS["peaky"])
    feats = model.images(7, seed=2)
    seqs, lps = ref_greedy(model, feats, 15)
    for keep in (None, keep_dict):
        res = greedy(model.step, model.init(feats), 7, max_length=15, keep=keep)
        np.testing.assert_array_equal(res.seqs, seqs)
        np.testing.assert_allclose(res.logprobs, lps, rtol=0, atol=1e-7)
        np.testing.assert_allclose(res.scores, lps.sum(axis=1), rtol=0, atol=1e-5)


def test_greedy_keep_drops_finished_rows():
    model = ToyRNN(**MODELS["peaky"])
    feats = model.images(7, seed=2)
    model.calls.clear()
    res = greedy(model.step, model.init(feats), 7, max_length=15, keep=keep_dict)
    assert model.calls[0] == 7 and min(model.calls) < 7
    assert model.calls == sorted(model.calls, reverse=True)
    ended = (res.seqs == 0).any(axis=1)
    steps_per_row = np.where(ended, np.count_nonzero(res.seqs, axis=1) + 1, 15)
    assert len(model.calls) == res.n_steps == steps_per_row.max()
    assert model.calls == [int((steps_per_row > t).sum()) for t in range(res.n_steps)]


def test_search_dispatches_greedy_or_beam_with_their_own_options():
    """search: beam 1 with greedy_unk is greedy (beam-only options dropped, greedy's kept); beam 1 without it is a
    one-beam search (which suppresses UNK, unlike greedy: the model here loves UNK)."""
    from aoanet_runtime.beam import search

    model = ToyRNN(**MODELS["peaky"], unk_bias=3.0)
    feats = model.images(6, seed=3)
    beam_only = dict(length_penalty="wu_0.7", early_stop=False, suppress_unk=True)
    for block in (False, True):
        got = search(model.step, reorder_dict, keep_dict, model.init(feats), 6, 1, 15, True, None,
                     block_trigrams=block, **beam_only)
        want = greedy(model.step, model.init(feats), 6, max_length=15, keep=keep_dict, block_trigrams=block)
        np.testing.assert_array_equal(got.seqs, want.seqs)
        np.testing.assert_array_equal(got.scores, want.scores)
    assert np.any(got.seqs == model.vocab1 - 1)  # greedy emits UNK here
    one_beam = search(model.step, reorder_dict, keep_dict, model.init(feats, 1), 6, 1, 15, False, None, **beam_only)
    np.testing.assert_array_equal(one_beam.seqs, run_beam(model, feats, 1, max_length=15, **beam_only).seqs)
    assert not np.any(one_beam.seqs == model.vocab1 - 1)


def test_beam_1_equals_greedy_when_unk_is_never_argmax():
    model = ToyRNN(**MODELS["smooth"], unk_bias=-30.0)
    feats = model.images(8, seed=4)
    g = greedy(model.step, model.init(feats), 8, max_length=15)
    assert not np.any(g.seqs == model.vocab1 - 1)
    for early_stop in (True, False):
        b = run_beam(model, feats, 1, max_length=15, early_stop=early_stop)
        np.testing.assert_array_equal(b.seqs, g.seqs)
        np.testing.assert_allclose(b.scores, g.scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(b.logprobs, g.logprobs)


@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_beam_never_emits_unk_even_when_the_model_loves_it(beam_size):
    model = ToyRNN(**MODELS["smooth"], unk_bias=15.0)
    unk = model.vocab1 - 1
    feats = model.images(6, seed=9)
    g = greedy(model.step, model.init(feats), 6, max_length=12)
    assert np.mean(g.seqs == unk) > 0.5  # the model really prefers UNK
    res = run_beam(model, feats, beam_size, max_length=12)
    assert not np.any(res.seqs == unk)
    assert np.all(res.scores > -1000)
    refs = [ref_beam_search(model, f, beam_size, 12) for f in feats]
    assert_matches_reference(res, refs)
    # suppress_unk=False: UNK is allowed again.
    free = run_beam(model, feats, beam_size, max_length=12, suppress_unk=False)
    assert np.any(free.seqs == unk)
    assert_matches_reference(
        free, [ref_beam_search(model, f, beam_size, 12, suppress_unk=False) for f in feats]
    )


def test_unk_idx_selects_the_suppressed_word():
    model = ToyRNN(**MODELS["smooth"])
    feats = model.images(6, seed=9)
    res = run_beam(model, feats, 2, max_length=12)
    favourite = np.bincount(res.seqs[res.seqs > 0]).argmax()
    other = run_beam(model, feats, 2, max_length=12, unk_idx=int(favourite))
    assert not np.any(other.seqs == favourite)


# ----------------------------------------------------------------------------------------------------
# Batching, early stop, keep


def test_batch_composition_does_not_change_a_caption():
    model = ToyRNN(**MODELS["smooth"])
    feats = model.images(7, seed=21)
    full = run_beam(model, feats, 3, max_length=14)
    perm = np.array([4, 0, 6, 2, 1, 5, 3])
    shuffled = run_beam(model, feats[perm], 3, max_length=14)
    np.testing.assert_array_equal(shuffled.seqs, full.seqs[perm])
    np.testing.assert_array_equal(shuffled.scores, full.scores[perm])
    for i in (0, 3, 6):
        alone = run_beam(model, feats[i : i + 1], 3, max_length=14)
        np.testing.assert_array_equal(alone.seqs[0], full.seqs[i])
        np.testing.assert_array_equal(alone.scores[0], full.scores[i])
        np.testing.assert_array_equal(alone.logprobs[0], full.logprobs[i])


def test_early_stop_drops_complete_images_via_keep_and_changes_nothing():
    model = ToyRNN(**MODELS["peaky"])
    beam_size, n_img, max_length = 3, 8, 20
    feats = model.images(n_img, seed=5)
    kept, reorders = [], []

    def keep(ctx, index):
        m = ctx["h"].shape[0]
        assert index.dtype == np.int64 and len(index) < m and len(index) % beam_size == 0
        blocks = index.reshape(-1, beam_size)
        assert np.all(blocks == blocks[:, :1] + np.arange(beam_size)) and np.all(
            blocks[:, 0] % beam_size == 0
        )
        kept.append((m, len(index)))
        return keep_dict(ctx, index)

    def reorder(ctx, index):
        assert index.shape == (ctx["h"].shape[0],)
        np.testing.assert_array_equal(index // beam_size, np.arange(len(index)) // beam_size)
        reorders.append(len(index))
        return reorder_dict(ctx, index)

    model.calls.clear()
    fast = beam_search(
        model.step, reorder, keep, model.init(feats, beam_size), n_img, beam_size, max_length=max_length
    )
    fast_calls = list(model.calls)
    model.calls.clear()
    full = beam_search(
        model.step,
        reorder,
        keep,
        model.init(feats, beam_size),
        n_img,
        beam_size,
        max_length=max_length,
        early_stop=False,
    )
    no_keep = beam_search(
        model.step, reorder, None, model.init(feats, beam_size), n_img, beam_size, max_length=max_length
    )

    assert kept, "keep was never called"
    assert all(m > n for m, n in kept) and reorders
    assert sum(fast_calls) < 0.6 * n_img * beam_size * max_length
    assert fast.n_steps < full.n_steps == max_length
    for other in (full, no_keep):
        np.testing.assert_array_equal(fast.seqs, other.seqs)
        np.testing.assert_array_equal(fast.scores, other.scores)
        np.testing.assert_array_equal(fast.logprobs, other.logprobs)
    assert_matches_reference(fast, [ref_beam_search(model, f, beam_size, max_length) for f in feats])


def test_no_early_stop_with_a_length_penalty():
    model = ToyRNN(**MODELS["peaky"])
    feats = model.images(4, seed=5)
    res = run_beam(model, feats, 2, max_length=12, length_penalty="avg_1", early_stop=True)
    assert res.n_steps == 12


def test_early_stop_at_the_first_step():
    """A model so sure of EOS that every image is complete at t=0: one decoder step only, same caption."""
    model = ToyRNN(**{**MODELS["smooth"], "eos_bias": 40.0})
    feats = model.images(3)
    res = run_beam(model, feats, 2, max_length=8)
    assert res.n_steps == 1 and not res.seqs.any()
    assert_matches_reference(res, [ref_beam_search(model, f, 2, 8) for f in feats])


def test_early_stop_is_exact_when_scores_fall_below_minus_1000():
    """Sums below -1000 (the model forces UNK): a finished beam's sum is *raised* to -1000, so its
    continuation can still beat a best p < -1000. The stop bound must include -1000: here the best
    caption is found late."""
    table = np.array(
        [
            [-1200, -1200, -1500, -5, -100],
            [-1500, -1500, -1500, -900, -100],
            [-900, -900, -600, -600, 0],
            [-1500, -600, -1200, -1500, -100],
            [-5, -1500, -5, -900, 0],
        ]
    )
    model = Markov(table)
    ref = ref_beam_search(model, np.zeros(1), 3, 6)
    for early_stop in (True, False):
        res = beam_search(
            model.step, keep_dict, keep_dict, model.init(3), 1, 3, max_length=6, early_stop=early_stop
        )
        assert_matches_reference(res, [ref])
    assert ref[0]["p"] == -1005.0


# ----------------------------------------------------------------------------------------------------
# Constraints


def _trigram_stats(seq) -> tuple[int, int]:
    """(number of trigrams, number of distinct trigrams) of a caption."""
    words = []
    for w in seq:
        if w == 0:
            break
        words.append(int(w))
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams), len(set(trigrams))


# 1 -> 2 -> 3 -> 1 ... is the favourite loop; 4 and 5 are the runners-up that blocking should let through.
LOOP = Markov.build(
    8,
    {
        0: [(1, 3.0)],
        1: [(2, 3.0), (4, 2.0)],
        2: [(3, 3.0), (5, 2.0)],
        3: [(1, 3.0), (6, 2.0)],
        4: [(3, 3.0)],
        5: [(1, 3.0)],
        6: [(2, 3.0)],
        7: [(0, 1.0)],
    },
)


def test_block_trigrams_greedy_and_beam():
    plain = greedy(LOOP.step, LOOP.init(2), 2, max_length=12)
    np.testing.assert_array_equal(plain.seqs[0], [1, 2, 3] * 4)
    blocked = greedy(LOOP.step, LOOP.init(2), 2, max_length=12, block_trigrams=True)
    # t=5: (1,2,3) seen once, so 3 loses 2 ln(1/2) = -1.386 and the runner-up 5 (1 nat behind) wins;
    # t=8: (1,2,3) and (1,2,5) both seen once, 3 wins again; t=9: (2,3,1) seen once, 6 wins.
    np.testing.assert_array_equal(blocked.seqs[0], [1, 2, 3, 1, 2, 5, 1, 2, 3, 6, 2, 3])
    np.testing.assert_array_equal(
        blocked.seqs, ref_greedy(LOOP, np.zeros((2, 1)), 12, block_trigrams=True)[0]
    )
    beam_plain = beam_search(LOOP.step, keep_dict, keep_dict, LOOP.init(2, 3), 2, 3, max_length=12)
    beam_blocked = beam_search(
        LOOP.step, keep_dict, keep_dict, LOOP.init(2, 3), 2, 3, max_length=12, block_trigrams=True
    )
    assert np.any(beam_plain.seqs != beam_blocked.seqs)
    assert_matches_reference(
        beam_blocked, [ref_beam_search(LOOP, f, 3, 12, block_trigrams=True) for f in np.zeros((2, 1))]
    )
    assert_matches_reference(beam_plain, [ref_beam_search(LOOP, f, 3, 12) for f in np.zeros((2, 1))])
    plain_stats = [_trigram_stats(q) for q in beam_plain.seqs]
    blocked_stats = [_trigram_stats(q) for q in beam_blocked.seqs]
    assert all(n == 10 and distinct == 3 for n, distinct in plain_stats)  # 1 2 3 1 2 3 ...
    assert all(distinct > 3 for _, distinct in blocked_stats)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_constraints_match_reference_on_the_rnn(beam_size):
    model = ToyRNN(vocab1=9, hidden=8, seed=2, scale=1.5, eos_bias=-1.0)  # small vocabulary: trigrams repeat
    feats = model.images(5, seed=13)
    bad = [2, 5]
    for kw, ref_kw in [
        (dict(block_trigrams=True), dict(block_trigrams=True)),
        (dict(bad_ending_ids=bad), dict(bad_ids=bad)),
        (dict(block_trigrams=True, bad_ending_ids=np.array(bad)), dict(block_trigrams=True, bad_ids=bad)),
    ]:
        res = run_beam(model, feats, beam_size, max_length=14, **kw)
        assert_matches_reference(res, [ref_beam_search(model, f, beam_size, 14, **ref_kw) for f in feats])
        g = greedy(model.step, model.init(feats), 5, max_length=14, **kw)
        np.testing.assert_array_equal(g.seqs, ref_greedy(model, feats, 14, **ref_kw)[0])
    plain = run_beam(model, feats, beam_size, max_length=14)
    blocked = run_beam(model, feats, beam_size, max_length=14, block_trigrams=True)
    assert np.any(plain.seqs != blocked.seqs)


def test_bad_endings_forbid_eos_after_those_words():
    # After 1 the model wants to stop; after 2 it wants 1; 3 continues to 2.
    chain = Markov.build(
        6, {0: [(3, 3.0)], 3: [(2, 3.0)], 2: [(1, 3.0)], 1: [(0, 3.0), (4, 1.0)], 4: [(0, 3.0)]}
    )
    plain = greedy(chain.step, chain.init(1), 1, max_length=8)
    np.testing.assert_array_equal(plain.seqs[0, :4], [3, 2, 1, 0])
    fixed = greedy(chain.step, chain.init(1), 1, max_length=8, bad_ending_ids=[1])
    np.testing.assert_array_equal(fixed.seqs[0, :5], [3, 2, 1, 4, 0])
    beam_plain = beam_search(chain.step, keep_dict, keep_dict, chain.init(2), 1, 2, max_length=8)
    np.testing.assert_array_equal(beam_plain.seqs[0, :4], [3, 2, 1, 0])
    beam_fixed = beam_search(
        chain.step, keep_dict, keep_dict, chain.init(2), 1, 2, max_length=8, bad_ending_ids=[1]
    )
    seq = list(beam_fixed.seqs[0])
    end = seq.index(0)
    assert end > 0 and seq[end - 1] != 1
    np.testing.assert_array_equal(beam_fixed.seqs[0, :5], [3, 2, 1, 4, 0])


# ----------------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("overwrite", [False, True])
def test_topk_is_exact_with_ties(overwrite):
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 1, size=(60, 23)).astype(np.float32)
    x[3] = 0.0
    x[4, :20] = -np.inf  # fewer finite values than k
    x[5] = -np.inf
    x[6, 5:] = -np.inf
    for k in (1, 2, 3, 5, 8, 10, 23):  # repeated-argmax, argpartition and full-sort paths
        data = x.copy()
        vals, idx = _topk(data, k, overwrite=overwrite)
        expect = np.argsort(-x, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, expect)
        np.testing.assert_array_equal(vals, np.take_along_axis(x, expect, axis=1))
        if not overwrite:
            np.testing.assert_array_equal(data, x)


def test_decode_sequence_and_bad_endings():
    ix_to_word = {
        "1": "a",
        "2": "man",
        "3": "riding",
        "4": "the",
        "5": "with",
        "6": "bi@@",
        "7": "ke",
        "8": "is",
    }
    seqs = np.array(
        [
            [1, 2, 3, 1, 6, 7, 0, 2],
            [1, 2, 5, 4, 0, 0, 0, 0],
            [4, 1, 0, 2, 2, 2, 2, 2],
            [0, 2, 2, 2, 2, 2, 2, 2],
            [2, 3, 2, 3, 2, 3, 2, 3],
        ]
    )
    assert decode_sequence(ix_to_word, seqs) == [
        "a man riding a bike",
        "a man with the",
        "the a",
        "",
        "man riding man riding man riding man riding",
    ]
    stripped = decode_sequence(ix_to_word, seqs, remove_bad_endings=True)
    assert stripped[:2] == ["a man riding a bike", "a man"]
    assert stripped[2] == "the a"  # the reference keeps a caption made only of bad endings
    assert decode_sequence(ix_to_word, [[2, 3], [1]]) == ["man riding", "a"]
    ids = bad_ending_ids(ix_to_word)
    assert ids.dtype == np.int64 and ids.tolist() == [1, 4, 5, 8]


def test_runtime_modules_import_only_numpy_and_the_stdlib():
    allowed = {"__future__", "collections", "dataclasses", "typing", "numpy"}
    for name in ("beam.py", "vocab.py"):
        tree = ast.parse((Path(__file__).resolve().parents[1] / "runtime" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{name} imports {roots - allowed}"


def test_candidates_top_equals_the_full_search_ranking():
    """Candidates.top from each row's k + 1 best words equals the top-k of the full log-probs after the UNK
    penalty (values, ids, raw values), including rows where UNK is among the best, ties, and a tiny vocabulary
    where every word is a candidate."""
    from aoanet_runtime.beam import Candidates

    rng = np.random.default_rng(5)
    for vocab1, k in ((30, 3), (30, 1), (4, 3), (3, 3)):
        unk = vocab1 - 1
        lp = -rng.integers(0, 6, (200, vocab1)).astype(np.float32) / 2  # many ties
        lp[:50, unk] = 0.0  # UNK the best before its penalty
        lp[50:60, unk] = lp[50:60].max(axis=1) - 0.5  # just behind the best
        for penalised in (unk, None):
            need = Candidates.needed(k, penalised, vocab1)
            order = np.argsort(-lp, axis=1, kind="stable")[:, :need]
            cands = Candidates(order, np.take_along_axis(lp, order, axis=1), vocab1)
            full = lp.copy()
            if penalised is not None:
                full[:, penalised] -= np.float32(1000.0)
            want_scores, want_ids = _topk(full.copy(), k)
            scores, ids, raw = cands.top(k, penalised)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)
            np.testing.assert_array_equal(raw, np.take_along_axis(lp, want_ids, axis=1))


# ----------------------------------------------------------------------------------------------------
# Attention carried by the search


class AttentiveToy(ToyRNN):
    """ToyRNN whose step also returns per-row "attention": softmax over 5 regions of the new state, for 2 heads,
    a deterministic function of the row's history, so that the right weights for a token can be recomputed."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.wa = np.random.default_rng(99).normal(size=(2, self.hidden, 5))

    def weights(self, h: np.ndarray) -> np.ndarray:
        scores = np.einsum("mh,khn->mkn", h, self.wa)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)  # [M, 2, 5]

    def attentive_step(self, it, ctx):
        logprobs, ctx = self.step(it, ctx)
        return logprobs, ctx, self.weights(ctx["h"])


def replay_attention(model: AttentiveToy, feat: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """The weights of each token of ``seq`` recomputed by feeding the caption itself (BOS, then its tokens): an
    independent check of what the search carried. Zeros after the first EOS."""
    ctx, it = model.init(feat[None]), np.zeros(1, np.int64)
    out = np.zeros((len(seq), 2, 5), np.float32)
    for t, token in enumerate(seq):
        _, ctx, w = model.attentive_step(it, ctx)
        out[t] = w[0]
        if token == 0:
            break
        it = np.array([token], np.int64)
    return out


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("beam_size", [1, 2, 3, 5])
@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("with_keep", [True, False])
def test_beam_search_carries_the_chosen_captions_attention(model_name, beam_size, early_stop, with_keep):
    model = AttentiveToy(**MODELS[model_name])
    feats = model.images(6, seed=beam_size + 10)
    max_length = 12
    plain = run_beam(model, feats, beam_size, max_length=max_length, early_stop=early_stop)
    res = beam_search(
        model.attentive_step, reorder_dict, keep_dict if with_keep else None, model.init(feats, beam_size),
        len(feats), beam_size, max_length=max_length, early_stop=early_stop, return_attention=True,
    )
    # asking for the weights changes nothing else
    np.testing.assert_array_equal(res.seqs, plain.seqs)
    np.testing.assert_array_equal(res.scores, plain.scores)
    assert plain.attention is None
    assert res.attention.shape == (6, max_length, 2, 5) and res.attention.dtype == np.float32
    for b in range(len(feats)):
        np.testing.assert_allclose(res.attention[b], replay_attention(model, feats[b], res.seqs[b]), atol=1e-6)
        length = int(np.argmax(res.seqs[b] == 0)) + 1 if (res.seqs[b] == 0).any() else max_length
        np.testing.assert_allclose(res.attention[b, :length].sum(axis=-1), 1.0, atol=1e-5)
        assert not res.attention[b, length:].any()


@pytest.mark.parametrize("length_penalty", ["", "wu_0.7"])
def test_attention_of_the_chosen_beam_with_ties_and_penalties(length_penalty):
    """The kept finished beam is the one the final choice takes, also among exactly equal scores ("tied")."""
    for name in MODELS:
        model = AttentiveToy(**MODELS[name])
        feats = model.images(5, seed=4)
        res = beam_search(
            model.attentive_step, reorder_dict, keep_dict, model.init(feats, 3), 5, 3, max_length=10,
            length_penalty=length_penalty, return_attention=True, return_done=True,
        )
        for b in range(5):
            np.testing.assert_array_equal(res.seqs[b], res.done_seqs[b, 0])
            np.testing.assert_allclose(res.attention[b], replay_attention(model, feats[b], res.seqs[b]), atol=1e-6)


def test_greedy_carries_attention_with_and_without_keep():
    model = AttentiveToy(**MODELS["peaky"])
    feats = model.images(7, seed=2)
    for keep in (None, keep_dict):
        res = greedy(model.attentive_step, model.init(feats), 7, max_length=15, keep=keep, return_attention=True)
        assert res.attention.shape == (7, 15, 2, 5)
        for b in range(7):
            np.testing.assert_allclose(res.attention[b], replay_attention(model, feats[b], res.seqs[b]), atol=1e-6)


def test_a_step_returning_attention_of_the_wrong_rows_is_an_error():
    model = AttentiveToy(**MODELS["smooth"])
    feats = model.images(2)

    def bad_step(it, ctx):
        logprobs, ctx, w = model.attentive_step(it, ctx)
        return logprobs, ctx, w[:1]

    with pytest.raises(ValueError, match="attention of shape"):
        greedy(bad_step, model.init(feats), 2, max_length=5, return_attention=True)
