"""CIDEr-D (the SCST reward) and the n-gram document-frequency file.

The independent reference is the straightforward per-caption implementation in scripts/bench_cider.py (plain
Python dicts, sharing no code with aoanet.metrics.cider), plus pycocoevalcap's own ``Cider`` and a few values
worked out by hand below.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_data_support import COCO_CAPTIONS

from aoanet.metrics.cider import (
    CiderD,
    cut_at_eos,
    document_frequency,
    load_document_frequency,
    save_document_frequency,
)

REPO = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("bench_cider", REPO / "scripts" / "bench_cider.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
straightforward_cider_d = bench.straightforward_cider_d
straightforward_df = bench.straightforward_df


@pytest.fixture(scope="module")
def coco_refs() -> list[list[list[str]]]:
    """Real COCO references: one entry per image (sorted by id), each caption lower-cased, without
    punctuation, split on spaces."""
    data = json.loads(COCO_CAPTIONS.read_text())
    by_image = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(bench.simple_tokenize(ann["caption"]))
    return [by_image[i] for i in sorted(by_image)]


def _first_vs_rest(refs):
    """Each image's first caption as the candidate, the other captions as its references."""
    return [r[0] for r in refs], [r[1:] for r in refs]


def _to_ids(refs, vocab):
    """Words -> ids (1-based), each caption ending with the EOS 0, as the SCST trainer passes them."""
    return [[tuple(vocab.setdefault(w, len(vocab) + 1) for w in c) + (0,) for c in r] for r in refs]


# ---- document frequencies ----------------------------------------------------------------------------------


def test_document_frequency_counts_each_ngram_once_per_image():
    refs = [[["a", "b", "a"], ["a", "b"]], [["b", "c", "d", "e", "f"]]]
    df = document_frequency(refs)
    assert df[("a",)] == 1  # twice in one caption and in two captions of one image: one image
    assert df[("b",)] == 2
    assert df[("a", "b")] == 1 and df[("b", "a")] == 1
    assert df[("b", "c", "d", "e")] == 1 and ("b", "c", "d", "e", "f") not in df  # 1..4-grams only
    assert len(df) == 5 + 14 - 1  # a b ab ba aba | five words: 5 + 4 + 3 + 2 | "b" in both


def test_document_frequency_matches_independent_count_on_coco(coco_refs):
    refs = coco_refs[:400]
    assert document_frequency(refs) == straightforward_df(refs)
    ids = _to_ids(refs, {})
    df_ids = document_frequency(ids)
    assert all(type(t) is int for g in df_ids for t in g)
    assert len(df_ids) > len(straightforward_df(refs))  # the EOS adds n-grams


@pytest.mark.parametrize("kind", ["int", "str"])
def test_save_load_round_trip_keeps_token_types(tmp_path, kind):
    rng = np.random.default_rng(0)
    df = {}
    for n in range(1, 5):
        for row in rng.integers(0, 12000, (3000, n)).tolist():
            key = tuple(row) if kind == "int" else tuple(f"w{t}" for t in row)
            df[key] = int(rng.integers(1, 1000))
    path = tmp_path / "df.json.gz"
    save_document_frequency(path, df, 113287)
    loaded, ref_len = load_document_frequency(path)
    assert ref_len == 113287
    assert loaded == df
    expected = int if kind == "int" else str
    assert all(type(t) is expected for g in loaded for t in g)
    with gzip.open(path, "rt") as f:
        payload = json.load(f)
    assert payload["format"] == "aoanet-ngram-df" and payload["version"] == 1


def test_save_accepts_numpy_ints_and_mixed_orders(tmp_path):
    df = {(np.int64(3), np.int32(4)): 2, (5,): 1, ("a", "b", "c"): 7}
    save_document_frequency(tmp_path / "df.json.gz", df, 9)
    loaded, _ = load_document_frequency(tmp_path / "df.json.gz")
    assert loaded == {(3, 4): 2, (5,): 1, ("a", "b", "c"): 7}
    assert all(type(t) is int for t in next(g for g in loaded if len(g) == 2))


