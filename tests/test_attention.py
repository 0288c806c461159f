"""Where the model looks: the decoder's attention weights through the export, the runtime's search (both backends),
``Captioner.caption(..., return_attention=True)`` and ``aoanet-infer --attention``, and the pictures drawn from them.

The weights are checked against independent computations: ONNX against the Paddle model (1e-4), the weights the
search carried against a re-run of the decoder along the chosen caption, one image at a time; and they sum to 1
over each image's regions and are exactly 0 on its padding.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import paddle
import pytest
from PIL import Image
from test_images import write_pool_extractor
from test_runtime import F, R, make_checkpoint, random_batch

from aoanet.model import build_model
from aoanet.model.layers import mask_to_bias
from aoanet.train.checkpoint import load_model, save_model_dir
from aoanet_export import export_checkpoint
from aoanet_export.onnx_convert import prune_unused
from aoanet_runtime import Captioner, ExportDirError
from aoanet_runtime import cli as infer_cli
from aoanet_runtime.attention import attention_record, colormap, draw_attention, grid_shape, weight_map
from aoanet_runtime.contract import MANIFEST
from aoanet_runtime.exportdir import sha256_file
from aoanet_runtime.extractor import cell_boxes

HEADS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "run")


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "aoanet"
    export_checkpoint(checkpoint, out)
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0]


@pytest.fixture(scope="module")
def captioner(export_dir) -> Captioner:
    return Captioner.from_dir(export_dir)


def lengths_of(seqs: np.ndarray) -> np.ndarray:
    """Tokens per caption including its EOS (max_length when it has none)."""
    ended = seqs == 0
    return np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, seqs.shape[1])


def assert_valid_weights(attention: np.ndarray, seqs: np.ndarray, masks: np.ndarray) -> None:
    """[B, T, heads, N]: each chosen token's weights sum to 1 over the image's regions, are exactly 0 on its
    padding, and every position after the caption's EOS is 0."""
    for b, n in enumerate(lengths_of(seqs)):
        valid = masks[b] > 0
        np.testing.assert_allclose(attention[b, :n][..., valid].sum(axis=-1), 1.0, atol=1e-5)
        assert not attention[b, :n][..., ~valid].any()
        assert not attention[b, n:].any()


# ---------------------------------------------------------------------------------------------- both backends
@pytest.mark.parametrize("beam_size", [1, 2, 3])
def test_onnx_weights_equal_paddles(model, captioner, beam_size):
    feats, masks = random_batch(4)
    onnx_res = captioner.decode(feats, masks, beam_size, return_attention=True)
    paddle_res = model.decode(paddle.to_tensor(feats), paddle.to_tensor(masks), beam_size=beam_size,
                              return_attention=True)
    plain = captioner.decode(feats, masks, beam_size)
    np.testing.assert_array_equal(onnx_res.seqs, plain.seqs)  # asking for the weights changes nothing else
    np.testing.assert_array_equal(onnx_res.scores, plain.scores)
    assert plain.attention is None
    np.testing.assert_array_equal(onnx_res.seqs, paddle_res.seqs)
    assert onnx_res.attention.shape == paddle_res.attention.shape == (len(feats), 20, HEADS, feats.shape[1])
    assert np.abs(onnx_res.attention - paddle_res.attention).max() <= 1e-4
    for res in (onnx_res, paddle_res):
        assert_valid_weights(res.attention, res.seqs, masks)
    # not trivially uniform: the heads look at different regions
    assert np.abs(np.diff(onnx_res.attention[0, 0], axis=0)).max() > 0.05


