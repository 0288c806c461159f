"""The visual front-end on the training side and end to end: PyTorch weight files read without PyTorch, the
EfficientNet-Lite0 ImageNet weights and pre-processing proven on real photos, extractor export (parity, spec),
``aoanet-data extract`` (layout, resume, bad files), the extractor recorded by training and served by the export,
``Captioner.caption_images`` and ``aoanet-infer --images`` (onnx and paddle backends)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image
from typer.testing import CliRunner

from aoanet.cli.data import app as data_app
from aoanet.data.errors import DataError
from aoanet.data.features import read_att
from aoanet.model import build_model
from aoanet.safe_pickle import UnsafePickleError
from aoanet.train.checkpoint import read_model_json, save_model_dir
from aoanet.vision.backbones import BACKBONES, build_backbone, efficientnet_lite0_weights_file
from aoanet.vision.extract import extractor_record
from aoanet.vision.torch_file import TorchFileError, read_torch_state_dict
from aoanet_export import ExportError, export_checkpoint
from aoanet_runtime import Captioner, ExportDirError
from aoanet_runtime import cli as infer_cli
from aoanet_runtime.contract import EXTRACTOR, EXTRACTOR_SPEC, FORMAT_VERSION
from aoanet_runtime.extractor import Extractor
from aoanet_runtime.images import load_rgb, preprocess

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"
# ImageNet classes each photo must name among its top 5 (tests/data/photos/LICENSES.md: where they come from).
TRUE_CLASSES = {
    "chelsea.jpg": {281: "tabby cat", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee.jpg": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket.jpg": {657: "missile", 744: "projectile", 812: "space shuttle"},
}
runner = CliRunner()


# ---------------------------------------------------------------------------------------------- torch files
class _Storage:  # what torch pickles a storage as: a persistent id
    def __init__(self, kind, key, data):
        self.kind, self.key, self.data = kind, key, data


class _Writer(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size)
        return None


def _pickled_state(tensors: dict) -> tuple[bytes, list]:
    """A state dict pickled as torch pickles one (an OrderedDict of torch._utils._rebuild_tensor_v2(storage, offset,
    size, stride, ...), storages as persistent ids naming torch.FloatStorage), written without torch: stand-ins
    registered under torch's module names for the time of the dump."""
    import sys
    import types

    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    class FloatStorage:
        pass

    for obj, module, name in ((_rebuild_tensor_v2, "torch._utils", "_rebuild_tensor_v2"),
                              (FloatStorage, "torch", "FloatStorage")):
        obj.__module__, obj.__qualname__ = module, name
    fake_utils._rebuild_tensor_v2, fake_torch.FloatStorage = _rebuild_tensor_v2, FloatStorage

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, OrderedDict())

        def __reduce__(self):
            return (_rebuild_tensor_v2, self.args)

    storages, obj = [], OrderedDict()
    for name, (data, offset, size, stride) in tensors.items():
        storages.append(_Storage(FloatStorage, str(len(storages)), data))
        obj[name] = Tensor(storages[-1], offset, size, stride)
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
    try:
        buf = io.BytesIO()
        _Writer(buf, protocol=2).dump(obj)
        return buf.getvalue(), storages
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _tensors():
    base = np.arange(24, dtype=np.float32)
    # a [2, 3, 4] tensor stored with permuted strides (as TensorFlow-converted weights are), and one with an offset
    return {
        "w": (base, 0, (2, 3, 4), (1, 8, 2)),
        "b": (base, 5, (3,), (2,)),
    }, {
        "w": np.lib.stride_tricks.as_strided(base, (2, 3, 4), (4, 32, 8)).copy(),
        "b": base[5:11:2].copy(),
    }


def test_torch_legacy_and_zip_files_read_without_torch(tmp_path):
    spec, want = _tensors()
    data, storages = _pickled_state(spec)
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(data)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(np.int64(s.data.size).tobytes() + s.data.tobytes())
    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", data)
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.data.tobytes())
    for path in (legacy, zipped):
        got = read_torch_state_dict(path)
        assert set(got) == {"w", "b"}
        for k in want:
            assert np.array_equal(got[k], want[k]), (path.name, k)
    # truncated: the last storage cut short
    cut = tmp_path / "cut.pth"
    cut.write_bytes(legacy.read_bytes()[:-10])
    with pytest.raises(TorchFileError, match="cut.pth"):
        read_torch_state_dict(cut)
    # anything but tensors and plain data is refused by name, and nothing runs
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
    with pytest.raises(UnsafePickleError, match=r"evil\.pth.*posix\.system"):
        read_torch_state_dict(evil)


