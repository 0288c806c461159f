"""Beam search and greedy decoding in numpy, over a backend-agnostic decoder ``step``.

This is the one implementation used by both backends (Paddle ``generate`` and the onnxruntime
captioner). It follows the authors' beam search (``models/CaptionModel.py:beam_search``/``beam_step``,
docs/model.md, "Decoding"), batched over images instead of looping over them:

* rows are image-major: row ``b * K + k`` is beam ``k`` of image ``b``;
* one BOS step (token 0); at t = 0 only beam 0 is expanded (all beams are identical);
* before choosing, the UNK log-prob is lowered by 1000;
* candidates are each live beam's top-K words; a candidate's score is the beam's running sum plus the
  word's log-prob (EOS included); the K best are kept, ties resolved like the reference (candidate
  list built word rank outer, beam inner, then stably sorted by descending score);
* a beam whose newest token is EOS (0), or any beam at the last step, is copied to the image's finished
  list with p = length_penalty(t + 1, sum); its running sum is then set to -1000 and it keeps
  competing, as in the reference;
* the caption is the finished beam with the highest p (earliest finished first among equals).

``early_stop`` ends an image's search as soon as no live beam can still produce a finished beam ranking
first; the result is identical to running all ``max_length`` steps (see ``beam_search``).

The ``step`` callable must return log-probabilities (every value <= 0): the early stop relies on running
sums never increasing. It may return them whole ([M, V+1]) or as ``Candidates``: each row's best words already
chosen by the backend (the ONNX decoder's candidate head, ``Candidates.needed`` of them), which is all the search
reads when no constraint (block_trigrams, bad endings) needs the other values.

With ``return_attention`` the step also returns each row's attention weights (any per-row array, e.g. [M, heads,
N]); the search carries every surviving beam's weights along with its tokens (reordered, dropped and finished
with them) and returns those of the chosen caption: ``DecodeResult.attention``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Candidates",
    "DecodeResult",
    "NonFiniteError",
    "beam_search",
    "greedy",
    "is_greedy",
    "length_penalty_fn",
    "search",
]

UNK_PENALTY = 1000.0
# Running sum given to a beam once it is finished, so that it stops being continued in practice.
FINISHED_SUM = -1000.0
# block_trigrams: the reference adds ln(1/2) * alpha (alpha = 2, ln(1/2) written as -0.693) per earlier
# occurrence of the trigram.
TRIGRAM_PENALTY = -0.693 * 2.0

# The options greedy decoding has (beam search has these and more: length_penalty, early_stop, suppress_unk).
GREEDY_OPTIONS = ("block_trigrams", "bad_ending_ids")

Step = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
Gather = Callable[[Any, np.ndarray], Any]


class NonFiniteError(ValueError):
    """The decoder gave NaN or infinite log-probabilities for some images (typically features of a magnitude the
    model cannot handle). ``images``: their positions in the batch."""

    def __init__(self, images, message: str | None = None):
        self.images = sorted({int(i) for i in images})
        super().__init__(
            message
            or f"the decoder's log-probabilities are not finite (NaN or inf) for the image(s) at batch position(s) "
            f"{self.images}: their features are out of the range this model handles"
        )


def _check_finite(chosen: np.ndarray, images: np.ndarray) -> None:
    """``chosen``: each row's best log-prob (NaN ranks first, so a row with any NaN shows it here); ``images``: the
    batch position of each row."""
    bad = ~np.isfinite(chosen)
    if bad.any():
        raise NonFiniteError(images[bad])


@dataclass
class DecodeResult:
    """seqs: int64 [B, max_length], the caption ends at the first 0 (EOS), zeros after it.
    scores: float64 [B]; beam search: the final p (summed log-probs incl. EOS, after the length
        penalty); greedy: the summed raw log-probs incl. EOS.
    logprobs: float32 [B, max_length], the step's raw log-prob of each chosen token (the EOS's at its
        position), 0 after it.
    done_*: only with beam_search(return_done=True): every finished beam of each image, best first (the
        reference's ``done_beams`` before it keeps the top K); slots past done_counts[b] score -inf.
    n_steps: decoder steps run, BOS step included.
    attention: only with ``return_attention``: float32 [B, max_length, ...], the step's attention weights (the
        step's per-row array, e.g. [heads, regions]) for each chosen token of the caption (the EOS's at its
        position), zeros after it.
    """

    seqs: np.ndarray
    scores: np.ndarray
    logprobs: np.ndarray
    done_seqs: np.ndarray | None = None  # int64 [B, K * max_length, max_length]
    done_scores: np.ndarray | None = None  # float64 [B, K * max_length]
    done_counts: np.ndarray | None = None  # int64 [B]
    n_steps: int = 0
    attention: np.ndarray | None = None


def _run_step(step: Step, it: np.ndarray, ctx: Any, with_attention: bool) -> tuple[Any, Any, np.ndarray | None]:
    """(logprobs, ctx, attention or None): a step returns a third result, the rows' attention, when asked."""
    if not with_attention:
        logprobs, ctx = step(it, ctx)
        return logprobs, ctx, None
    logprobs, ctx, attention = step(it, ctx)
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim < 1 or attention.shape[0] != len(it):
        raise ValueError(
            f"the step returned attention of shape {attention.shape} for {len(it)} rows (one row per decoder row)"
        )
    return logprobs, ctx, attention


