"""Pictures in the runtime: listing, decoding (EXIF, modes, bad files, huge files), pre-processing checked against
float64 numpy, the extractor spec and its checks against a graph, features through a hand-built ONNX extractor.

Nothing here needs Paddle: the extractor graph is written with onnx.helper (a strided average pool and a fixed
1x1 projection, whose output numpy computes independently)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aoanet_runtime.contract import EXTRACTOR, EXTRACTOR_SPEC
from aoanet_runtime.extractor import Extractor, ExtractorError, ExtractorSpec, cell_boxes
from aoanet_runtime.images import ImageError, list_image_files, load_rgb, preprocess, probe

STRIDE, WIDTH = 8, 6


def make_spec(**overrides) -> dict:
    spec = ExtractorSpec(
        backbone="test_pool",
        size={"policy": "fixed", "width": 32, "height": 24},
        resize_filter="bilinear",
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
        stride=STRIDE,
        feature_width=WIDTH,
    ).to_json()
    spec.update(overrides)
    return spec


def projection() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((WIDTH, 3)).astype(np.float32)


def pool_graph(width: int = WIDTH, input_name: str = "images") -> bytes:
    """images [B, 3, H, W] -> att_feats [B, (H/8)(W/8), width]: 8x8 average pool, 1x1 projection, cells
    row-major."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = projection() if width == WIDTH else np.ones((width, 3), np.float32)
    nodes = [
        helper.make_node("AveragePool", [input_name], ["pooled"], kernel_shape=[STRIDE, STRIDE], strides=[STRIDE] * 2),
        helper.make_node("Conv", ["pooled", "w"], ["proj"]),
        helper.make_node("Reshape", ["proj", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["att_feats"], perm=[0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("att_feats", TensorProto.FLOAT, ["batch", "cells", width])],
        [
            numpy_helper.from_array(w.reshape(width, 3, 1, 1), "w"),
            numpy_helper.from_array(np.array([0, width, -1], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by onnxruntime 1.16, the declared minimum
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_pool_extractor(d: Path, width: int = WIDTH) -> Path:
    """An extractor directory: ``pool_graph(width)`` and its spec."""
    d.mkdir()
    (d / EXTRACTOR).write_bytes(pool_graph(width=width))
    (d / EXTRACTOR_SPEC).write_text(json.dumps(make_spec(feature_width=width)))
    return d


@pytest.fixture
def extractor_dir(tmp_path) -> Path:
    return write_pool_extractor(tmp_path / "extractor")


def expected_features(picture: Image.Image, spec: dict) -> np.ndarray:
    """float64 numpy: the spec's resize (Pillow's), normalisation, 8x8 mean, projection."""
    size = (spec["size"]["width"], spec["size"]["height"])
    x = np.asarray(picture.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    x = (x - np.array(spec["mean"])) / np.array(spec["std"])
    h, w = size[1] // STRIDE, size[0] // STRIDE
    cells = x.reshape(h, STRIDE, w, STRIDE, 3).mean(axis=(1, 3)).reshape(h * w, 3)
    return cells @ projection().astype(np.float64).T


def picture(seed: int = 0, size=(50, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- listing
def test_listing_directories_lists_and_ids(tmp_path):
    for name in ("b.png", "a.jpg", "10.png", "notes.txt.bak"):
        (tmp_path / name).write_bytes(b"x")
    refs = list_image_files([tmp_path])
    assert [r.path.name for r in refs] == ["10.png", "a.jpg", "b.png"]
    assert [r.image_id for r in refs] == [10, "a", "b"]
    lst = tmp_path / "list.txt"
    lst.write_text("# pictures\nb.png\n\na.jpg\n")
    assert [r.path for r in list_image_files([lst])] == [tmp_path / "b.png", tmp_path / "a.jpg"]
    coco = tmp_path / "COCO_val2014_000000391895.jpg"
    coco.write_bytes(b"x")
    assert list_image_files([coco], coco_ids=True)[0].image_id == 391895
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ImageError, match=r"a: .*a\.jpg.*a\.png"):
        list_image_files([tmp_path])
    with pytest.raises(ImageError, match="no such file"):
        list_image_files([tmp_path / "missing.jpg"])


# ---------------------------------------------------------------------------------------------- decoding
def _png(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, format="PNG", **kw)
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(np.asarray(load_rgb(_png(Image.fromarray(grey, "L"), tmp_path / "l.png"))),
                          np.repeat(grey[:, :, None], 3, axis=2))
    # 16-bit greyscale: 0..65535 -> 0..255 (Pillow's own conversion would clip everything above 255)
    deep = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(deep)
    got = np.asarray(load_rgb(_png(img16, tmp_path / "16.png")))[0, :, 0]
    assert got.tolist() == [0, 1, 128, 255]
    # alpha composited onto white
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)
    rgba[1, 0] = (0, 0, 255, 128)
    out = np.asarray(load_rgb(_png(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[1, 0, 0]) - 127) <= 1 and out[1, 0, 2] == 255
    # palette (with a transparent entry), CMYK
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert np.asarray(load_rgb(_png(pal, tmp_path / "p.png"))).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    pal.info["transparency"] = 1
    assert np.asarray(load_rgb(_png(pal, tmp_path / "pt.png", transparency=1))).tolist() == [
        [[10, 20, 30], [255, 255, 255]]
    ]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # red
    cmyk.save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(tmp_path / "c.jpg"))[0, 0].astype(int)
    assert r > 200 and g < 50 and b < 50
    # arrays
    assert load_rgb(grey).mode == "RGB"
    with pytest.raises(ImageError, match="uint8"):
        load_rgb(grey.astype(np.float32))


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = (255, 0, 0)  # top-left red, stored landscape 3 x 2
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _png(Image.fromarray(a), tmp_path / "rot.png", exif=exif.tobytes())
    out = np.asarray(load_rgb(path))
    assert out.shape == (3, 2, 3)  # displayed portrait
    assert out[0, 1].tolist() == [255, 0, 0]  # the red corner went to the top right
    assert probe(path) == (2, 3)


def test_bad_files_are_errors_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    picture(size=(256, 256)).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for path, message in ((text, "not an image file"), (empty, "empty file"), (truncated, "truncated")):
        with pytest.raises(ImageError, match=message) as e:
            load_rgb(path)
        assert str(e.value).startswith(str(path))
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "gone.png")


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height, with almost no pixel data: what a decompression bomb looks like
    before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_huge_pictures_are_refused_before_decoding(tmp_path):
    import subprocess
    import sys

    path = _huge_png(tmp_path / "huge.png", 20000, 20000)
    for call in (probe, load_rgb):
        with pytest.raises(ImageError, match=r"huge\.png.*too large") as e:
            call(path)
        assert "400000000 pixels" in str(e.value) or "20000x20000" in str(e.value)
    # memory stays bounded: a process that is refused the picture never grows past what Python + numpy + Pillow take
    # (the pixels would be 1.2 GB); Pillow allocates outside Python's allocator, so this is measured as the
    # process's peak resident size (VmHWM, which starts again at exec, unlike ru_maxrss, which would count the
    # forked test runner)
    script = (
        "import sys\n"
        "from aoanet_runtime.images import ImageError, load_rgb\n"
        "try:\n    load_rgb(sys.argv[1])\nexcept ImageError:\n    pass\n"
        "status = open('/proc/self/status').read().splitlines()\n"
        "print([line.split()[1] for line in status if line.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 300_000  # kB
    # a JPEG whose header says 20000 x 20000 (the frame header of a small one, patched): refused the same way
    buf = io.BytesIO()
    picture(size=(64, 48)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 20000, 20000)
    (tmp_path / "huge.jpg").write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"huge\.jpg.*too large"):
        load_rgb(tmp_path / "huge.jpg")
    # below Pillow's own limit but above ours (a PNG cannot be decoded at a reduced scale)
    with pytest.raises(ImageError, match="too large"):
        probe(_huge_png(tmp_path / "big.png", 9000, 8000))
    # a large JPEG is decoded at a reduced scale: never more pixels than needed for the input size
    big = tmp_path / "big.jpg"
    picture(size=(2400, 1600)).resize((2400, 1600)).save(big, quality=70)
    assert load_rgb(big, min_size=224).size == (600, 400)  # 1/4: 1/8 would leave the shorter side below 224
    assert load_rgb(big, min_size=1000).size == (2400, 1600)


# ---------------------------------------------------------------------------------------------- pre-processing
def test_preprocess_against_float64_numpy():
    img = picture(3, size=(40, 30))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = preprocess(img, (40, 30), "bicubic", mean, std)  # no resize
    want = ((np.asarray(img, np.float64) / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    assert x.dtype == np.float32 and x.shape == (3, 30, 40)
    assert np.abs(x - want).max() < 1e-5
    resized = preprocess(img, (16, 8), "bicubic", mean, std)
    ref = np.asarray(img.resize((16, 8), Image.Resampling.BICUBIC), np.float64) / 255.0
    assert np.abs(resized - ((ref - np.array(mean)) / np.array(std)).transpose(2, 0, 1)).max() < 1e-5


# ---------------------------------------------------------------------------------------------- spec
def test_spec_round_trip_sizes_and_boxes():
    spec = ExtractorSpec.from_json(make_spec())
    assert spec.input_size(1000, 10) == (32, 24) and spec.grid(32, 24) == (3, 4)
    data = spec.to_json()
    assert data["grid"]["rows"] == 3 and len(data["grid"]["cells"]) == 12
    boxes = cell_boxes(3, 4)
    assert np.allclose(boxes[0], [0, 0, 0.25, 1 / 3]) and np.allclose(boxes[5][:2], [0.25, 1 / 3])
    assert np.allclose(boxes[-1], [0.75, 2 / 3, 1, 1])
    short = ExtractorSpec.from_json(make_spec(size={"policy": "shorter_side", "shorter_side": 448, "max_side": 640,
                                                    "multiple": 32}))
    assert short.input_size(640, 480) == (608, 448)  # 597 -> a multiple of 32
    assert short.input_size(4000, 1000) == (640, 160)  # the longer side capped at 640
    assert short.input_size(480, 640) == (448, 608)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"spec_version": 9}, "spec_version"),
        ({"size": {"policy": "crop"}}, "size"),
        ({"size": {"policy": "fixed", "width": 0, "height": 4}}, "size.width"),
        ({"resize_filter": "magic"}, "resize_filter"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [1, 0, 1]}, "std"),
        ({"feature_width": "6"}, "feature_width"),
    ],
)
def test_bad_spec_fields_are_named(tmp_path, change, field):
    path = tmp_path / EXTRACTOR_SPEC
    path.write_text(json.dumps(make_spec(**change)))
    with pytest.raises(ExtractorError, match=rf"{path}: field '{field}'"):
        ExtractorSpec.read(path)
    data = make_spec()
    del data["stride"]
    path.write_text(json.dumps(data))
    with pytest.raises(ExtractorError, match="'stride' is missing"):
        ExtractorSpec.read(path)


# ---------------------------------------------------------------------------------------------- extractor
def test_features_equal_an_independent_computation(extractor_dir, tmp_path):
    ex = Extractor.from_dir(extractor_dir)
    pics = [picture(i, size=(50 + 7 * i, 40)) for i in range(5)]
    paths = []
    for i, p in enumerate(pics):
        paths.append(_png(p, tmp_path / f"{i}.png"))
    spec = make_spec()
    for source in (paths, pics, [np.asarray(p) for p in pics]):
        feats = ex.features(source, batch_size=2)
        assert len(feats) == 5
        for f, p in zip(feats, pics):
            assert f.att.shape == (12, WIDTH)
            assert np.abs(f.att - expected_features(p, spec)).max() < 1e-4
            assert np.allclose(f.fc, f.att.mean(axis=0))
            w, h = p.size
            assert np.allclose(f.boxes[-1], [0.75 * w, 2 / 3 * h, w, h])


def test_a_spec_that_does_not_match_its_graph_is_refused(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / EXTRACTOR).write_bytes(pool_graph())
    (d / EXTRACTOR_SPEC).write_text(json.dumps(make_spec(feature_width=8)))
    with pytest.raises(ExtractorError, match=r"spec does not match the graph.*\[1, 12, 6\].*\[1, 12, 8\]"):
        Extractor.from_dir(d)
    (d / EXTRACTOR_SPEC).write_text(json.dumps(make_spec(stride=16)))
    with pytest.raises(ExtractorError, match="spec does not match the graph"):
        Extractor.from_dir(d)
    (d / EXTRACTOR_SPEC).write_text(json.dumps(make_spec(fc_width=6)))
    with pytest.raises(ExtractorError, match="no fc_feats output"):
        Extractor.from_dir(d)
    (d / EXTRACTOR).write_bytes(pool_graph(input_name="pixels"))
    (d / EXTRACTOR_SPEC).write_text(json.dumps(make_spec()))
    with pytest.raises(ExtractorError, match=r"inputs are \['pixels'\]"):
        Extractor.from_dir(d)
    (d / EXTRACTOR).write_bytes(b"garbage")
    with pytest.raises(ExtractorError, match="onnxruntime cannot load"):
        Extractor.from_dir(d)