def test_the_efficientnet_weights_file_reads_whole():
    sd = read_torch_state_dict(efficientnet_lite0_weights_file())
    assert len(sd) == 296 and sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in sd.values())


# ---------------------------------------------------------------------------------------------- ImageNet check
def test_imagenet_head_names_the_photos(tmp_path):
    """The real weights and the runtime's pre-processing together: each photo's class is in the top 5, and
    with the colour channels swapped (BGR, a classic pre-processing bug) the scores change a lot."""
    model, source = build_backbone("efficientnet_lite0")
    info = BACKBONES["efficientnet_lite0"]
    assert source["sha256"].startswith("57934424")  # the file's own name carries its hash's prefix
    for name, classes in TRUE_CLASSES.items():
        img = load_rgb(PHOTOS / name, min_size=info.default_size)
        x = preprocess(img, (224, 224), info.resize_filter, info.mean, info.std)
        with paddle.no_grad():
            logits = model.classify(paddle.to_tensor(x[None])).numpy()[0]
        top5 = set(np.argsort(-logits)[:5].tolist())
        assert top5 & set(classes), f"{name}: top 5 {sorted(top5)}, expected one of {classes}"
        with paddle.no_grad():
            swapped = model.classify(paddle.to_tensor(x[None, ::-1].copy())).numpy()[0]
        assert np.abs(swapped - logits).max() > 1.0


