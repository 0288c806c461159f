"""`aoanet-data prepro` on real COCO captions, checked against an independent computation of the reference
formats (vocabulary, UNK mapping, truncation, 1-based inclusive pointers)."""

import json
from collections import Counter

import h5py
import numpy as np
import pytest
from test_data_support import COCO_CAPTIONS, karpathy_from_coco, run_cli

from aoanet.data.errors import DataError
from aoanet.data.prepro import prepro_labels

THRESHOLD, MAX_LEN = 5, 16


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    dataset = karpathy_from_coco(COCO_CAPTIONS)
    (d / "dataset_coco.json").write_text(json.dumps(dataset))
    # Seed-style flags and the seed's h5 prefix convention: --output_h5 PREFIX writes PREFIX_label.h5.
    r = run_cli(
        "prepro",
        "--input_json",
        d / "dataset_coco.json",
        "--output_json",
        d / "cocotalk.json",
        "--output_h5",
        d / "cocotalk",
        "--word_count_threshold",
        THRESHOLD,
        "--max_length",
        MAX_LEN,
    )
    assert r.exit_code == 0, r.output
    with h5py.File(d / "cocotalk_label.h5") as f:
        h5 = {k: f[k][()] for k in f}
        dtypes = {k: f[k].dtype for k in f}
    return dataset, json.loads((d / "cocotalk.json").read_text()), h5, dtypes


def test_vocabulary_matches_independent_count(coco):
    dataset, talk, _, _ = coco
    counts = Counter(t for img in dataset["images"] for s in img["sentences"] for t in s["tokens"])
    expected = sorted((w for w, c in counts.items() if c > THRESHOLD), key=lambda w: (-counts[w], w))
    vocab = talk["ix_to_word"]
    assert list(vocab) == [str(i) for i in range(1, len(vocab) + 1)]  # 1-based, no gaps
    assert [vocab[str(i)] for i in range(1, len(vocab))] == expected
    assert vocab[str(len(vocab))] == "UNK"
    # Real text has a long tail: several hundred words survive in 2,500 captions, many more are rare.
    assert 400 < len(vocab) < len(counts) / 2


def test_labels_unk_truncation_and_pointers(coco):
    dataset, talk, h5, dtypes = coco
    vocab = talk["ix_to_word"]
    w2i = {w: int(i) for i, w in vocab.items()}
    unk = len(vocab)
    counts = Counter(t for img in dataset["images"] for s in img["sentences"] for t in s["tokens"])
    assert all(dtypes[k] == np.uint32 for k in ("labels", "label_start_ix", "label_end_ix", "label_length"))
    labels = h5["labels"]
    assert labels.shape == (sum(len(img["sentences"]) for img in dataset["images"]), MAX_LEN)
    row, n_unk, n_cut = 0, 0, 0
    for i, img in enumerate(dataset["images"]):
        n = len(img["sentences"])
        assert (h5["label_start_ix"][i], h5["label_end_ix"][i]) == (row + 1, row + n)  # 1-based inclusive
        for s in img["sentences"]:
            toks = s["tokens"]
            want = [w2i[t] if counts[t] > THRESHOLD else unk for t in toks[:MAX_LEN]]
            assert labels[row, : len(want)].tolist() == want
            assert not labels[row, len(want) :].any()
            assert h5["label_length"][row] == min(MAX_LEN, len(toks))
            n_unk += sum(w == unk for w in want)
            n_cut += len(toks) > MAX_LEN
            row += 1
    assert row == labels.shape[0]
    assert n_unk > 0 and n_cut > 0  # the data exercises both the UNK mapping and the truncation
    full = labels[:, -1] != 0
    assert full.sum() >= n_cut  # a caption of >= 16 tokens has no terminating 0


def test_images_in_cocotalk(coco):
    dataset, talk, _, _ = coco
    assert [im["id"] for im in talk["images"]] == [im["cocoid"] for im in dataset["images"]]
    assert [im["split"] for im in talk["images"]] == [im["split"] for im in dataset["images"]]
    first = talk["images"][0]
    assert first["file_path"] == f"val2017/{dataset['images'][0]['filename']}"
    assert set(first) == {"split", "file_path", "id"}


def test_vocab_order_is_independent_of_image_order(tmp_path):
    images = [
        {
            "cocoid": i,
            "split": "train",
            "filename": f"{i}.jpg",
            "sentences": [{"tokens": toks.split(), "sentid": i}],
        }
        for i, toks in enumerate(["b a", "c a", "b c a", "d"])
    ]
    outs = []
    for name, imgs in (("fwd", images), ("rev", images[::-1])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": imgs}))
        prepro_labels(
            tmp_path / f"{name}.json",
            tmp_path / f"{name}_talk.json",
            tmp_path / f"{name}.h5",
            word_count_threshold=0,
        )
        outs.append(json.loads((tmp_path / f"{name}_talk.json").read_text())["ix_to_word"])
    # counts a=3, b=2, c=2, d=1: descending count, ties alphabetical, UNK last
    assert outs[0] == outs[1] == {"1": "a", "2": "b", "3": "c", "4": "d", "5": "UNK"}


def test_empty_caption_names_the_image_and_writes_nothing(tmp_path):
    images = [
        {"cocoid": 7, "split": "train", "filename": "7.jpg", "sentences": [{"tokens": ["a"], "sentid": 0}]},
        {
            "cocoid": 42,
            "split": "val",
            "filename": "42.jpg",
            "sentences": [{"tokens": ["a", "b"], "sentid": 1}, {"tokens": [], "raw": "", "sentid": 2}],
        },
    ]
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps({"images": images}))
    with pytest.raises(DataError, match=r"dataset_coco.json: image id 42 .*sentence 2: empty caption"):
        prepro_labels(src, tmp_path / "talk.json", tmp_path / "label.h5")
    assert not (tmp_path / "talk.json").exists() and not (tmp_path / "label.h5").exists()
    r = run_cli("prepro", "--input-json", src, "--output-json", tmp_path / "t.json", "--output-h5", tmp_path / "l.h5")
    assert r.exit_code == 1 and "image id 42" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"split": "dev"}, "split"),
        ({"sentences": []}, "sentences"),
        ({"cocoid": "x1"}, "cocoid"),
        ({"sentences": [{"tokens": ["two words"]}]}, "tokens"),
    ],
)
def test_malformed_fields_are_named(tmp_path, bad, field):
    img = {"cocoid": 5, "split": "train", "filename": "5.jpg", "sentences": [{"tokens": ["a"], "sentid": 0}]}
    img.update(bad)
    (tmp_path / "d.json").write_text(json.dumps({"images": [img]}))
    with pytest.raises(DataError, match=field) as e:
        prepro_labels(tmp_path / "d.json", tmp_path / "t.json", tmp_path / "l.h5")
    assert "d.json" in str(e.value)