@pytest.mark.parametrize("bad_key, message", [((1, "a"), "mixes token types"), (("a\x1fb",), "separator"),
                                              ((), "not a non-empty tuple")])
def test_save_rejects_bad_keys(tmp_path, bad_key, message):
    with pytest.raises(ValueError, match=message):
        save_document_frequency(tmp_path / "df.json.gz", {bad_key: 1}, 3)


def test_load_rejects_other_files_with_a_clear_error(tmp_path):
    pickled = tmp_path / "coco-train-idxs.p"
    pickled.write_bytes(pickle.dumps({"document_frequency": {("1",): 1}, "ref_len": 1}))
    with pytest.raises(ValueError, match="not a gzip JSON"):
        load_document_frequency(pickled)
    wrong_tag = tmp_path / "other.json.gz"
    with gzip.open(wrong_tag, "wt") as f:
        json.dump({"format": "something-else", "version": 1, "ref_len": 3}, f)
    with pytest.raises(ValueError, match="field 'format'"):
        load_document_frequency(wrong_tag)
    bad_len = tmp_path / "bad_len.json.gz"
    with gzip.open(bad_len, "wt") as f:
        json.dump({"format": "aoanet-ngram-df", "version": 1, "ref_len": 0}, f)
    with pytest.raises(ValueError, match="field 'ref_len'"):
        CiderD.from_file(bad_len)
    bad_block = tmp_path / "bad_block.json.gz"
    with gzip.open(bad_block, "wt") as f:
        json.dump({"format": "aoanet-ngram-df", "version": 1, "ref_len": 3,
                   "int_ngrams": {"2": {"tokens": [1, 2, 3], "counts": [1, 1]}}}, f)
    with pytest.raises(ValueError, match="field 'int_ngrams.2'"):
        load_document_frequency(bad_block)


# ---- CIDEr-D: values worked out by hand --------------------------------------------------------------------


def test_missing_ngram_gets_full_idf():
    # df {a: 2}, ref_len 4: idf(a) = log 4 - log 2 = log 2, idf(b) = idf(c) = log 4 = 2 log 2 (not in df).
    # unigrams: numerator min(log2, log2) * log2 = log2^2; both norms sqrt(log2^2 + 4 log2^2) = sqrt(5) log2
    # -> cosine 1/5; bigrams "a b" / "a c" do not match; no 3- or 4-grams; equal lengths: no penalty.
    scorer = CiderD({("a",): 2}, 4)
    assert scorer(["a b"], [["a c"]])[0] == pytest.approx(10 * (1 / 5) / 4, abs=1e-12)
    assert CiderD({("a",): 2, ("b",): 0}, 4)(["a b"], [["a c"]])[0] == pytest.approx(0.5, abs=1e-12)


def test_clipped_numerator():
    # empty df, ref_len 3: every weight is tf * L with L = log 3. hyp "a a": {a: 2L}, {aa: L};
    # ref "a b": {a: L, b: L}, {ab: L}. unigram numerator min(2L, L) * L = L^2 (unclipped it would be 2L^2),
    # norms 2L and sqrt(2) L -> cosine 1 / (2 sqrt 2); bigram lengths 1 and 1 -> no penalty.
    scorer = CiderD({}, 3)
    assert scorer([["a", "a"]], [[["a", "b"]]])[0] == pytest.approx(10 / (2 * math.sqrt(2)) / 4, abs=1e-12)


