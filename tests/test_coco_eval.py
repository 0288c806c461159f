"""coco-caption evaluation: pycocoevalcap metrics on real COCO references, checked against independent counts.

One evaluation run (300 images: each image's first caption as the prediction, the other captions as its
references; the last prediction is empty, as an untrained model's can be) is shared by the tests that need
Java; it takes ~10 s, most of it starting the JVMs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_data_support import COCO_CAPTIONS

from aoanet.metrics import coco_eval
from aoanet.metrics.cider import CiderD
from aoanet.metrics.coco_eval import JavaNotFoundError, check_java, format_table, language_eval, spice_status

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 300
ALL_BUT_SPICE = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


@pytest.fixture(scope="module")
def coco_raw() -> dict[int, list[str]]:
    by_image = defaultdict(list)
    for ann in json.loads(COCO_CAPTIONS.read_text())["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"])
    return dict(by_image)


@pytest.fixture(scope="module")
def first_vs_rest(coco_raw):
    ids = sorted(coco_raw)[:N_IMAGES]
    predictions = [{"image_id": i, "caption": coco_raw[i][0]} for i in ids]
    predictions[-1]["caption"] = ""  # an empty caption must not shift the tokenizer's lines
    references = {i: coco_raw[i][1:] for i in ids}
    return predictions, references


@pytest.fixture(scope="module")
def evaluated(first_vs_rest, tmp_path_factory):
    """One real run, with SPICE unavailable (an empty jar directory), capturing the notices."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: the real evaluation needs a Java runtime")
    predictions, references = first_vs_rest
    empty_lib = tmp_path_factory.mktemp("no_spice_jars")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coco_eval, "_notices_shown", set())
        mp.setattr(coco_eval, "spice_status", lambda: spice_status(empty_lib))
        with contextlib.redirect_stderr(stderr):
            metrics, per_image = language_eval(predictions, references, return_per_image=True)
    return metrics, per_image, stderr.getvalue()