@dataclass
class Candidates:
    """A step's result as each row's ``k`` best words by log-prob instead of every log-prob (the ONNX decoder's
    candidate head).

    ids: int64 [M, k], best first, ties to the lower id (the order of a stable descending sort).
    logprobs: float32 [M, k], their log-probs.
    vocab_size: V + 1, the number of words they were chosen from.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    vocab_size: int

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index) -> Candidates:
        return Candidates(self.ids[index], self.logprobs[index], self.vocab_size)

    @staticmethod
    def needed(k: int, unk: int | None, vocab_size: int) -> int:
        """Words per row a search of ``k`` beams needs: k, or k + 1 when ``unk`` is penalised (the k best after
        the penalty are always among the k + 1 best before it; see ``top``)."""
        return min(k + (unk is not None), vocab_size)

    def top(self, k: int, unk: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, ids, log-probs) [M, k]: each row's k best words after lowering ``unk``'s log-prob by
        UNK_PENALTY (None: no penalty), in the order of a stable descending sort of the scores, exactly as the
        search ranks the full log-probs.

        Why k + 1 words suffice: if UNK is not among them, every word outside them ranks below all of them both
        before and after the penalty (UNK only drops), so the first k are the answer; if it is, the other k are the
        k best of all other words, and the answer is the k best of those and the penalised UNK.
        """
        need = self.needed(k, unk, self.vocab_size)
        if self.ids.shape[1] < need:
            raise ValueError(f"Candidates hold {self.ids.shape[1]} words per row, the search needs {need}")
        ids, raw = self.ids[:, :need], self.logprobs[:, :need]
        is_unk = ids == unk if unk is not None else None
        if is_unk is None or not is_unk.any():
            return raw[:, :k], ids[:, :k], raw[:, :k]
        scores = raw.copy()
        scores[is_unk] -= scores.dtype.type(UNK_PENALTY)  # float32, as the search's own lp[:, unk] -= 1000
        order = np.lexsort((ids, -scores), axis=-1)[:, :k]
        return tuple(np.take_along_axis(x, order, axis=1) for x in (scores, ids, raw))


def length_penalty_fn(spec: str) -> Callable[[int, np.ndarray], np.ndarray] | None:
    """The reference's ``penalty_builder``: '' -> None (raw sum), 'wu_α', 'avg_α' (α unused by 'avg').

    ``length`` counts the tokens of the finished beam including its EOS (the reference passes t + 1).
    """
    if not spec:
        return None
    kind, _, alpha_text = spec.partition("_")
    try:
        alpha = float(alpha_text)
    except ValueError:
        raise ValueError(f"length_penalty must be '', 'wu_<alpha>' or 'avg_<alpha>', got {spec!r}") from None
    if kind == "wu":
        return lambda length, logprob_sum: logprob_sum / (((5 + length) ** alpha) / ((5 + 1) ** alpha))
    if kind == "avg":
        return lambda length, logprob_sum: logprob_sum / length
    raise ValueError(f"length_penalty must be '', 'wu_<alpha>' or 'avg_<alpha>', got {spec!r}")


