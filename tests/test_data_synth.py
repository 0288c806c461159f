"""The embedded dataset: formats, determinism, detector-like features, the pipeline on it, the NN baseline and
the n-gram document frequencies."""

import json
from collections import Counter

import numpy as np
import pytest
from test_data_support import prepare, run_cli

from aoanet.data.baseline import nearest_neighbour_captions
from aoanet.data.synth import make_synth, split_sizes
from aoanet.metrics.cider import load_document_frequency

N = 60


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    r = run_cli("synth", "--out", d, "--images", N, "--seed", 5)
    assert r.exit_code == 0, r.output
    return d


def test_karpathy_layout_and_splits(synth_dir):
    data = json.loads((synth_dir / "dataset_coco.json").read_text())
    images = data["images"]
    assert len(images) == N
    assert Counter(im["split"] for im in images) == split_sizes(N) == {"train": 40, "restval": 12, "val": 4, "test": 4}
    sentids = []
    for i, im in enumerate(images):
        assert im["imgid"] == i and isinstance(im["cocoid"], int) and im["filepath"] and im["filename"]
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == i and s["tokens"] and all(t == t.lower() and t.isalpha() for t in s["tokens"])
            assert s["raw"].lower().rstrip(".") == " ".join(s["tokens"])
        assert len({" ".join(s["tokens"]) for s in im["sentences"]}) >= 2  # references disagree
        sentids += im["sentids"]
    assert len(set(sentids)) == len(sentids)
    assert not (synth_dir / "cocotalk.json").exists()  # synth writes nothing prepro makes


def test_features_look_like_a_detectors(synth_dir):
    data = json.loads((synth_dir / "dataset_coco.json").read_text())
    widths, regions, zeros = set(), [], []
    for im in data["images"]:
        iid = im["cocoid"]
        with np.load(synth_dir / "cocobu_att" / f"{iid}.npz") as z:
            feat = z["feat"]
        boxes = np.load(synth_dir / "cocobu_box" / f"{iid}.npy")
        fc = np.load(synth_dir / "cocobu_fc" / f"{iid}.npy")
        assert feat.dtype == np.float32 and (feat >= 0).all()
        assert boxes.shape == (len(feat), 4)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 2].max() <= im["width"] + 1e-3 and boxes[:, 3].max() <= im["height"] + 1e-3
        np.testing.assert_allclose(fc, feat.mean(0), rtol=1e-5, atol=1e-6)
        n_objects = sum(o["count"] for o in im["scene"]["objects"])
        assert len(feat) > n_objects  # distractor regions besides one region per object
        widths.add(feat.shape[1])
        zeros.append((feat == 0).mean())
        regions.append(len(feat))
    assert widths == {128} and min(regions) >= 10 and max(regions) <= 100
    assert 0.3 < np.mean(zeros) < 0.7  # ReLU-like: about half the activations are exactly zero


def test_deterministic_for_a_seed(tmp_path, synth_dir):
    make_synth(tmp_path / "same", images=N, seed=5)
    make_synth(tmp_path / "other", images=N, seed=6)
    a = json.loads((synth_dir / "dataset_coco.json").read_text())
    assert json.loads((tmp_path / "same/dataset_coco.json").read_text()) == a
    assert json.loads((tmp_path / "other/dataset_coco.json").read_text()) != a
    for iid in (1, N // 2, N):
        with (
            np.load(synth_dir / f"cocobu_att/{iid}.npz") as x,
            np.load(tmp_path / f"same/cocobu_att/{iid}.npz") as y,
        ):
            np.testing.assert_array_equal(x["feat"], y["feat"])
        np.testing.assert_array_equal(
            np.load(synth_dir / f"cocobu_box/{iid}.npy"), np.load(tmp_path / f"same/cocobu_box/{iid}.npy")
        )


def test_captions_follow_the_scene(synth_dir):
    """Every caption names the main object (or its synonym), and relation words agree with the scene."""
    from aoanet.data.synth_world import CLASSES

    names = {c.name: {c.name, c.plural, *(w for pair in c.synonyms for w in pair)} for c in CLASSES}
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for im in json.loads((synth_dir / "dataset_coco.json").read_text())["images"]:
        scene = im["scene"]
        main = names[scene["objects"][0]["class"]]
        for s in im["sentences"]:
            toks = s["tokens"]
            assert main & set(toks), (toks, scene)
            if "relation" in scene and {"left", "right"} & set(toks):
                # "X to the left of Y": X is group 0 or 1; the word must fit the order of mention
                first = next(t for t in toks if t in set().union(*names.values()))
                said = "left" if "left" in toks else "right"
                assert said == (scene["relation"] if first in main else opposite[scene["relation"]]), toks


def test_pipeline_prepro_check_on_synth(synth_dir):
    prepare(synth_dir)
    talk = json.loads((synth_dir / "cocotalk.json").read_text())
    assert 60 <= len(talk["ix_to_word"]) <= 300 and talk["ix_to_word"][str(len(talk["ix_to_word"]))] == "UNK"
    r = run_cli("check", synth_dir, "--att-feat-size", 128)
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "feat_dim               128" in r.output


def test_nearest_neighbour_baseline(synth_dir):
    data = json.loads((synth_dir / "dataset_coco.json").read_text())
    test = [im for im in data["images"] if im["split"] == "test"]
    train = [im for im in data["images"] if im["split"] in ("train", "restval")]
    preds = nearest_neighbour_captions(synth_dir, synth_dir / "cocobu_fc", split="test")
    assert [p["image_id"] for p in preds] == [im["cocoid"] for im in test]
    fc = lambda im: np.load(synth_dir / "cocobu_fc" / f"{im['cocoid']}.npy").astype(np.float64)
    train_fc = np.stack([fc(im) for im in train])
    for p, im in zip(preds, test, strict=True):
        j = int(np.argmin(((train_fc - fc(im)) ** 2).sum(1)))  # brute force, independent of the module
        assert p["caption"] == " ".join(train[j]["sentences"][0]["tokens"])
    assert nearest_neighbour_captions(synth_dir / "dataset_coco.json", synth_dir / "cocobu_fc", "val")


def test_ngrams_document_frequencies(synth_dir):
    prepare(synth_dir)
    out = synth_dir / "coco-train-ngrams.json.gz"
    r = run_cli(
        "ngrams",
        "--input_json",
        synth_dir / "dataset_coco.json",
        "--dict_json",
        synth_dir / "cocotalk.json",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    df, ref_len = load_document_frequency(out)
    data = json.loads((synth_dir / "dataset_coco.json").read_text())
    w2i = {w: int(i) for i, w in json.loads((synth_dir / "cocotalk.json").read_text())["ix_to_word"].items()}
    train = [im for im in data["images"] if im["split"] in ("train", "restval")]
    assert ref_len == len(train) == 52
    assert df[(0,)] == len(train)  # EOS ends every reference
    # independent count of a few n-grams, untruncated, EOS appended, one count per image
    unk = w2i["UNK"]
    refs = [[tuple(w2i.get(t, unk) for t in s["tokens"]) + (0,) for s in im["sentences"]] for im in train]
    assert any(unk in r for img in refs for r in img)  # the small set has rare words: they count as UNK
    for gram in [(w2i["a"],), (w2i["to"], w2i["the"]), (w2i["of"], w2i["a"]), refs[0][0][-4:]]:
        want = sum(any(gram == r[i : i + len(gram)] for r in img for i in range(len(r))) for img in refs)
        assert df.get(gram, 0) == want > 0
    assert max(len(g) for g in df) == 4
