"""The loader: one epoch's shapes and masks against the files, workers, exact resume, reshuffle, sharding."""

import json

import h5py
import numpy as np
import pytest
from test_data_support import prepare, tiny_dataset

from aoanet.data.loader import CaptionData, build_loader
from aoanet.data.sampler import epoch_batches
from aoanet.data.synth import make_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    make_synth(d, images=60, seed=11)
    prepare(d)
    return d


def open_data(d, **kw):
    return CaptionData(
        d / "cocotalk.json", d / "cocotalk_label.h5", d / "cocobu_att", att_feat_size=kw.pop("F", 128), **kw
    )


def same_batch(a, b):
    assert a["image_ids"] == b["image_ids"] and a["ix"] == b["ix"]
    for k in ("att_feats", "att_masks", "labels", "masks"):
        np.testing.assert_array_equal(a[k], b[k])
    for x, y in zip(a["gts"], b["gts"], strict=True):
        np.testing.assert_array_equal(x, y)


def test_one_epoch_against_the_files(synth):
    data = open_data(synth)
    talk = json.loads((synth / "cocotalk.json").read_text())
    with h5py.File(synth / "cocotalk_label.h5") as f:
        labels, start, end = f["labels"][()], f["label_start_ix"][()], f["label_end_ix"][()]
    assert data.vocab == talk["ix_to_word"] and data.vocab_size == len(talk["ix_to_word"]) and data.seq_length == 16
    train_ix = data.split_ix("train")
    assert train_ix == [i for i, im in enumerate(talk["images"]) if im["split"] in ("train", "restval")]
    loader = build_loader(data, "train", batch_size=8, seed=3, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 7  # 52 images: 6 x 8 + 4, last partial batch kept
    assert sorted(i for b in batches for i in b["ix"]) == train_ix  # each training image once
    for b in batches:
        n = len(b["ix"])
        assert b["att_feats"].dtype == np.float32 and b["att_masks"].dtype == np.float32
        assert b["labels"].dtype == np.int64 and b["masks"].dtype == np.float32
        assert b["labels"].shape == b["masks"].shape == (n * 5, 18)
        assert b["image_ids"] == [talk["images"][i]["id"] for i in b["ix"]]
        for j, (ix, iid) in enumerate(zip(b["ix"], b["image_ids"], strict=True)):
            with np.load(synth / "cocobu_att" / f"{iid}.npz") as z:
                feat = z["feat"]
            k = len(feat)
            np.testing.assert_array_equal(b["att_feats"][j, :k], feat)
            assert not b["att_feats"][j, k:].any()
            assert b["att_masks"][j].tolist() == [1.0] * k + [0.0] * (b["att_feats"].shape[1] - k)
            rows = labels[start[ix] - 1 : end[ix]]
            np.testing.assert_array_equal(b["gts"][j], rows)
            mine = b["labels"][j * 5 : (j + 1) * 5]
            assert (mine[:, 0] == 0).all() and (mine[:, 17] == 0).all()
            # a contiguous window of 5 of the image's rows (it has exactly 5 here: all of them, in order)
            np.testing.assert_array_equal(mine[:, 1:17], rows)
        assert b["att_feats"].shape[1] == int(b["att_masks"].sum(1).max())  # padded to the largest K
        nonzero = (b["labels"] != 0).sum(1)
        for row, m in zip(nonzero, b["masks"], strict=True):
            assert m.tolist() == [1.0] * (row + 2) + [0.0] * (18 - row - 2)


def test_workers_give_the_same_batches(synth):
    data = open_data(synth)
    ref = list(build_loader(data, "train", batch_size=8, seed=3, num_workers=0))
    with build_loader(data, "train", batch_size=8, seed=3, num_workers=2) as loader:
        got = list(loader)
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        same_batch(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_epoch(synth, workers):
    data = open_data(synth)
    loader = build_loader(data, "train", batch_size=8, seed=9, num_workers=workers, epoch=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # it survives a JSON checkpoint
    assert (state["epoch"], state["position"]) == (2, 3)
    rest = list(it)
    assert loader.epoch == 3 and loader.position == 0  # a finished epoch moves on to the next
    fresh = build_loader(data, "train", batch_size=8, seed=0, num_workers=workers)
    fresh.set_state_dict(state)
    fresh.set_epoch(2)  # the trainer's usual call does not lose the restored position
    resumed = list(fresh)
    assert len(resumed) == len(rest) == 4
    for a, b in zip(rest, resumed, strict=True):
        same_batch(a, b)
    loader.close()
    fresh.close()


def test_state_from_another_loader_is_refused(synth):
    data = open_data(synth)
    state = build_loader(data, "train", batch_size=8, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="batch_size 8 vs 4"):
        build_loader(data, "train", batch_size=4, num_workers=0).set_state_dict(state)


def test_epoch_reshuffle_is_deterministic(synth):
    data = open_data(synth)
    order = lambda seed, epoch: [
        i for b in build_loader(data, "train", batch_size=8, seed=seed, num_workers=0, epoch=epoch) for i in b["ix"]
    ]
    e0, e1 = order(1, 0), order(1, 1)
    assert e0 == order(1, 0) and e1 == order(1, 1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 != order(2, 0)
    assert e0 != sorted(e0)  # epoch 0 is shuffled too


def test_eval_split_in_file_order_without_dropping(synth):
    data = open_data(synth)
    val = data.split_ix("val")
    batches = list(build_loader(data, "val", batch_size=3, num_workers=0))
    assert [i for b in batches for i in b["ix"]] == val and len(batches[-1]["ix"]) == len(val) - 3
    again = list(build_loader(data, "val", batch_size=3, num_workers=0, epoch=7))
    assert [b["ix"] for b in again] == [b["ix"] for b in batches]


def test_fewer_captions_than_seq_per_img(tmp_path):
    d = tiny_dataset(tmp_path, captions_per_image=(2, 7, 5, 5), feat_dim=8)
    data = open_data(d, F=8, train_only=False)
    with h5py.File(d / "cocotalk_label.h5") as f:
        labels, start, end = f["labels"][()], f["label_start_ix"][()], f["label_end_ix"][()]
    seen2, starts7 = set(), set()
    for epoch in range(12):
        (b,) = list(build_loader(data, "train", batch_size=2, seed=4, epoch=epoch, num_workers=0))
        for j, ix in enumerate(b["ix"]):
            rows = [tuple(r) for r in labels[start[ix] - 1 : end[ix]]]
            mine = [tuple(r) for r in b["labels"][j * 5 : (j + 1) * 5, 1:17]]
            assert all(r in rows for r in mine)
            if len(rows) == 2:  # sampled with replacement
                seen2.add(tuple(sorted(set(mine))))
            else:  # 7 rows: a contiguous window
                s = rows.index(mine[0])
                assert mine == rows[s : s + 5]
                starts7.add(s)
    assert len(starts7) > 1 and starts7 <= {0, 1, 2}
    assert any(len(x) == 2 for x in seen2)


def test_sharding_covers_each_image_once():
    idx = list(range(23))
    for bs, world in ((4, 2), (3, 3), (5, 4)):
        shards = [
            epoch_batches(idx, bs, shuffle=True, seed=1, epoch=0, rank=r, world_size=world, top_up=True)
            for r in range(world)
        ]
        assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
        flat = [i for s in shards for b in s for i in b]
        assert set(flat) == set(idx) and len(flat) - len(idx) < world
        assert all(len(b) <= bs and b for s in shards for b in s)
    # without top-up (evaluation) nothing is duplicated
    shards = [epoch_batches(idx, 5, shuffle=False, seed=0, epoch=0, rank=r, world_size=4) for r in range(4)]
    assert sorted(i for s in shards for b in s for i in b) == idx
