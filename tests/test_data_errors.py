"""Bad input gives a clear error naming the file and the image id; `check` lists every problem at once."""

import json
import multiprocessing as mp
import os

import h5py
import numpy as np
import pytest
from test_data_support import ids_in, run_cli, tiny_dataset, write_features

from aoanet.data.check import check_data_dir
from aoanet.data.errors import DataError
from aoanet.data.loader import CaptionData, build_loader

F = 8


@pytest.fixture
def tiny(tmp_path):
    return tiny_dataset(tmp_path, captions_per_image=(5, 5, 5, 5, 5, 5, 5, 5), feat_dim=F)


def data_of(d, width=F):
    return CaptionData(d / "cocotalk.json", d / "cocotalk_label.h5", d / "cocobu_att", att_feat_size=width)


def first_error(d, width=F, workers=0) -> str:
    with build_loader(data_of(d, width), "train", batch_size=2, num_workers=workers) as loader:
        with pytest.raises(DataError) as e:
            list(loader)
    return str(e.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_missing_feature_file(tiny, workers):
    (tiny / "cocobu_att/100.npz").unlink()
    msg = first_error(tiny, workers=workers)
    assert "cocobu_att/100.npz (image id 100): feature file missing" in msg


def test_npz_without_feat(tiny):
    np.savez_compressed(tiny / "cocobu_att/101.npz", features=np.ones((3, F), np.float32))
    assert "101.npz (image id 101): no array 'feat' in the npz (has: features)" in first_error(tiny)


def test_corrupt_npz(tiny):
    (tiny / "cocobu_att/100.npz").write_bytes(b"PK\x03\x04 not really a zip")
    assert "100.npz (image id 100): cannot read feature file" in first_error(tiny, workers=1)


def test_width_disagrees_with_config(tiny):
    msg = first_error(tiny, width=2048)
    assert "(image id 10" in msg and f"feature width {F} disagrees with att_feat_size=2048" in msg


def test_h5_that_disagrees_with_json(tiny):
    talk = json.loads((tiny / "cocotalk.json").read_text())
    talk["images"].append({"split": "train", "file_path": "x/extra.jpg", "id": 999})
    (tiny / "cocotalk.json").write_text(json.dumps(talk))
    with pytest.raises(DataError, match=r"label_start_ix' has shape \(8,\) but .*cocotalk.json lists 9 images"):
        data_of(tiny)


def test_token_outside_vocabulary(tiny):
    with h5py.File(tiny / "cocotalk_label.h5", "a") as f:
        f["labels"][7, 0] = 5000  # row 7 belongs to image 101 (rows 5..9)
    with pytest.raises(DataError, match=r"image id 101: label row\(s\) 7: token id above the vocabulary size"):
        data_of(tiny)


def test_check_reports_every_problem(tiny):
    (tiny / "cocobu_att/100.npz").unlink()  # missing att
    np.savez_compressed(tiny / "cocobu_att/101.npz", x=np.ones((4, F), np.float32))  # no 'feat'
    write_features(tiny, 102, np.ones((5, F + 1), np.float32))  # wrong width (att and fc)
    np.save(tiny / "cocobu_box/103.npy", np.zeros((2, 4), np.float32))  # box count != 6 regions
    (tiny / "cocobu_fc/104.npy").unlink()  # missing fc
    with h5py.File(tiny / "cocotalk_label.h5", "a") as f:
        f["label_end_ix"][5] = 10**6  # pointer past the labels for image 105
    r = run_cli("check", tiny, "--att-feat-size", F)
    assert r.exit_code == 1
    out = r.output
    assert ids_in(out) == {100, 101, 102, 103, 104, 105}
    assert "cocotalk_label.h5: image id 105: label_start_ix=26 label_end_ix=1000000" in out
    assert "cocobu_att/100.npz: image id 100: feature file missing" in out
    assert "cocobu_att/101.npz: image id 101: no array 'feat'" in out
    assert f"cocobu_att/102.npz: image id 102: feature width {F + 1} disagrees with att_feat_size={F}" in out
    assert f"cocobu_fc/102.npy: image id 102: fc feature has shape ({F + 1},), expected ({F},)" in out
    assert "cocobu_box/103.npy: image id 103: boxes have shape (2, 4), expected (6, 4)" in out
    assert "cocobu_fc/104.npy: image id 104: file missing" in out
    assert "7 problem(s) found" in out
    # the library call returns the same list
    problems, _ = check_data_dir(tiny, att_feat_size=F)
    assert len(problems) == 7 and {p.image_id for p in problems} == {100, 101, 102, 103, 104, 105}


def test_check_full_decodes_arrays(tiny):
    feat = np.ones((4, F), np.float32)
    feat[1, 2] = np.nan
    write_features(tiny, 101, feat)
    assert run_cli("check", tiny).exit_code == 0  # headers are fine
    r = run_cli("check", tiny, "--full")
    assert r.exit_code == 1 and "image id 101" in r.output and "NaN" in r.output


def test_check_compares_raw_dataset_json(tiny):
    raw = json.loads((tiny / "dataset_coco.json").read_text())
    raw["images"][2]["sentences"].pop()
    (tiny / "dataset_coco.json").write_text(json.dumps(raw))
    r = run_cli("check", tiny)
    assert r.exit_code == 1 and "dataset_coco.json: image id 102: 4 captions but the label h5 has 5 rows" in r.output


def _die(ixs, seed, epoch):
    os._exit(3)  # a worker killed mid-batch (out of memory, a segfault in a codec ...)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the patched worker is inherited via fork")
def test_dead_worker_is_an_error_not_a_hang(tiny, monkeypatch):
    import aoanet.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "_worker_batch", _die)  # inherited by the forked workers
    with build_loader(data_of(tiny), "train", batch_size=2, num_workers=1, timeout=60) as loader:
        with pytest.raises(DataError, match=r"loader worker process died while loading image ids \[10"):
            list(loader)