@pytest.fixture(scope="module")
def ptb_tokens(first_vs_rest):
    """The predictions and references through pycocoevalcap's PTB tokenizer, as the evaluation sees them."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: the PTB tokenizer needs a Java runtime")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions, references = first_vs_rest
    tok = PTBTokenizer()
    refs = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    hyps = tok.tokenize({p["image_id"]: [{"caption": p["caption"]}] for p in predictions})
    ids = [p["image_id"] for p in predictions]
    return ids, [hyps[i][0].split() for i in ids], [[r.split() for r in refs[i]] for i in ids]


# ---- the real run ------------------------------------------------------------------------------------------


def test_metrics_without_spice(evaluated):
    metrics, per_image, stderr = evaluated
    assert set(metrics) == ALL_BUT_SPICE  # the SPICE skip path: no SPICE key ...
    assert stderr.count("SPICE skipped: Stanford CoreNLP 3.6.0 not found") == 1  # ... and one notice
    assert "stanford-corenlp-3.6.0-models.jar" in stderr
    assert 1 > metrics["Bleu_1"] > metrics["Bleu_2"] > metrics["Bleu_3"] > metrics["Bleu_4"] > 0
    # human captions against the other humans: coco-caption's scale, CIDEr around 0.9, not around 90
    assert 0.5 < metrics["CIDEr"] < 1.5 and 0.15 < metrics["METEOR"] < 0.4 and 0.3 < metrics["ROUGE_L"] < 0.7
    assert len(per_image) == N_IMAGES and all(set(s) == ALL_BUT_SPICE for s in per_image.values())
    assert all(v == 0 for v in per_image[max(per_image)].values())  # the empty prediction
    for name in ("CIDEr", "ROUGE_L"):  # corpus scores that are means of the per-image scores
        assert np.mean([s[name] for s in per_image.values()]) == pytest.approx(metrics[name], abs=1e-12)


def test_cider_equals_our_cider_d_on_ptb_tokens(evaluated, ptb_tokens):
    metrics, per_image, _ = evaluated
    ids, hyps, refs = ptb_tokens
    ours = CiderD.from_corpus(refs)(hyps, refs)
    np.testing.assert_allclose(ours, [per_image[i]["CIDEr"] for i in ids], rtol=0, atol=1e-9)
    assert ours.mean() == pytest.approx(metrics["CIDEr"], abs=1e-9)


def _closest(ref_lens: list[int], hyp_len: int) -> int:
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))  # coco-caption's "closest", ties to the shorter


def test_bleu_1_equals_a_direct_count(evaluated, ptb_tokens):
    metrics, per_image, _ = evaluated
    ids, hyps, refs = ptb_tokens
    matches = guesses = ref_total = 0
    for i, hyp, rs in zip(ids, hyps, refs, strict=True):
        max_ref = Counter()
        for r in rs:
            max_ref |= Counter(r)
        clipped = sum(min(n, max_ref[w]) for w, n in Counter(hyp).items())
        closest = _closest([len(r) for r in rs], len(hyp))
        if hyp:
            brevity = math.exp(1 - closest / len(hyp)) if len(hyp) < closest else 1.0
            assert per_image[i]["Bleu_1"] == pytest.approx(clipped / len(hyp) * brevity, abs=1e-6)
        matches, guesses, ref_total = matches + clipped, guesses + len(hyp), ref_total + closest
    corpus = matches / guesses * (math.exp(1 - ref_total / guesses) if guesses < ref_total else 1.0)
    assert metrics["Bleu_1"] == pytest.approx(corpus, abs=1e-6)


# ---- without running Java ----------------------------------------------------------------------------------


def test_missing_java_gives_a_clear_error(monkeypatch, tmp_path, first_vs_rest):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(JavaNotFoundError, match=r"^Java not found: METEOR and the PTB tokenizer need a Java "
                                                r"runtime \(java on PATH\)"):
        check_java()
    predictions, references = first_vs_rest
    with pytest.raises(JavaNotFoundError, match="Java not found"):
        language_eval(predictions[:3], references)


def test_check_java_finds_a_working_java():
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    assert Path(check_java()).name.startswith("java")


def test_prediction_without_references_names_the_image():
    with pytest.raises(ValueError, match="image 42 has no references"):
        language_eval([{"image_id": 7, "caption": "a dog"}, {"image_id": 42, "caption": "a cat"}],
                      {7: ["a dog on a bed"]})


@pytest.mark.parametrize("predictions, message", [
    ([{"image_id": 7}], "predictions\\[0\\] has no field 'caption'"),
    ([{"caption": "a dog"}], "predictions\\[0\\] has no field 'image_id'"),
    ([{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": "b"}], "image 7 has two predictions"),
    ([], "predictions is empty"),
])
def test_bad_predictions(predictions, message):
    with pytest.raises(ValueError, match=message):
        language_eval(predictions, {7: ["a dog on a bed"]})
    with pytest.raises(TypeError, match="'caption'\\] must be a str"):
        language_eval([{"image_id": 7, "caption": ["a", "dog"]}], {7: ["a dog"]})


def test_spice_status_looks_for_both_jars(tmp_path):
    available, why = spice_status(tmp_path)
    assert not available
    assert why.startswith("SPICE skipped") and "stanford-corenlp-3.6.0.jar" in why and "-models.jar" in why
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    assert "stanford-corenlp-3.6.0.jar," not in spice_status(tmp_path)[1]
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert spice_status(tmp_path) == (True, "")


def test_spice_required_but_missing_raises(monkeypatch, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    monkeypatch.setattr(coco_eval, "spice_status", lambda: spice_status(tmp_path))
    with pytest.raises(RuntimeError, match="SPICE requested \\(spice=True\\) but cannot run"):
        language_eval([{"image_id": 7, "caption": "a dog"}], {7: ["a dog on a bed"]}, spice=True)


def test_notice_is_printed_once(monkeypatch, capsys):
    monkeypatch.setattr(coco_eval, "_notices_shown", set())
    coco_eval._notice("SPICE skipped: because")
    coco_eval._notice("SPICE skipped: because")
    assert capsys.readouterr().err == "SPICE skipped: because\n"


def test_format_table():
    table = format_table({"CIDEr": 1.28346, "Bleu_4": 0.3914, "SPICE": 0.2268, "Bleu_1": 0.8055,
                          "extra": 2.0})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "score"]
    assert [line.split()[0] for line in lines[2:]] == ["Bleu_1", "Bleu_4", "CIDEr", "SPICE", "extra"]
    assert "CIDEr   1.2835" in table and "Bleu_4  0.3914" in table
