"""`aoanet-data bu`: bottom-up TSV lines -> cocobu_att/fc/box, re-run skipping, and truncated lines."""

import base64
import os

import numpy as np
import pytest
from test_data_support import run_cli

from aoanet.data.bottom_up import convert_tsv
from aoanet.data.errors import DataError

F = 16


def tsv_line(image_id: int, feats: np.ndarray, boxes: np.ndarray, num_boxes: int | None = None) -> str:
    b64 = lambda a: base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode()
    k = len(feats) if num_boxes is None else num_boxes
    return "\t".join([str(image_id), "640", "480", str(k), b64(boxes), b64(feats)]) + "\n"


@pytest.fixture
def images():
    rng = np.random.default_rng(3)
    return {
        iid: (rng.random((k, F), dtype=np.float32), rng.random((k, 4), dtype=np.float32) * 400)
        for iid, k in ((391895, 10), (522418, 36), (184613, 100))
    }


def test_convert_two_files_then_skip_on_rerun(tmp_path, images):
    ids = list(images)
    (tmp_path / "a.tsv").write_text("".join(tsv_line(i, *images[i]) for i in ids[:2]))
    (tmp_path / "b.tsv").write_text(tsv_line(ids[2], *images[ids[2]]))
    # --tsv FILE... : several files after one flag
    r = run_cli("bu", "--tsv", tmp_path / "a.tsv", tmp_path / "b.tsv", "--out", tmp_path / "data")
    assert r.exit_code == 0, r.output
    for iid, (feat, boxes) in images.items():
        with np.load(tmp_path / "data/cocobu_att" / f"{iid}.npz") as z:
            assert z.files == ["feat"]
            np.testing.assert_array_equal(z["feat"], feat)
            assert z["feat"].dtype == np.float32
        np.testing.assert_allclose(np.load(tmp_path / "data/cocobu_fc" / f"{iid}.npy"), feat.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(np.load(tmp_path / "data/cocobu_box" / f"{iid}.npy"), boxes)
    att = tmp_path / "data/cocobu_att" / f"{ids[0]}.npz"
    before = att.stat().st_mtime_ns
    os.remove(tmp_path / "data/cocobu_box" / f"{ids[1]}.npy")  # an interrupted earlier run
    stats = convert_tsv(
        [tmp_path / "a.tsv", tmp_path / "b.tsv"],
        *(tmp_path / "data" / s for s in ("cocobu_att", "cocobu_fc", "cocobu_box")),
    )
    assert (stats["converted"], stats["skipped"]) == (1, 2)
    assert att.stat().st_mtime_ns == before
    assert (tmp_path / "data/cocobu_box" / f"{ids[1]}.npy").exists()
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_seed_style_flags(tmp_path, images):
    iid = next(iter(images))
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats/karpathy_test.tsv").write_text(tsv_line(iid, *images[iid]))
    r = run_cli("bu", "--downloaded_feats", tmp_path / "feats", "--output_dir", tmp_path / "cocobu")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cocobu_att" / f"{iid}.npz").exists() and (tmp_path / "cocobu_box" / f"{iid}.npy").exists()


def test_truncated_line_names_file_line_and_image(tmp_path, images):
    (a, (fa, ba)), (b, (fb, bb)) = list(images.items())[:2]
    good = tsv_line(a, fa, ba)
    cut = tsv_line(b, fb, bb)[:-900]  # the features field loses its tail (and the newline)
    (tmp_path / "t.tsv").write_text(good + cut)
    with pytest.raises(DataError) as e:
        convert_tsv([tmp_path / "t.tsv"], tmp_path / "att", tmp_path / "fc", tmp_path / "box")
    msg = str(e.value)
    assert f"t.tsv:2, image id {b}" in msg and "truncated" in msg
    assert (tmp_path / "att" / f"{a}.npz").exists() and not (tmp_path / "att" / f"{b}.npz").exists()
    r = run_cli("bu", "--tsv", tmp_path / "t.tsv", "--out", tmp_path / "d")
    assert r.exit_code == 1 and f"image id {b}" in r.output


def test_num_boxes_disagreeing_with_arrays(tmp_path, images):
    iid, (feat, boxes) = next(iter(images.items()))
    (tmp_path / "t.tsv").write_text(tsv_line(iid, feat, boxes, num_boxes=len(feat) + 1))
    with pytest.raises(DataError, match=rf"t.tsv:1, image id {iid}: field 'boxes' has {4 * len(feat)} values"):
        convert_tsv([tmp_path / "t.tsv"], tmp_path / "att", tmp_path / "fc", tmp_path / "box")


def test_width_must_agree_across_lines(tmp_path, images):
    (a, (fa, ba)), (b, (fb, bb)) = list(images.items())[:2]
    (tmp_path / "t.tsv").write_text(tsv_line(a, fa, ba) + tsv_line(b, fb[:, :8], bb))
    with pytest.raises(DataError, match=rf"t.tsv:2, image id {b}: field 'features'"):
        convert_tsv([tmp_path / "t.tsv"], tmp_path / "att", tmp_path / "fc", tmp_path / "box")