def test_length_penalty_and_mean_over_references():
    # identical captions score 10 * (number of n-gram orders present) / 4; the penalty uses the bigram counts:
    # "a b c d" (3 bigrams) against "a b c d e f" (5): delta 2 -> exp(-4 / 72).
    scorer = CiderD({}, 10)
    assert scorer(["a b c d"], [["a b c d"]])[0] == pytest.approx(10.0, abs=1e-12)
    assert scorer(["a b"], [["a b"]])[0] == pytest.approx(5.0, abs=1e-12)
    one = scorer(["a b c d"], [["a b c d e f"]])[0]
    # cosine per order for tf = 1 and equal idf: |common| / sqrt(|hyp| |ref|) over n-grams of each order
    cos = [4 / math.sqrt(4 * 6), 3 / math.sqrt(3 * 5), 2 / math.sqrt(2 * 4), 1 / math.sqrt(1 * 3)]
    assert one == pytest.approx(10 * sum(cos) / 4 * math.exp(-4 / 72), abs=1e-12)
    two = scorer(["a b c d"], [["a b c d e f", "a b c d"]])[0]
    assert two == pytest.approx((one + 10.0) / 2, abs=1e-12)


def test_empty_candidate_scores_zero_and_cut_at_eos():
    scorer = CiderD({(5,): 1}, 2)
    assert scorer([()], [[(5, 3, 0)]])[0] == 0.0
    assert cut_at_eos([5, 3, 0, 0, 0]) == (5, 3, 0)
    assert cut_at_eos(np.array([7, 8, 9])) == (7, 8, 9)
    assert cut_at_eos([0, 4]) == (0,)


# ---- CIDEr-D against independent implementations on real captions ------------------------------------------


def test_training_df_matches_straightforward_on_coco(coco_refs, tmp_path):
    train, evaluated = coco_refs[:400], coco_refs[400:]
    df = straightforward_df(train)
    cands, refs = _first_vs_rest(evaluated)
    expected = np.array([straightforward_cider_d(c, r, df, len(train))
                         for c, r in zip(cands, refs, strict=True)])
    scorer = CiderD(document_frequency(train), len(train))
    got = scorer(cands, refs)
    assert got.dtype == np.float64 and got.shape == (len(cands),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scorer.score_groups(cands, refs, 1), expected, rtol=0, atol=1e-9)
    # the same through the file, and with captions given as strings
    save_document_frequency(tmp_path / "df.json.gz", document_frequency(train), len(train))
    from_file = CiderD.from_file(tmp_path / "df.json.gz")
    got_str = from_file([" ".join(c) for c in cands], [[" ".join(x) for x in r] for r in refs])
    np.testing.assert_allclose(got_str, expected, rtol=0, atol=1e-9)
    assert expected.min() < 0.5 < 2.0 < expected.max()  # a real spread of scores, not a degenerate case


