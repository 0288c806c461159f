"""Build an image extractor directory (``extractor.onnx`` + ``extractor.json``) from a Paddle backbone, or from any
ONNX image model with a spec; all or nothing.

The backbone's grid [B, C, h, w] is traced with ``paddle.jit`` as ``[B, h*w, C]`` (row-major cells), batch, height
and width dynamic, converted with paddle2onnx (the captioner's conversion, ``aoanet_export.onnx_convert``), and
checked: Paddle's dynamic graph and onnxruntime must agree within ``RELATIVE_TOLERANCE`` (max |difference| over
max |feature|) on random pictures at several sizes and batch sizes, else nothing is written. The spec is then
checked against the graph by the runtime's own loader (``aoanet_runtime.extractor.Extractor``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from aoanet_runtime.contract import EXTRACTOR, EXTRACTOR_INPUT, EXTRACTOR_SPEC, HEIGHT, WIDTH, TensorSpec
from aoanet_runtime.extractor import Extractor, ExtractorError, ExtractorSpec

log = logging.getLogger(__name__)

RELATIVE_TOLERANCE = 1e-4
DEFAULT_OPSET = 17


def default_size(backbone: str, size: int | None = None, shorter_side: int | None = None, max_side: int | None = None):
    """The spec's ``size``: fixed ``size`` x ``size`` (default: the backbone's), or the shorter-side policy."""
    from aoanet.vision.backbones import BACKBONES

    info = BACKBONES[backbone]
    if shorter_side is not None:
        if size is not None:
            raise ExtractorError("give either a fixed size or a shorter side, not both")
        cap = max_side if max_side is not None else 2 * shorter_side
        return {"policy": "shorter_side", "shorter_side": shorter_side, "max_side": cap, "multiple": info.stride}
    side = size if size is not None else info.default_size
    if side % info.stride:
        raise ExtractorError(f"the input size must be a multiple of the stride {info.stride}, got {side}")
    return {"policy": "fixed", "width": side, "height": side}


def _grid_layer(backbone):
    import paddle

    class Grid(paddle.nn.Layer):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            g = self.net(images)  # [B, C, h, w]
            return g.flatten(2).transpose([0, 2, 1])  # [B, h*w, C], cells row-major

    layer = Grid(backbone)
    layer.eval()
    return layer


def _probe_images(rng, batch: int, width: int, height: int, spec: ExtractorSpec) -> np.ndarray:
    pixels = rng.integers(0, 256, size=(batch, height, width, 3)).astype(np.float32) / 255.0
    x = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def parity(layer, extractor: Extractor, spec: ExtractorSpec, seed: int = 0) -> dict:
    """Paddle dynamic graph vs onnxruntime on random pictures: batch 1 and 3 at the spec's input size, and a
    non-square size (the graph's height and width are dynamic)."""
    import paddle

    rng = np.random.default_rng(seed)
    w, h = spec.input_size(spec.min_side, spec.min_side)
    cases = [(1, w, h), (3, w, h), (2, w + 2 * spec.stride, h + spec.stride)]
    report = {"cases": [], "tolerance": RELATIVE_TOLERANCE}
    worst = 0.0
    for batch, cw, ch in cases:
        x = _probe_images(rng, batch, cw, ch, spec)
        with paddle.no_grad():
            want = layer(paddle.to_tensor(x)).numpy()
        got, _ = extractor.run(x)
        if got.shape != want.shape:
            raise ExtractorError(f"parity: onnxruntime gives {list(got.shape)}, Paddle {list(want.shape)}")
        rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        worst = max(worst, rel)
        report["cases"].append({"batch": batch, "width": cw, "height": ch, "max_rel_diff": rel})
    report["max_rel_diff"] = worst
    report["passed"] = worst <= RELATIVE_TOLERANCE
    return report


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExtractorError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            if not force:
                raise ExtractorError(f"{out_dir} already exists; pass --force to replace it")
            if not (out_dir / EXTRACTOR_SPEC).is_file():
                raise ExtractorError(f"{out_dir} is not empty and holds no {EXTRACTOR_SPEC}: not replacing it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, old / "replaced")
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def export_extractor(
    backbone: str,
    out_dir,
    weights=None,
    pretrained: bool = False,
    size: dict | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
) -> dict:
    """Build ``out_dir`` with extractor.onnx and extractor.json for ``backbone``; returns the spec (as JSON)."""
    import paddle
    from paddle.static import InputSpec

    from aoanet.vision.backbones import BACKBONES, build_backbone
    from aoanet_export.onnx_convert import convert
    from aoanet_export.static import _saved_files, _to_static

    out_dir = Path(out_dir).resolve()
    _check_destination(out_dir, force)
    net, source = build_backbone(backbone, weights, pretrained)  # an unknown name is a BackboneError here
    info = BACKBONES[backbone]
    size = size or default_size(backbone)
    spec = ExtractorSpec(
        backbone=backbone,
        size=size,
        resize_filter=info.resize_filter,
        mean=info.mean,
        std=info.std,
        stride=info.stride,
        feature_width=info.grid_channels,
        layer=info.layer,
        weights=source,
    )
    layer = _grid_layer(net)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        prefix = tmp / "static" / "extractor"
        static = _to_static(layer, [InputSpec([None, 3, None, None], "float32", EXTRACTOR_INPUT)])
        paddle.jit.save(static, str(prefix))
        files = _saved_files(prefix)
        inputs = [TensorSpec(EXTRACTOR_INPUT, "float32", ("batch", 3, HEIGHT, WIDTH))]
        outputs = [TensorSpec("att_feats", "float32", ("batch", "cells", info.grid_channels))]
        log.info("converting the %s extractor to ONNX (opset %d)", backbone, opset)
        convert(files, tmp / EXTRACTOR, opset, inputs, outputs)
        shutil.rmtree(tmp / "static")
        spec_json = spec.to_json()
        (tmp / EXTRACTOR_SPEC).write_text(json.dumps(spec_json, indent=1))
        extractor = Extractor.from_dir(tmp)  # the runtime's checks of the spec against the graph
        report = parity(layer, extractor, spec)
        log.info("extractor parity (max relative difference): %.2e", report["max_rel_diff"])
        if not report["passed"]:
            raise ExtractorError(
                f"the exported extractor does not reproduce the Paddle backbone: max relative difference "
                f"{report['max_rel_diff']:.2e} > {RELATIVE_TOLERANCE:g}"
            )
        spec_json["parity"] = report
        (tmp / EXTRACTOR_SPEC).write_text(json.dumps(spec_json, indent=1))
        os.chmod(tmp, 0o755)
        _check_destination(out_dir, force)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec_json


def import_extractor(onnx_file, spec_file, out_dir, force: bool = False) -> dict:
    """Any ONNX image model with a spec (e.g. a CLIP image tower exported elsewhere): checked by loading it as
    the runtime does (inputs, outputs, the spec's grid and widths on a probe run), then copied into ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    _check_destination(out_dir, force)
    Extractor.from_files(onnx_file, spec_file)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        shutil.copyfile(onnx_file, tmp / EXTRACTOR)
        shutil.copyfile(spec_file, tmp / EXTRACTOR_SPEC)
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out_dir / EXTRACTOR_SPEC).read_text())