# ---------------------------------------------------------------------------------------------- extractor
@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lite0") / "extractor"
    res = runner.invoke(data_app, ["extractor", "--backbone", "efficientnet_lite0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_extractor_export_parity_and_spec(lite0, tmp_path):
    spec = json.loads((lite0 / EXTRACTOR_SPEC).read_text())
    assert spec["backbone"] == "efficientnet_lite0" and spec["feature_width"] == 320
    assert spec["parity"]["passed"] and spec["parity"]["max_rel_diff"] <= 1e-4
    assert spec["grid"]["rows"] == spec["grid"]["columns"] == 7 and len(spec["grid"]["cells"]) == 49
    # the graph against Paddle once more, on a real photo at a non-square size
    model, _ = build_backbone("efficientnet_lite0")
    ex = Extractor.from_dir(lite0)
    x = preprocess(load_rgb(PHOTOS / "coffee.jpg"), (288, 224), spec["resize_filter"], spec["mean"], spec["std"])
    att, fc = ex.run(x[None])
    with paddle.no_grad():
        want = model(paddle.to_tensor(x[None])).numpy()  # [1, 320, 7, 9]
    want = want.reshape(1, 320, -1).transpose(0, 2, 1)
    assert att.shape == (1, 63, 320)
    assert np.abs(att - want).max() <= 1e-4 * np.abs(want).max()
    assert np.allclose(fc, att.mean(axis=1))
    # an existing directory is not replaced without --force
    res = runner.invoke(data_app, ["extractor", "--backbone", "efficientnet_lite0", "--out", str(lite0)])
    assert res.exit_code == 1 and "--force" in res.output


def test_resnet_grid_with_pdparams_weights(tmp_path):
    paddle.seed(3)
    net = paddle.vision.models.resnet50()
    weights = tmp_path / "r50.pdparams"
    paddle.save(net.state_dict(), str(weights))
    out = tmp_path / "r50"
    res = runner.invoke(data_app, ["extractor", "--backbone", "resnet50", "--weights", str(weights), "--size", "64",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    spec = json.loads((out / EXTRACTOR_SPEC).read_text())
    assert spec["feature_width"] == 2048 and spec["grid"]["rows"] == 2 and spec["parity"]["passed"]
    assert spec["weights"]["file"] == "r50.pdparams"
    net.eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    with paddle.no_grad():
        n = net
        grid = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(paddle.to_tensor(x)))))))))
    want = grid.numpy().reshape(1, 2048, -1).transpose(0, 2, 1)
    att, _ = Extractor.from_dir(out).run(x)
    assert np.abs(att - want).max() <= 1e-4 * np.abs(want).max()
    # weights that do not fit are listed
    paddle.save({"conv1.weight": paddle.zeros([1])}, str(tmp_path / "bad.pdparams"))
    res = runner.invoke(data_app, ["extractor", "--backbone", "resnet50", "--weights", str(tmp_path / "bad.pdparams"),
                                   "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and "missing" in res.output and "mis-shaped" in res.output
    assert not (tmp_path / "bad").exists()


def test_an_onnx_model_with_a_spec_is_checked_and_imported(tmp_path):
    from test_images import make_spec, pool_graph

    (tmp_path / "m.onnx").write_bytes(pool_graph())
    (tmp_path / "spec.json").write_text(json.dumps(make_spec()))
    res = runner.invoke(data_app, ["extractor", "--onnx", str(tmp_path / "m.onnx"), "--spec",
                                   str(tmp_path / "spec.json"), "--out", str(tmp_path / "clip")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "clip" / EXTRACTOR).read_bytes() == pool_graph()
    # extract takes the graph and spec directly too, and keeps them as the data's extractor
    pics = _pictures(tmp_path / "pics", 2)
    res = runner.invoke(data_app, ["extract", "--images", str(pics), "--extractor-onnx", str(tmp_path / "m.onnx"),
                                   "--extractor-spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "data"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert read_att(tmp_path / "data" / "cocobu_att" / "1.npz", 1).shape == (12, 6)
    assert (tmp_path / "data" / "extractor" / EXTRACTOR).read_bytes() == pool_graph()
    (tmp_path / "spec.json").write_text(json.dumps(make_spec(feature_width=5)))
    res = runner.invoke(data_app, ["extractor", "--onnx", str(tmp_path / "m.onnx"), "--spec",
                                   str(tmp_path / "spec.json"), "--out", str(tmp_path / "clip2")])
    assert res.exit_code == 1 and "does not match" in res.output and not (tmp_path / "clip2").exists()


# ---------------------------------------------------------------------------------------------- extract
def _pictures(directory: Path, n: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        a = rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8)
        Image.fromarray(a).save(directory / f"{i}.jpg" if i % 2 else directory / f"{i}.png")
    shutil.copy(PHOTOS / "chelsea.jpg", directory / f"{n + 1}.jpg")
    return directory


def test_extract_writes_the_reference_layout_and_resumes(lite0, tmp_path):
    pics = _pictures(tmp_path / "pics")
    data = tmp_path / "data"
    args = ["extract", "--images", str(pics), "--extractor", str(lite0), "--out", str(data), "--no-progress",
            "--batch-size", "3"]
    res = runner.invoke(data_app, args)
    assert res.exit_code == 0, res.output
    assert "extracted              7" in res.output
    ex = Extractor.from_dir(lite0)
    for i in (1, 2, 7):
        path = next(pics.glob(f"{i}.*"))
        f = ex.features([path])[0]
        att = read_att(data / "cocobu_att" / f"{i}.npz", i, 320)
        assert np.array_equal(att, f.att)  # the runtime's features equal those extract wrote, exactly
        assert np.array_equal(np.load(data / "cocobu_fc" / f"{i}.npy"), f.fc)
        w, h = Image.open(path).size
        boxes = np.load(data / "cocobu_box" / f"{i}.npy")
        assert boxes.shape == (49, 4) and np.allclose(boxes[-1], [6 / 7 * w, 6 / 7 * h, w, h])
    assert (data / "extractor" / EXTRACTOR).read_bytes() == (lite0 / EXTRACTOR).read_bytes()
    # a second run skips what is done
    res = runner.invoke(data_app, args)
    assert res.exit_code == 0 and "already_done           7" in res.output


def test_extract_lists_every_bad_file(lite0, tmp_path):
    pics = _pictures(tmp_path / "pics", 3)
    (pics / "8.jpg").write_text("not a picture")
    (pics / "9.png").write_bytes(b"")
    good = (pics / "4.jpg").read_bytes()  # the photo
    (pics / "10.jpg").write_bytes(good[: len(good) // 3])
    data = tmp_path / "data"
    args = ["extract", "--images", str(pics), "--extractor", str(lite0), "--out", str(data), "--no-progress"]
    res = runner.invoke(data_app, args)
    assert res.exit_code == 1
    for name, why in (("8.jpg", "not an image"), ("9.png", "empty file"), ("10.jpg", "truncated")):
        assert f"{pics / name}: {why}" in res.output
    assert "3 of 7 picture(s)" in res.output and "--skip-bad" in res.output
    # the good ones were written whole, the bad ones not at all
    assert sorted(p.name for p in (data / "cocobu_att").iterdir()) == ["1.npz", "2.npz", "3.npz", "4.npz"]
    assert not any(p.name.startswith(".") for p in (data / "cocobu_att").iterdir())
    res = runner.invoke(data_app, [*args, "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert "already_done           4" in res.output and "skipped 3 bad picture(s)" in res.output
    # another extractor into the same directory is refused
    other = tmp_path / "other"
    shutil.copytree(lite0, other)
    spec = json.loads((other / EXTRACTOR_SPEC).read_text())
    spec["layer"] = "changed"
    (other / EXTRACTOR_SPEC).write_text(json.dumps(spec))
    res = runner.invoke(data_app, ["extract", "--images", str(pics / "1.jpg"), "--extractor", str(other), "--out",
                                   str(data), "--no-progress"])
    assert res.exit_code == 1 and "another extractor" in res.output


# ---------------------------------------------------------------------------------------------- end to end
V = 30


def _checkpoint(directory: Path, extractor: dict | None) -> Path:
    paddle.seed(2)
    model = build_model(V, rnn_size=32, input_encoding_size=32, att_feat_size=320, num_heads=4, refine_layers=1)
    state = model.state_dict()
    for name, value in state.items():  # sharper dynamics than random weights: captions of varied lengths
        if name.startswith("core.") and "norm" not in name:
            value.set_value(value.numpy() * 4)
    state["logit.weight"].set_value(state["logit.weight"].numpy() * 3)
    save_model_dir(directory, model, {str(i): f"w{i}" for i in range(1, V + 1)}, extractor=extractor)
    return directory


@pytest.fixture(scope="module")
def served(lite0, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    pics = _pictures(root / "pics", 5)
    data = root / "data"
    res = runner.invoke(data_app, ["extract", "--images", str(pics), "--extractor", str(lite0), "--out", str(data),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    record = extractor_record(data / "cocobu_att", 320)
    ckpt = _checkpoint(root / "ckpt", record)
    export_checkpoint(ckpt, root / "export")
    return {"pics": pics, "data": data, "ckpt": ckpt, "export": root / "export", "root": root}


def test_training_record_and_export_serve_the_extractor(served, lite0):
    record = read_model_json(served["ckpt"])["extractor"]
    assert record["backbone"] == "efficientnet_lite0" and set(record["sha256"]) == {EXTRACTOR, EXTRACTOR_SPEC}
    manifest = json.loads((served["export"] / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION >= 5
    assert manifest["extractor"]["backbone"] == "efficientnet_lite0" and manifest["extractor"]["trained_with"]
    for name in (EXTRACTOR, EXTRACTOR_SPEC):
        assert manifest["files"][name]["sha256"] == record["sha256"][name]
        assert (served["export"] / name).read_bytes() == (lite0 / name).read_bytes()
    # with a width that does not fit, an extractor is refused
    with pytest.raises(DataError, match="320-d"):
        extractor_record(served["data"] / "cocobu_att", 128)


def test_caption_images_equals_captioning_the_extracted_features(served):
    captioner = Captioner.from_dir(served["export"])
    paths = sorted(served["pics"].iterdir(), key=lambda p: int(p.stem))
    got = captioner.caption_images(paths, beam_size=2)
    feats = [read_att(served["data"] / "cocobu_att" / f"{p.stem}.npz", p.stem) for p in paths]
    want = captioner.caption(feats, beam_size=2)
    assert got.captions == want.captions and np.array_equal(got.seqs, want.seqs)
    assert any(got.captions)
    # PIL images and arrays give the same
    assert captioner.caption_images([Image.open(p) for p in paths], beam_size=2).captions == want.captions
    assert captioner.caption_images([np.asarray(Image.open(p).convert("RGB")) for p in paths],
                                    beam_size=2).captions == want.captions


def test_infer_images_onnx_and_paddle(served, tmp_path):
    out_onnx, out_paddle = tmp_path / "onnx.json", tmp_path / "paddle.json"
    common = ["--images", str(served["pics"]), "--beam-size", "2", "--no-progress", "--batch-size", "2"]
    assert _infer(["--model", str(served["export"]), *common, "--out", str(out_onnx)]) == 0
    assert _infer(["--backend", "paddle", "--checkpoint", str(served["ckpt"]), *common, "--out", str(out_paddle)]) == 0
    onnx_res, paddle_res = json.loads(out_onnx.read_text()), json.loads(out_paddle.read_text())
    assert [r["image_id"] for r in onnx_res] == [1, 2, 3, 4, 5, 6]
    assert [r["caption"] for r in onnx_res] == [r["caption"] for r in paddle_res]
    assert onnx_res[0]["file_name"].endswith("1.jpg")


def build_backbone_free_model(checkpoint: Path):
    from aoanet.train.checkpoint import load_model

    return load_model(checkpoint, "last")


def _infer(args) -> int:
    try:
        infer_cli.main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_bad_pictures_and_models_without_extractor_are_refused(served, tmp_path, capsys):
    pics = tmp_path / "pics"
    shutil.copytree(served["pics"], pics)
    (pics / "7.jpg").write_text("text")
    (pics / "8.png").write_bytes(b"")
    out = tmp_path / "c.json"
    assert _infer(["--model", str(served["export"]), "--images", str(pics), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{pics / '7.jpg'}: not an image" in err and f"{pics / '8.png'}: empty file" in err
    assert not out.exists()
    # a model exported without an extractor refuses pictures and says what it reads
    plain = _checkpoint(tmp_path / "plain", None)
    export_checkpoint(plain, tmp_path / "plain-export")
    assert _infer(["--model", str(tmp_path / "plain-export"), "--images", str(served["pics"]), "--out", str(out),
                   "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "without an image extractor" in err and "width 320" in err and not out.exists()
    with pytest.raises(ExportDirError, match="without an image extractor"):
        Captioner.from_dir(tmp_path / "plain-export").caption_images([served["pics"] / "1.jpg"])
    # the export checks the extractor against the one recorded at training
    record = read_model_json(served["ckpt"])
    record["extractor"]["sha256"][EXTRACTOR] = "0" * 64
    model, _ = build_backbone_free_model(served["ckpt"])
    ckpt = tmp_path / "tampered"
    save_model_dir(ckpt, model, record["ix_to_word"], extractor=record["extractor"])
    with pytest.raises(ExportError, match="not the extractor the checkpoint was trained with"):
        export_checkpoint(ckpt, tmp_path / "tampered-export")
    assert not (tmp_path / "tampered-export").exists()


def test_training_records_the_features_extractor(data_dir, tmp_path):
    """Features in a data directory with an extractor/ beside them: the trainer records it in model.json."""
    from test_images import make_spec, pool_graph
    from test_train import small_config

    from aoanet.train.trainer import Trainer

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "extractor").mkdir()
    (data / "extractor" / EXTRACTOR).write_bytes(pool_graph(width=128))
    (data / "extractor" / EXTRACTOR_SPEC).write_text(json.dumps(make_spec(feature_width=128)))
    trainer = Trainer(small_config(data, tmp_path / "ckpt", max_iters=1), "xe", progress=False)
    trainer.run()
    record = read_model_json(tmp_path / "ckpt")["extractor"]
    assert record["dir"] == str((data / "extractor").resolve()) and record["feature_width"] == 128
    assert record["spec"]["backbone"] == "test_pool"
    # without an extractor beside the features, nothing is recorded
    Trainer(small_config(data_dir, tmp_path / "plain", max_iters=1), "xe", progress=False).run()
    assert "extractor" not in read_model_json(tmp_path / "plain")