def test_token_ids_with_eos_match_straightforward(coco_refs, tmp_path):
    vocab: dict[str, int] = {}
    train, evaluated = _to_ids(coco_refs[:400], vocab), _to_ids(coco_refs[400:], vocab)
    df = document_frequency(train)
    cands, refs = _first_vs_rest(evaluated)
    independent_df = straightforward_df(train)
    expected = np.array([straightforward_cider_d(c, r, independent_df, len(train))
                         for c, r in zip(cands, refs, strict=True)])
    got = CiderD(df, len(train))(cands, refs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # the EOS is a token: dropping it changes the scores
    no_eos = CiderD(df, len(train))([c[:-1] for c in cands], [[x[:-1] for x in r] for r in refs])
    assert np.abs(no_eos - got).max() > 1e-3
    # the reference's inputs: strings of ids, and a df pickled with decimal-string tokens ("coco-train-idxs")
    df_str = {tuple(str(t) for t in g): c for g, c in df.items()}
    as_strings = CiderD(df_str, len(train))([" ".join(map(str, c)) for c in cands],
                                            [[" ".join(map(str, x)) for x in r] for r in refs])
    np.testing.assert_allclose(as_strings, expected, rtol=0, atol=1e-9)
    # numpy rows, e.g. the trainer's sequences after cut_at_eos
    padded = np.zeros((len(cands), 30), np.int64)
    for i, c in enumerate(cands):
        padded[i, : len(c)] = c
    rows = [np.asarray(cut_at_eos(row)) for row in padded]
    np.testing.assert_allclose(CiderD(df, len(train))(rows, refs), expected, rtol=0, atol=1e-9)
    save_document_frequency(tmp_path / "ids.json.gz", df, len(train))
    np.testing.assert_allclose(CiderD.from_file(tmp_path / "ids.json.gz")(cands, refs), expected, rtol=0,
                               atol=1e-9)


def test_corpus_df_matches_pycocoevalcap_cider(coco_refs):
    from pycocoevalcap.cider.cider import Cider

    evaluated = coco_refs
    cands, refs = _first_vs_rest(evaluated)
    gts = {i: [" ".join(x) for x in r] for i, r in enumerate(refs)}
    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD.from_corpus(refs)(cands, refs)
    np.testing.assert_allclose(ours, np.asarray(per_image), rtol=0, atol=1e-9)
    assert ours.mean() == pytest.approx(mean, abs=1e-9)


def test_score_groups_equals_call_in_the_scst_layout(coco_refs):
    vocab: dict[str, int] = {}
    refs = _to_ids(coco_refs[:40], vocab)
    others = _to_ids(coco_refs[40:80], vocab)
    scorer = CiderD(document_frequency(_to_ids(coco_refs[100:], vocab)), len(coco_refs) - 100)
    # per image: 5 "samples" (another image's captions, one repeated) + 1 "greedy" (one of its own captions)
    cands = [c for b in range(40) for c in others[b][:4] + [others[b][0], refs[b][2]]]
    per_candidate_refs = [refs[b] for b in range(40) for _ in range(6)]
    by_call = scorer(cands, per_candidate_refs)
    np.testing.assert_allclose(scorer.score_groups(cands, refs, 6), by_call, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scorer.score_groups(cands, refs, np.repeat(np.arange(40), 6)), by_call,
                               rtol=0, atol=1e-12)
    # shuffled order and copies of the reference lists give the same scores
    perm = np.random.default_rng(1).permutation(len(cands))
    shuffled = scorer([cands[i] for i in perm], [list(per_candidate_refs[i]) for i in perm])
    np.testing.assert_allclose(shuffled, by_call[perm], rtol=0, atol=1e-12)
    assert by_call[5] > by_call[0]  # the greedy caption is one of the image's own references


# ---- errors ------------------------------------------------------------------------------------------------


def test_clear_errors():
    scorer = CiderD({(1,): 1}, 5)
    with pytest.raises(ValueError, match="candidates has 2 captions but references has 1"):
        scorer([(1, 0), (2, 0)], [[(1, 0)]])
    with pytest.raises(ValueError, match="candidate 1 has an empty list of references"):
        scorer([(1, 0), (2, 0)], [[(1, 0)], []])
    with pytest.raises(ValueError, match="group=5: expected 5 x 1 images"):
        scorer.score_groups([(1, 0)] * 4, [[(1, 0)]], 5)
    with pytest.raises(ValueError, match=r"group\[1\] = 3 is not an image index"):
        scorer.score_groups([(1, 0)] * 2, [[(1, 0)]], [0, 3])
    with pytest.raises(ValueError, match="token id 70000 is outside 0..65534"):
        scorer([(70000, 0)], [[(1, 0)]])
    with pytest.raises(ValueError, match="token 'dog' is not a token id"):
        scorer(["1 dog 0"], [[(1, 0)]])
    with pytest.raises(ValueError, match=r"candidates\[1\]: a caption must be 1-D"):
        scorer([(1, 0), np.zeros((2, 2), np.int64)], [[(1, 0)], [(1, 0)]])
    with pytest.raises(ValueError, match="ref_len must be a number >= 1"):
        CiderD({}, 0)
    with pytest.raises(ValueError, match="mixes int tokens and words"):
        CiderD({(1,): 1, ("dog",): 1}, 3)
    with pytest.raises(ValueError, match="is a 5-gram"):
        CiderD({(1, 2, 3, 4, 5): 1}, 3)