def _topk(x: np.ndarray, k: int, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k values and indices of each row of ``x`` [N, V], descending, ties broken by the lower index
    (the order of a stable descending sort). ``overwrite=True`` lets it scribble on ``x``."""
    n, v = x.shape
    if k >= v or n == 0:
        idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(x, idx, axis=1), idx
    rows = np.arange(n)
    if k <= 8:
        # k passes of argmax (first maximum = lowest index among ties): faster than argpartition for small k
        # (docs/benchmarks.md).
        work = x if overwrite else x.copy()
        idx = np.empty((n, k), dtype=np.int64)
        vals = np.empty((n, k), dtype=x.dtype)
        for j in range(k):
            idx[:, j] = work.argmax(axis=1)
            vals[:, j] = work[rows, idx[:, j]]
            work[rows, idx[:, j]] = -np.inf
        # A row with fewer than k values above -inf could pick a masked entry again: redo it exactly.
        short = np.isneginf(vals[:, -1])
        if short.any():
            fix = np.nonzero(short)[0]
            for j in reversed(range(k)):  # undo the masking (first pick of an index last)
                work[fix, idx[fix, j]] = vals[fix, j]
            sub = work[fix]
            exact = np.argsort(-sub, axis=1, kind="stable")[:, :k]
            idx[short] = exact
            vals[short] = np.take_along_axis(sub, exact, axis=1)
        return vals, idx
    idx = np.argpartition(x, v - k, axis=1)[:, v - k :]
    vals = np.take_along_axis(x, idx, axis=1)
    # argpartition picks arbitrarily among values tied with the k-th largest: redo those (rare) rows exactly.
    kth = vals.min(axis=1)
    tied = np.count_nonzero(x >= kth[:, None], axis=1) > k
    if tied.any():
        sub = np.nonzero(tied)[0]
        exact = np.argsort(-x[sub], axis=1, kind="stable")[:, :k]
        idx[sub] = exact
        vals[sub] = np.take_along_axis(x[sub], exact, axis=1)
    order = np.lexsort((idx, -vals), axis=-1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _by_flat(x: np.ndarray) -> np.ndarray:
    """[n_img * K, K] (row q of an image, rank c) -> [n_img, K * K] at flat index c * K + q: the reference's
    candidate list order (word rank outer, beam inner)."""
    k = x.shape[-1]
    return x.reshape(-1, k, k).transpose(0, 2, 1).reshape(-1, k * k)


def _apply_constraints(
    lp: np.ndarray, history: np.ndarray, t: int, block_trigrams: bool, bad_ids: np.ndarray | None
) -> None:
    """In place on ``lp`` [M, V+1]: the reference's optional constraints, given ``history[:, :t]``."""
    if bad_ids is not None and t > 0:
        # No EOS right after a bad-ending word.
        lp[np.isin(history[:, t - 1], bad_ids), 0] = -np.inf
    if block_trigrams and t >= 3:
        # Each earlier trigram (w_s, w_s+1, w_s+2) whose first two words are the last two tokens
        # penalises w_s+2.
        last_two_match = (history[:, : t - 2] == history[:, t - 2 : t - 1]) & (
            history[:, 1 : t - 1] == history[:, t - 1 : t]
        )
        rows, cols = np.nonzero(last_two_match)
        if rows.size:
            flat = rows * lp.shape[1] + history[rows, cols + 2]
            uniq, counts = np.unique(flat, return_counts=True)
            lp.reshape(-1)[uniq] += counts.astype(lp.dtype) * lp.dtype.type(TRIGRAM_PENALTY)


def beam_search(
    step: Step,
    reorder: Gather,
    keep: Gather | None,
    ctx: Any,
    batch_size: int,
    beam_size: int,
    max_length: int = 20,
    unk_idx: int | None = None,
    length_penalty: str = "",
    block_trigrams: bool = False,
    bad_ending_ids: np.ndarray | list[int] | None = None,
    early_stop: bool = True,
    suppress_unk: bool = True,
    return_done: bool = False,
    return_attention: bool = False,
) -> DecodeResult:
    """Beam search over ``batch_size`` images with ``beam_size`` beams each (the authors' semantics, batched).

    step(it int64 [M], ctx) -> (logprobs [M, V+1], ctx): one decoder step for the M current rows.
    reorder(ctx, index int64 [M]) -> ctx: new row r <- old row index[r] (always inside the same
        image's block, so per-image constants need no gather); not called when index is the identity.
    keep(ctx, index int64 [M']) -> ctx: keep only these rows (images whose search is complete are
        dropped); may be None, then every row is stepped until the search ends.
    ctx: the caller's state, already expanded to batch_size * beam_size rows (image-major).

    unk_idx: the id whose log-prob is lowered by 1000 before choosing (default: the last index, V);
        suppress_unk=False turns that off.
    early_stop: stop an image as soon as its best finished beam can no longer be beaten. Running sums
        never increase, so once every live beam's sum (and the -1000 given to finished beams) is <= the
        best finished p, nothing found later can rank first (a later equal p ranks after it). Exact,
        hence only used without a length penalty. Complete images are dropped via ``keep`` right after
        the step in which they complete; the loop ends when all are complete.
    block_trigrams, bad_ending_ids: the reference's ``_sample`` options (off by default), applied to
        every beam.
    return_done: also return every finished beam (with early_stop, only those found before the image
        stopped).
    return_attention: ``step`` returns (logprobs, ctx, attention); the result's ``attention`` holds the weights
        of the chosen caption's tokens (each live beam carries its own history; of the finished ones, only the
        best so far per image is kept, with the same tie rule as the final choice).
    """
    batch, k_beams, max_len = int(batch_size), int(beam_size), int(max_length)
    if batch < 1 or k_beams < 1 or max_len < 1:
        raise ValueError("batch_size, beam_size and max_length must be >= 1")
    penalty = length_penalty_fn(length_penalty)
    stop_early = bool(early_stop) and penalty is None
    bad_ids = (
        None if bad_ending_ids is None or len(bad_ending_ids) == 0 else np.asarray(bad_ending_ids, np.int64)
    )

    n_rows = batch * k_beams
    logprobs, ctx, att = _run_step(step, np.zeros(n_rows, dtype=np.int64), ctx, return_attention)
    n_steps = 1
    vocab1 = logprobs.vocab_size if isinstance(logprobs, Candidates) else np.shape(logprobs)[1]
    if k_beams > vocab1:
        raise ValueError(f"beam_size {k_beams} exceeds the vocabulary size {vocab1}")
    unk = (vocab1 - 1 if unk_idx is None else int(unk_idx) % vocab1) if suppress_unk else None

    active = np.arange(batch)  # original image index of each active image
    seq = np.zeros((n_rows, max_len), dtype=np.int64)
    seq_lp = np.zeros((n_rows, max_len), dtype=np.float32)
    sums = np.zeros((batch, k_beams), dtype=np.float64)

    # Finished beams, by original image; each step finishes at most K beams per image.
    n_slots = k_beams * max_len
    done_p = np.full((batch, n_slots), -np.inf)
    done_seq = np.zeros((batch, n_slots, max_len), dtype=np.int64)
    done_lp = np.zeros((batch, n_slots, max_len), dtype=np.float32)
    done_n = np.zeros(batch, dtype=np.int64)
    best_p = np.full(batch, -np.inf)
    k_range = np.arange(k_beams)
    if return_attention:
        # each row's weights at every step so far; of the finished beams only the best so far per image: the
        # final choice is the highest p, the earliest slot among equals, so a later beam replaces the kept one
        # only with a strictly higher p
        seq_att = np.zeros((n_rows, max_len, *att.shape[1:]), dtype=np.float32)
        best_att = np.zeros((batch, max_len, *att.shape[1:]), dtype=np.float32)
        best_att_p = np.full(batch, -np.inf)
        has_att = np.zeros(batch, dtype=bool)

    constraints = block_trigrams or bad_ids is not None
    for t in range(max_len):
        n_img = active.size
        rows_t = slice(None, None, k_beams) if t == 0 else slice(None)  # t = 0: beam 0 of each image only
        if isinstance(logprobs, Candidates):
            if constraints:
                raise ValueError("block_trigrams / bad endings need the full log-probs, not Candidates")
            ys, ix, rv = logprobs.rows(rows_t).top(k_beams, unk)
        else:
            raw = np.asarray(logprobs)
            lp = raw.copy()
            _apply_constraints(lp, seq, t, block_trigrams, bad_ids)
            if unk is not None:  # after the constraints, in the reference's order
                lp[:, unk] -= lp.dtype.type(UNK_PENALTY)
            ys, ix = _topk(lp[rows_t], k_beams, overwrite=True)  # row q's top words by rank c
            rv = np.take_along_axis(raw[rows_t], ix, axis=1)  # their raw log-probs
        _check_finite(rv[:, 0], active if t == 0 else np.repeat(active, k_beams))

        if t == 0:  # [n_img, K]
            cand, words_by_flat, raw_by_flat = sums[:, :1] + ys, ix, rv
        else:  # [n_img * K, K]
            cand = _by_flat(sums[:, :, None] + ys.reshape(n_img, k_beams, k_beams))
            words_by_flat, raw_by_flat = _by_flat(ix), _by_flat(rv)
        if ys.size and ys[:, 0].max() > 0:
            stop_early = False  # not log-probabilities: the early-stop bound does not hold
        pick = np.argsort(-cand, axis=1, kind="stable")[:, :k_beams]
        parent = pick % k_beams if t > 0 else np.zeros_like(pick)
        words = np.take_along_axis(words_by_flat, pick, axis=1).reshape(-1)
        sums = np.take_along_axis(cand, pick, axis=1)

        src = (np.arange(n_img)[:, None] * k_beams + parent).reshape(-1)
        seq = seq[src]
        seq_lp = seq_lp[src]
        seq[:, t] = words
        seq_lp[:, t] = np.take_along_axis(raw_by_flat, pick, axis=1).reshape(-1)
        if return_attention:
            seq_att = seq_att[src]
            seq_att[:, t] = att[src]  # the weights of the step that chose word t, from the beam it extends
        if not np.array_equal(src, np.arange(src.size)):
            ctx = reorder(ctx, src)

        finished = (
            np.ones((n_img, k_beams), bool) if t == max_len - 1 else (words == 0).reshape(n_img, k_beams)
        )
        if finished.any():
            fb, fk = np.nonzero(finished)  # image-major, then beam index: the reference's insertion order
            img = active[fb]
            slot = done_n[img] + (np.cumsum(finished, axis=1) - 1)[fb, fk]
            p = sums[fb, fk] if penalty is None else penalty(t + 1, sums[fb, fk])
            rows = fb * k_beams + fk
            fseq, flp = seq[rows], seq_lp[rows]
            is_eos = fseq == 0
            after_eos = (np.cumsum(is_eos, axis=1) - is_eos) > 0
            fseq[after_eos] = 0
            flp[after_eos] = 0.0
            done_p[img, slot] = p
            done_seq[img, slot] = fseq
            done_lp[img, slot] = flp
            if return_attention:
                # per image, this step's first beam with the highest p (slot order), if it beats the kept one
                fp = np.broadcast_to(p, img.shape)
                order = np.lexsort((np.arange(img.size), -fp, img))
                first = order[np.r_[True, img[order][1:] != img[order][:-1]]]
                win = first[~has_att[img[first]] | (fp[first] > best_att_p[img[first]])]
                fatt = seq_att[rows[win]]
                fatt[after_eos[win]] = 0.0
                best_att[img[win]] = fatt
                best_att_p[img[win]] = fp[win]
                has_att[img[win]] = True
            done_n[active] += finished.sum(axis=1)
            np.maximum.at(best_p, img, p)
            sums[finished] = FINISHED_SUM
        if t == max_len - 1:
            break

        if stop_early:
            bound = np.maximum(sums.max(axis=1), FINISHED_SUM)
            complete = best_p[active] >= bound
            if complete.all():
                break
            if complete.any() and keep is not None:
                live = np.nonzero(~complete)[0]
                rows = (live[:, None] * k_beams + k_range).reshape(-1)
                ctx = keep(ctx, rows)
                active, sums, seq, seq_lp = active[live], sums[live], seq[rows], seq_lp[rows]
                if return_attention:
                    seq_att = seq_att[rows]

        logprobs, ctx, att = _run_step(step, np.ascontiguousarray(seq[:, t]), ctx, return_attention)
        n_steps += 1

    order = np.argsort(-done_p, axis=1, kind="stable")
    first = order[:, 0]
    b_range = np.arange(batch)
    result = DecodeResult(
        seqs=done_seq[b_range, first],
        scores=done_p[b_range, first],
        logprobs=done_lp[b_range, first],
        n_steps=n_steps,
        attention=best_att if return_attention else None,
    )
    if return_done:
        result.done_seqs = np.take_along_axis(done_seq, order[:, :, None], axis=1)
        result.done_scores = np.take_along_axis(done_p, order, axis=1)
        result.done_counts = done_n
    return result


def greedy(
    step: Step,
    ctx: Any,
    batch_size: int,
    max_length: int = 20,
    block_trigrams: bool = False,
    bad_ending_ids: np.ndarray | list[int] | None = None,
    keep: Gather | None = None,
    return_attention: bool = False,
) -> DecodeResult:
    """Greedy decoding (the reference's ``_sample`` with sample_method='greedy'): argmax each step, no UNK
    suppression; a row is finished once it emits 0. With ``keep``, finished rows are dropped from ``ctx``;
    otherwise they are fed 0 until every row is finished. Scores are the summed raw log-probs incl. EOS.
    ``return_attention``: as for ``beam_search``."""
    batch, max_len = int(batch_size), int(max_length)
    bad_ids = (
        None if bad_ending_ids is None or len(bad_ending_ids) == 0 else np.asarray(bad_ending_ids, np.int64)
    )
    seqs = np.zeros((batch, max_len), dtype=np.int64)
    seq_lp = np.zeros((batch, max_len), dtype=np.float32)
    scores = np.zeros(batch, dtype=np.float64)

    rows = np.arange(batch)  # original row of each row in ctx
    alive = np.ones(batch, dtype=bool)
    it = np.zeros(batch, dtype=np.int64)
    n_steps = 0
    constraints = block_trigrams or bad_ids is not None
    seq_att = None
    for t in range(max_len):
        logprobs, ctx, att = _run_step(step, it, ctx, return_attention)
        n_steps += 1
        if isinstance(logprobs, Candidates):
            if constraints:
                raise ValueError("block_trigrams / bad endings need the full log-probs, not Candidates")
            _, ids, raw_top = logprobs.top(1, None)
            words, chosen = ids[:, 0], raw_top[:, 0]
        else:
            raw = np.asarray(logprobs)
            lp = raw
            if constraints:
                lp = raw.copy()
                _apply_constraints(lp, seqs[rows], t, block_trigrams, bad_ids)
            words = lp.argmax(axis=1)
            chosen = raw[np.arange(words.size), words]
        _check_finite(chosen[alive], rows[alive])
        out = rows[alive]
        seqs[out, t] = words[alive]
        seq_lp[out, t] = chosen[alive]
        scores[out] += chosen[alive]
        if return_attention:
            if seq_att is None:
                seq_att = np.zeros((batch, max_len, *att.shape[1:]), dtype=np.float32)
            seq_att[out, t] = att[alive]
        alive &= words != 0
        if not alive.any():
            break
        if keep is not None and not alive.all():
            live = np.nonzero(alive)[0]
            ctx = keep(ctx, live)
            rows, words = rows[live], words[live]
            alive = np.ones(live.size, dtype=bool)
        it = np.where(alive, words, 0)
    return DecodeResult(seqs=seqs, scores=scores, logprobs=seq_lp, n_steps=n_steps, attention=seq_att)


def is_greedy(beam_size: int, greedy_unk: bool = True) -> bool:
    """Beam size 1 with ``greedy_unk`` decodes greedily (the reference's ``_sample``: no UNK suppression);
    without it, a beam search of one beam."""
    return beam_size == 1 and bool(greedy_unk)


def search(
    step: Step,
    reorder: Gather,
    keep: Gather | None,
    ctx: Any,
    batch_size: int,
    beam_size: int,
    max_length: int = 20,
    greedy_unk: bool = True,
    unk_idx: int | None = None,
    return_attention: bool = False,
    **options,
) -> DecodeResult:
    """What both backends' ``decode`` run: ``greedy`` when ``is_greedy(beam_size, greedy_unk)`` (given only the
    GREEDY_OPTIONS among ``options``), else ``beam_search``. ``ctx`` must already have 1 row per image for greedy,
    ``beam_size`` for beam search. ``return_attention``: ``step`` returns the rows' attention as a third result,
    and the result carries the chosen caption's (``DecodeResult.attention``)."""
    if is_greedy(beam_size, greedy_unk):
        chosen = {name: value for name, value in options.items() if name in GREEDY_OPTIONS}
        return greedy(
            step, ctx, batch_size, max_length=max_length, keep=keep, return_attention=return_attention, **chosen
        )
    return beam_search(
        step, reorder, keep, ctx, batch_size, beam_size, max_length=max_length, unk_idx=unk_idx,
        return_attention=return_attention, **options
    )