def onnx_replay(captioner: Captioner, feat: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """The ONNX decoder run along ``seq`` for one image alone (BOS, then the caption's tokens; no search, memory
    per row): [len(seq), heads, N] weights, zeros after the EOS."""
    masks = np.ones((1, len(feat)), np.float32)
    mean, values, keys = captioner.encode(feat[None], masks)
    h = c = np.zeros((2, 1, R), np.float32)
    it = np.zeros(1, np.int64)
    out = np.zeros((len(seq), HEADS, len(feat)), np.float32)
    for t, token in enumerate(seq):
        feeds = {"it": it, "state_h": h, "state_c": c, "mean_feats": mean, "att_values": values, "att_keys": keys,
                 "att_masks": masks, "topk": np.array([1], np.int64)}
        _, h, c, att = captioner.decoder.run(["logprobs", "next_state_h", "next_state_c", "attention"], feeds)
        out[t] = att[0]
        if token == 0:
            break
        it = np.array([token], np.int64)
    return out


def paddle_replay(model, feat: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """The same with the Paddle model's own step."""
    mean, p_att = model.encode(paddle.to_tensor(feat[None]), None)
    state = model.init_state(1)
    it = np.zeros(1, np.int64)
    out = np.zeros((len(seq), HEADS, len(feat)), np.float32)
    with paddle.no_grad():
        for t, token in enumerate(seq):
            _, state, att = model.step(paddle.to_tensor(it), state, mean, p_att, None, return_attention=True)
            out[t] = att.numpy()[0]
            if token == 0:
                break
            it = np.array([token], np.int64)
    return out


@pytest.mark.parametrize("beam_size", [1, 3])
def test_carried_weights_equal_a_rerun_of_the_decoder_along_the_caption(model, captioner, beam_size):
    """What the search carried for the chosen caption (reordered, dropped, finished with its beam) equals what the
    decoder gives when it is simply fed that caption, one image at a time, on either backend."""
    feats, masks = random_batch(5, batch=9)
    onnx_res = captioner.decode(feats, masks, beam_size, return_attention=True)
    paddle_res = model.decode(paddle.to_tensor(feats), paddle.to_tensor(masks), beam_size=beam_size,
                              return_attention=True)
    assert len(set(lengths_of(onnx_res.seqs).tolist())) >= 3  # captions of several lengths
    for b in range(len(feats)):
        n = int(masks[b].sum())
        np.testing.assert_allclose(onnx_res.attention[b, :, :, :n], onnx_replay(captioner, feats[b, :n],
                                   onnx_res.seqs[b]), rtol=0, atol=1e-5)
        np.testing.assert_allclose(paddle_res.attention[b, :, :, :n], paddle_replay(model, feats[b, :n],
                                   paddle_res.seqs[b]), rtol=0, atol=1e-5)


def test_caption_returns_tokens_and_each_images_weights(captioner):
    rng = np.random.default_rng(8)
    images = [(np.abs(rng.standard_normal((k, F))) * 2).astype(np.float32) for k in (3, 9, 1, 6, 9, 2)]
    plain = captioner.caption(images, beam_size=2, batch_size=4)
    res = captioner.caption(images, beam_size=2, batch_size=4, return_attention=True)
    assert res.captions == plain.captions and plain.attention is None and plain.tokens is None
    for i, feat in enumerate(images):
        assert " ".join(res.tokens[i]) == res.captions[i]
        assert res.attention[i].shape == (len(res.tokens[i]), HEADS, len(feat))
        np.testing.assert_allclose(res.attention[i].sum(axis=-1), 1.0, atol=1e-5)
        # the same as the image captioned alone
        alone = captioner.caption([feat], beam_size=2, return_attention=True)
        np.testing.assert_allclose(alone.attention[0], res.attention[i], rtol=0, atol=1e-5)
    # a padded array keeps its N regions (0 on the padding); bad endings are stripped from tokens and weights alike
    feats, masks = random_batch(6, batch=8)
    padded = captioner.caption(feats, masks, beam_size=1, return_attention=True, remove_bad_endings=True)
    full = captioner.caption(feats, masks, beam_size=1, return_attention=True)
    for i in range(8):
        assert padded.attention[i].shape == (len(padded.tokens[i]), HEADS, feats.shape[1])
        assert not padded.attention[i][..., masks[i] == 0].any()
        n = len(padded.tokens[i])
        assert padded.tokens[i] == full.tokens[i][:n]
        np.testing.assert_array_equal(padded.attention[i], full.attention[i][:n])


def test_streams_and_device_memory_give_the_same_weights(export_dir, captioner):
    feats, masks = random_batch(7, batch=12)
    want = captioner.caption(feats, masks, beam_size=3, batch_size=4, return_attention=True)
    streams = Captioner.from_dir(export_dir, streams=2)
    device = Captioner.from_dir(export_dir, device_memory=True)
    for other in (streams, device):
        got = other.caption(feats, masks, beam_size=3, batch_size=4, return_attention=True)
        assert got.captions == want.captions
        for a, b in zip(got.attention, want.attention, strict=True):
            np.testing.assert_array_equal(a, b)


def format5_copy(export_dir: Path, dest: Path) -> Path:
    """An export as format 5 wrote it: the decoder without the attention output (the same graph otherwise)."""
    shutil.copytree(export_dir, dest)
    graph = onnx.load(str(dest / "decoder.onnx"))
    kept = [o for o in graph.graph.output if o.name != "attention"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    prune_unused(graph)
    onnx.save(graph, str(dest / "decoder.onnx"))
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["format_version"] = 5
    entry = manifest["files"]["decoder.onnx"]
    entry["sha256"], entry["bytes"] = sha256_file(dest / "decoder.onnx"), (dest / "decoder.onnx").stat().st_size
    entry["outputs"] = [o for o in entry["outputs"] if o["name"] != "attention"]
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def test_an_older_export_captions_as_before_and_says_to_re_export(export_dir, captioner, tmp_path, capsys):
    old_dir = format5_copy(export_dir, tmp_path / "v5")
    old = Captioner.from_dir(old_dir)
    assert captioner.has_attention and not old.has_attention
    feats, masks = random_batch(2)
    assert old.caption(feats, masks, beam_size=2).captions == captioner.caption(feats, masks, beam_size=2).captions
    for call in (lambda: old.caption(feats, masks, return_attention=True),
                 lambda: old.decode(feats, masks, 2, return_attention=True)):
        with pytest.raises(ExportDirError, match="format 5.*re-export"):
            call()
    data = tmp_path / "feats"
    data.mkdir()
    np.save(data / "1.npy", feats[0])
    out = tmp_path / "c.json"
    code, err = run_cli(["--model", str(old_dir), "--features", str(data), "--out", str(out), "--attention",
                         str(tmp_path / "att")], capsys)
    assert code == 1 and "--attention" in err and "re-export" in err
    assert not out.exists() and not (tmp_path / "att").exists()


# ---------------------------------------------------------------------------------------------- drawing
def test_grid_shape_recognises_an_extractors_cells_only():
    for rows, cols in ((7, 7), (3, 4), (1, 1), (1, 5)):
        assert grid_shape(cell_boxes(rows, cols) * np.array([640, 480, 640, 480])) == (rows, cols)
    cells = cell_boxes(3, 4)
    assert grid_shape(cells[np.random.default_rng(0).permutation(12)]) is None  # not row-major
    assert grid_shape(cells[:-1]) is None
    gapped = cells.copy()
    gapped[:, 2] -= 0.01  # cells that do not touch are regions, not a grid
    assert grid_shape(gapped) is None
    assert grid_shape(np.array([[0, 0, 10, 10], [5, 5, 20, 30]])) is None


def test_weight_maps_against_direct_computations():
    # boxes: each filled with its weight, overlaps adding up
    boxes = np.array([[0, 0, 10, 5], [5, 2, 20, 8], [18, 0, 20, 10]], np.float64)
    w = np.array([0.5, 0.3, 0.2], np.float32)
    m = weight_map(w, (20, 10), boxes)
    want = np.zeros((10, 20), np.float32)
    for (x1, y1, x2, y2), v in zip(boxes.astype(int), w):
        want[y1:y2, x1:x2] += v
    np.testing.assert_allclose(m, want, atol=1e-7)
    # a grid: smooth, and through each cell's weight at its centre (9 pixels per cell: centres fall on pixels)
    cell_w = np.random.default_rng(1).dirichlet(np.ones(12)).astype(np.float32)
    grid_boxes = cell_boxes(3, 4) * np.array([36, 27, 36, 27])
    m = weight_map(cell_w, (36, 27), grid_boxes, (3, 4))
    np.testing.assert_allclose(m[4::9, 4::9], cell_w.reshape(3, 4), atol=1e-6)
    assert m.min() >= 0 and len(np.unique(m)) > 100  # interpolated, not 12 flat blocks


def test_colormap_gets_brighter_with_the_weight():
    rgb = colormap(np.linspace(0, 1, 50)).astype(np.float64)
    brightness = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(brightness) > 0)
    assert tuple(colormap(np.array(0.0))) == (0, 0, 4) and tuple(colormap(np.array(1.0))) == (252, 255, 164)


def test_draw_attention_panels_and_where_the_heat_is():
    picture = Image.new("RGB", (280, 210), (128, 128, 128))
    boxes = cell_boxes(3, 4) * np.array([280, 210, 280, 210])
    tokens = ["a", "dog", "on", "grass"]
    weights = np.full((4, 2, 12), 0.01, np.float32)
    hot = [0, 5, 11, 6]  # the cell each token looks at
    for t, cell in enumerate(hot):
        weights[t, :, cell] = 0.89
    img = draw_attention(tokens, weights, picture, boxes, panel=140, columns=5)
    assert img.size[0] == 5 * (140 + 8) + 8  # the picture and four panels in one row
    arr = np.asarray(img).astype(np.float64).sum(axis=2)
    # in each token's panel the brightest point lies in the cell it attended to
    header_h, title_h = 28, 20
    for t, cell in enumerate(hot):
        x0, y0 = 8 + (t + 1) * 148, header_h + title_h
        panel = arr[y0 : y0 + 105, x0 : x0 + 140]
        y, x = np.unravel_index(panel.argmax(), panel.shape)
        assert (y * 3 // 105, x * 4 // 140) == divmod(cell, 4)
    # bars without boxes; a canvas for boxes without a picture
    bars = draw_attention(tokens, weights[:, 0])
    assert bars.size[0] == 4 * (192 + 8) + 8
    canvas = draw_attention(tokens, weights, boxes=np.array([[0, 0, 50, 50]] * 12, np.float64), grid=None)
    assert canvas.size[0] == 5 * (192 + 8) + 8
    with pytest.raises(ValueError, match="boxes must be"):
        draw_attention(tokens, weights, boxes=boxes[:5])
    with pytest.raises(ValueError, match="4 tokens"):
        draw_attention(tokens, weights[:3])


def test_attention_record():
    w = np.random.default_rng(2).dirichlet(np.ones(5), size=(3, 2))
    rec = attention_record(["a", "b", "c"], w, boxes=np.ones((5, 4)), image_id=7)
    assert rec["image_id"] == 7 and rec["regions"] == 5 and rec["heads"] == 2 and rec["drawn_as"] == "boxes"
    np.testing.assert_allclose(rec["attention"], w.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(rec["attention_heads"], w, atol=1e-6)
    assert attention_record(["a"], w[:1, 0])["drawn_as"] == "bars"


# ---------------------------------------------------------------------------------------------- aoanet-infer
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        infer_cli.main([*args, "--no-progress"])
    return exc.value.code or 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The reference layout with boxes: cocotalk.json, cocobu_att/<id>.npz, cocobu_box/<id>.npy (regions of a
    640 x 480 picture), 8 test images."""
    root = tmp_path_factory.mktemp("data")
    (root / "cocobu_att").mkdir()
    (root / "cocobu_box").mkdir()
    rng = np.random.default_rng(4)
    images = []
    for i in range(8):
        k = int(rng.integers(2, 12))
        np.savez_compressed(root / "cocobu_att" / f"{i + 1}.npz",
                            feat=(np.abs(rng.standard_normal((k, F))) * 2).astype(np.float32))
        xy = rng.uniform(0, 400, (k, 2))
        np.save(root / "cocobu_box" / f"{i + 1}.npy", np.concatenate([xy, xy + rng.uniform(20, 240, (k, 2))], 1))
        images.append({"id": i + 1, "split": "test", "file_path": f"{i + 1}.jpg"})
    (root / "cocotalk.json").write_text(json.dumps({"ix_to_word": {}, "images": images}))
    return root


def test_infer_attention_from_features_with_boxes_on_both_backends(export_dir, checkpoint, captioner, data_dir,
                                                                   tmp_path, capsys):
    records = {}
    for backend, where in (("onnx", ["--model", str(export_dir)]), ("paddle", ["--checkpoint", str(checkpoint)])):
        att = tmp_path / backend
        code, err = run_cli(["--backend", backend, *where, "--features", str(data_dir), "--beam-size", "2",
                             "--batch-size", "3", "--out", str(tmp_path / f"{backend}.json"), "--attention",
                             str(att)], capsys)
        assert code == 0, err
        assert sorted(p.name for p in att.iterdir()) == sorted(f"{i}.{s}" for i in range(1, 9) for s in ("json", "png"))
        records[backend] = {i: json.loads((att / f"{i}.json").read_text()) for i in range(1, 9)}
    captions = json.loads((tmp_path / "onnx.json").read_text())
    feats = [np.load(data_dir / "cocobu_att" / f"{i}.npz")["feat"] for i in range(1, 9)]
    want = captioner.caption(feats, beam_size=2, return_attention=True)
    for i in range(1, 9):
        rec, other = records["onnx"][i], records["paddle"][i]
        assert rec["caption"] == captions[i - 1]["caption"] == want.captions[i - 1] == other["caption"]
        assert rec["tokens"] == want.tokens[i - 1] and rec["drawn_as"] == "boxes" and rec["grid"] is None
        assert rec["regions"] == len(feats[i - 1]) and rec["heads"] == HEADS
        shape = want.attention[i - 1].shape  # (0, heads, regions) for an empty caption: [] in the JSON
        np.testing.assert_allclose(np.reshape(rec["attention_heads"], shape), want.attention[i - 1], atol=1e-6)
        np.testing.assert_allclose(np.reshape(rec["attention"], (shape[0], shape[2])),
                                   want.attention[i - 1].mean(axis=1), atol=1e-6)
        np.testing.assert_allclose(np.reshape(other["attention_heads"], shape), want.attention[i - 1], atol=1e-4)
        np.testing.assert_allclose(rec["boxes"], np.load(data_dir / "cocobu_box" / f"{i}.npy"), atol=0.01)
        png = Image.open(tmp_path / "onnx" / f"{i}.png")
        boxes = np.asarray(rec["boxes"])
        extent = np.ceil(boxes[:, 2:].max(axis=0))  # the canvas: the boxes' extent, its longer side 192 pixels
        panel_w = round(192 * extent[0] / extent.max())
        panels = 1 + len(rec["tokens"])  # the canvas with the boxes, then a panel per token
        assert png.size[0] == min(panels, 5) * (panel_w + 8) + 8


def test_infer_attention_without_boxes_draws_bars_with_a_notice(export_dir, data_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(data_dir / "cocobu_att", plain)  # a folder of <id>.npz, no cocobu_box beside it
    code, err = run_cli(["--model", str(export_dir), "--features", str(plain), "--out", str(tmp_path / "c.json"),
                         "--attention", str(tmp_path / "att")], capsys)
    assert code == 0, err
    assert "notice: 8 of 8 image(s) have no region boxes" in err and "bar chart" in err
    rec = json.loads((tmp_path / "att" / "3.json").read_text())
    assert rec["drawn_as"] == "bars" and rec["boxes"] is None


def test_infer_attention_errors_come_before_the_work(export_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    common = ["--model", str(export_dir), "--features", str(data_dir), "--out", str(out)]
    # a file where the directory should be
    (tmp_path / "taken").write_text("x")
    code, err = run_cli([*common, "--attention", str(tmp_path / "taken")], capsys)
    assert code == 1 and "--attention" in err and "not a directory" in err and not out.exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            code, err = run_cli([*common, "--attention", str(locked / "att")], capsys)
            assert code == 1 and "--attention" in err and "cannot be written" in err and not out.exists()
        finally:
            locked.chmod(0o700)
    # the Ray job has no attention pictures
    code, err = run_cli([*common, "--ray", "--attention", str(tmp_path / "att")], capsys)
    assert code == 1 and "--attention draws in one process" in err and not out.exists()
    # a malformed box file is named, before any captioning
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    np.save(bad / "cocobu_box" / "5.npy", np.zeros((2, 3)))
    code, err = run_cli(["--model", str(export_dir), "--features", str(bad), "--out", str(out), "--attention",
                         str(tmp_path / "att")], capsys)
    assert code == 1 and "cocobu_box/5.npy (image id 5)" in err and not out.exists()
    assert not (tmp_path / "att").exists()


@pytest.fixture(scope="module")
def picture_export(tmp_path_factory):
    """A model on a small extractor (8x8 average pooling of a 32 x 24 input: a 3 x 4 grid of 6-d cells), exported
    with it, and a few pictures of different sizes."""
    root = tmp_path_factory.mktemp("pictures")
    extractor = write_pool_extractor(root / "extractor")
    paddle.seed(3)
    model = build_model(30, rnn_size=32, input_encoding_size=32, att_feat_size=6, num_heads=HEADS, refine_layers=1)
    for name, value in model.state_dict().items():
        if name.startswith("core.") and "norm" not in name:
            value.set_value(value.numpy() * 4)
    ckpt = root / "ckpt"
    save_model_dir(ckpt, model, {str(i): f"w{i}" for i in range(1, 31)})
    export_checkpoint(ckpt, root / "export", extractor=extractor)
    pics = root / "pics"
    pics.mkdir()
    rng = np.random.default_rng(5)
    for i, size in enumerate(((120, 90), (64, 100), (300, 200)), start=1):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(pics / f"{i}.jpg")
    return {"export": root / "export", "ckpt": ckpt, "extractor": extractor, "pics": pics}


def test_caption_images_returns_the_grids_weights_and_cells(picture_export):
    captioner = Captioner.from_dir(picture_export["export"])
    paths = sorted(picture_export["pics"].iterdir())
    res = captioner.caption_images(paths, beam_size=2, return_attention=True)
    assert res.captions == captioner.caption_images(paths, beam_size=2).captions
    for i, path in enumerate(paths):
        assert res.grids[i] == (3, 4) and res.attention[i].shape == (len(res.tokens[i]), HEADS, 12)
        w, h = res.sizes[i]
        np.testing.assert_allclose(res.boxes[i], cell_boxes(3, 4) * np.array([w, h, w, h]), atol=1e-3)
        assert Image.open(path).size == (w, h)


def test_infer_images_attention_on_the_pictures(picture_export, tmp_path, capsys):
    records = {}
    for backend, where in (("onnx", ["--model", str(picture_export["export"])]),
                           ("paddle", ["--checkpoint", str(picture_export["ckpt"]), "--extractor",
                                       str(picture_export["extractor"])])):
        code, err = run_cli(["--backend", backend, *where, "--images", str(picture_export["pics"]), "--beam-size", "2",
                             "--out", str(tmp_path / f"{backend}.json"), "--attention", str(tmp_path / backend)],
                            capsys)
        assert code == 0, err
        records[backend] = [json.loads((tmp_path / backend / f"{i}.json").read_text()) for i in (1, 2, 3)]
    captioner = Captioner.from_dir(picture_export["export"])
    want = captioner.caption_images(sorted(picture_export["pics"].iterdir()), beam_size=2, return_attention=True)
    for i, (rec, other) in enumerate(zip(records["onnx"], records["paddle"], strict=True)):
        assert rec["drawn_as"] == "grid" and rec["grid"] == [3, 4] and rec["tokens"] == want.tokens[i]
        assert rec["file_name"].endswith(f"{i + 1}.jpg") and rec["image_size"] == list(want.sizes[i])
        shape = want.attention[i].shape
        np.testing.assert_allclose(np.reshape(rec["attention_heads"], shape), want.attention[i], atol=1e-6)
        np.testing.assert_allclose(np.reshape(other["attention_heads"], shape), want.attention[i], atol=1e-4)
        png = Image.open(tmp_path / "onnx" / f"{i + 1}.png")
        assert png.mode == "RGB" and png.size[1] > 192


def test_decoder_step_weights_with_memory_per_image_and_per_row(model):
    """The traced step's attention (beams sharing an image's memory) equals the per-row form's."""
    feats, masks = random_batch(9, batch=4)
    mean, p_att = model.encode(paddle.to_tensor(feats), paddle.to_tensor(masks))
    k = 3
    values, keys = model.core.split_memory(p_att)
    it = paddle.to_tensor(np.arange(12, dtype=np.int64) % 7)
    state = model.init_state(12)
    mean_rows = paddle.repeat_interleave(mean, k, axis=0)
    with paddle.no_grad():
        _, _, shared = model._step(it, state, mean_rows, (values, keys), mask_to_bias(paddle.to_tensor(masks)), True)
        rows = [paddle.repeat_interleave(x, k, axis=0) for x in (values, keys)]
        _, _, per_row = model._step(it, state, mean_rows, tuple(rows),
                                    mask_to_bias(paddle.to_tensor(np.repeat(masks, k, axis=0))), True)
    np.testing.assert_allclose(shared.numpy(), per_row.numpy(), rtol=0, atol=1e-6)


def test_the_background_writer_writes_the_same_files_and_raises_drawing_errors(tmp_path):
    from aoanet_runtime.attention import AttentionWriter

    rng = np.random.default_rng(3)
    tokens = ["a", "cat"]
    weights = rng.dirichlet(np.ones(12), size=(2, 2)).astype(np.float32)
    boxes = cell_boxes(3, 4) * np.array([80, 60, 80, 60])
    picture = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    sync, background = AttentionWriter(tmp_path / "sync"), AttentionWriter(tmp_path / "bg", background=True)
    for writer in (sync, background):
        for i in range(5):
            writer.write(i, "a cat", tokens, weights, picture=picture, boxes=boxes)
        writer.close()
        assert writer.written == 5
    for i in range(5):
        for name in (f"{i}.png", f"{i}.json"):
            assert (tmp_path / "sync" / name).read_bytes() == (tmp_path / "bg" / name).read_bytes()
    broken = AttentionWriter(tmp_path / "broken", background=True)
    broken.write(0, "a cat", tokens, weights, picture=tmp_path / "missing.jpg", boxes=boxes)
    with pytest.raises(Exception, match="missing.jpg"):
        broken.close()
