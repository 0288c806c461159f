"""The image extractor: an ONNX graph (``extractor.onnx``) and its spec (``extractor.json``), run with onnxruntime.

The graph takes ``images`` float32 [B, 3, H, W] (resized and normalised as the spec says) and returns
``att_feats`` [B, N, F], a grid of N = (H / stride) x (W / stride) cells in row-major order, and optionally
``fc_feats`` [B, F'] (otherwise the fc vector is the mean of the cells, as the reference's make_bu_data writes it).
The spec says how to turn a picture into that input and what comes out:

* ``backbone``, ``layer``, ``weights`` (file name and sha256): what the graph computes;
* ``size``: ``{"policy": "fixed", "width", "height"}`` (every image resized to that size, aspect not kept) or
  ``{"policy": "shorter_side", "shorter_side", "max_side", "multiple"}`` (scaled so the shorter side is
  ``shorter_side`` with the longer one capped at ``max_side``, each side then rounded to a multiple of the stride);
* ``resize_filter`` (Pillow's: bicubic, bilinear ...), ``colour`` (RGB), ``mean`` and ``std`` (per channel, on
  pixels scaled to 0..1);
* ``stride``, ``feature_width`` (F), ``fc_width``, and ``grid``: the rule and, for a fixed size, the grid's shape
  and the normalised box (x1, y1, x2, y2 in 0..1) of every cell, so attention can be drawn on the picture.

docs/images.md describes the whole stage. numpy, Pillow and onnxruntime only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aoanet_runtime.contract import (
    EXTRACTOR,
    EXTRACTOR_INPUT,
    EXTRACTOR_OPTIONAL_OUTPUTS,
    EXTRACTOR_OUTPUTS,
    EXTRACTOR_SPEC,
    EXTRACTOR_SPEC_VERSION,
)
from aoanet_runtime.images import DEFAULT_MAX_PIXELS, FILTERS, ImageError, load_rgb, preprocess

__all__ = ["Extractor", "ExtractorError", "ExtractorSpec", "ImageFeatures", "cell_boxes"]

POLICIES = ("fixed", "shorter_side")


class ExtractorError(ValueError):
    """An extractor that cannot be used: missing or malformed spec (naming the field), a graph that does not
    match its spec, a file that does not match its recorded hash."""


def cell_boxes(grid_h: int, grid_w: int) -> np.ndarray:
    """The normalised boxes (x1, y1, x2, y2) of a grid's cells, row-major -> float32 [grid_h * grid_w, 4]."""
    ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ys, xs = ys.ravel().astype(np.float64), xs.ravel().astype(np.float64)
    return np.stack([xs / grid_w, ys / grid_h, (xs + 1) / grid_w, (ys + 1) / grid_h], axis=1).astype(np.float32)


@dataclass(frozen=True)
class ExtractorSpec:
    backbone: str
    size: dict
    resize_filter: str
    mean: tuple
    std: tuple
    stride: int
    feature_width: int
    fc_width: int | None = None  # None: no fc_feats output, fc = mean of the cells
    layer: str = ""
    weights: dict | None = None
    colour: str = "RGB"

    # ------------------------------------------------------------------------------------- sizes
    @property
    def fixed(self) -> bool:
        return self.size["policy"] == "fixed"

    @property
    def min_side(self) -> int:
        """The smallest side an input may have (what a JPEG may be decoded down to)."""
        if self.fixed:
            return int(min(self.size["width"], self.size["height"]))
        return int(self.size["shorter_side"])

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the extractor's input for a picture of ``width`` x ``height``."""
        if self.fixed:
            return int(self.size["width"]), int(self.size["height"])
        short, cap, m = self.size["shorter_side"], self.size["max_side"], self.size["multiple"]
        scale = min(short / min(width, height), cap / max(width, height))
        return tuple(max(m, int(round(side * scale / m)) * m) for side in (width, height))

    def grid(self, input_width: int, input_height: int) -> tuple[int, int]:
        """(rows, columns) of the grid for an input of that size."""
        return math.ceil(input_height / self.stride), math.ceil(input_width / self.stride)

    # ------------------------------------------------------------------------------------- json
    def to_json(self) -> dict:
        out = {
            "spec_version": EXTRACTOR_SPEC_VERSION,
            "backbone": self.backbone,
            "layer": self.layer,
            "weights": self.weights or {},
            "input": {"name": EXTRACTOR_INPUT, "dtype": "float32", "layout": "NCHW"},
            "colour": self.colour,
            "size": dict(self.size),
            "resize_filter": self.resize_filter,
            "mean": list(self.mean),
            "std": list(self.std),
            "pixel_scale": "pixel / 255, then (x - mean) / std",
            "stride": self.stride,
            "feature_width": self.feature_width,
            "fc_width": self.fc_width,
            "fc": "fc_feats output" if self.fc_width is not None else "mean of the cells",
            "grid": {"rule": "ceil(H / stride) rows x ceil(W / stride) columns, row-major; boxes x1 y1 x2 y2 in 0..1"},
        }
        if self.fixed:
            w, h = self.input_size(1, 1)
            rows, cols = self.grid(w, h)
            out["grid"].update(rows=rows, columns=cols, cells=cell_boxes(rows, cols).round(6).tolist())
        return out

    @classmethod
    def from_json(cls, data, where: str = EXTRACTOR_SPEC) -> ExtractorSpec:
        """Checked: every field present and of the right kind, else an ExtractorError naming it."""

        def fail(field: str, problem: str):
            raise ExtractorError(f"{where}: field '{field}' {problem}")

        if not isinstance(data, dict):
            raise ExtractorError(f"{where}: not a JSON object")
        if data.get("spec_version") != EXTRACTOR_SPEC_VERSION:
            fail("spec_version", f"is {data.get('spec_version')!r}; this runtime reads {EXTRACTOR_SPEC_VERSION}")
        for field in ("backbone", "size", "resize_filter", "mean", "std", "stride", "feature_width"):
            if field not in data:
                fail(field, "is missing")
        size = data["size"]
        if not isinstance(size, dict) or size.get("policy") not in POLICIES:
            fail("size", f"must be an object with policy one of {', '.join(POLICIES)}, got {size!r}")
        keys = ("width", "height") if size["policy"] == "fixed" else ("shorter_side", "max_side", "multiple")
        for k in keys:
            v = size.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f"size.{k}", f"must be a positive integer, got {v!r}")
        if size["policy"] == "shorter_side" and size["max_side"] < size["shorter_side"]:
            fail("size.max_side", f"({size['max_side']}) is below size.shorter_side ({size['shorter_side']})")
        if data["resize_filter"] not in FILTERS:
            fail("resize_filter", f"is {data['resize_filter']!r}, one of {', '.join(FILTERS)} expected")
        for k in ("mean", "std"):
            v = data[k]
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                fail(k, f"must be a list of 3 numbers (R, G, B), got {v!r}")
        if any(x <= 0 for x in data["std"]):
            fail("std", "must be positive")
        if data.get("colour", "RGB") != "RGB":
            fail("colour", f"is {data.get('colour')!r}; only RGB is supported")
        for k in ("stride", "feature_width"):
            v = data[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(k, f"must be a positive integer, got {v!r}")
        fc = data.get("fc_width")
        if fc is not None and (not isinstance(fc, int) or fc < 1):
            fail("fc_width", f"must be a positive integer or null, got {fc!r}")
        return cls(
            backbone=str(data["backbone"]),
            size=dict(size),
            resize_filter=data["resize_filter"],
            mean=tuple(float(x) for x in data["mean"]),
            std=tuple(float(x) for x in data["std"]),
            stride=int(data["stride"]),
            feature_width=int(data["feature_width"]),
            fc_width=fc,
            layer=str(data.get("layer", "")),
            weights=data.get("weights") or {},
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> ExtractorSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExtractorError(f"{path}: extractor spec not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExtractorError(f"{path}: cannot read it as JSON ({e})") from None
        return cls.from_json(data, str(path))


@dataclass
class ImageFeatures:
    """One picture's features: ``att`` float32 [N, F], ``fc`` float32 [F'], ``boxes`` float32 [N, 4] (cells in
    the picture's pixels, x1 y1 x2 y2, as cocobu_box), ``size`` (width, height) of the picture as decoded, ``grid``
    (rows, columns) of the cells (N = rows x columns, row-major)."""

    att: np.ndarray
    fc: np.ndarray
    boxes: np.ndarray
    size: tuple[int, int]
    grid: tuple[int, int] | None = None


def load_picture(source, spec: ExtractorSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and pre-process one picture as ``spec`` says (no session needed: what a loading task runs) ->
    (float32 [3, H, W], (width, height) as decoded)."""
    img = load_rgb(source, max_pixels, spec.min_side, name=name)
    size = spec.input_size(*img.size)
    return preprocess(img, size, spec.resize_filter, spec.mean, spec.std), img.size


class Extractor:
    """An extractor session and its spec; ``features(images)`` runs pictures through both."""

    def __init__(self, session, spec: ExtractorSpec, where: str = EXTRACTOR, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.session, self.spec, self.where, self.max_pixels = session, spec, where, max_pixels
        outputs = [o.name for o in session.get_outputs()]
        inputs = session.get_inputs()
        if [i.name for i in inputs] != [EXTRACTOR_INPUT]:
            raise ExtractorError(f"{where}: the graph's inputs are {[i.name for i in inputs]}, expected ['images']")
        missing = [o for o in EXTRACTOR_OUTPUTS if o not in outputs]
        if missing:
            raise ExtractorError(f"{where}: the graph has no output {missing[0]!r} (outputs: {outputs})")
        self.has_fc = EXTRACTOR_OPTIONAL_OUTPUTS[0] in outputs
        if self.has_fc != (spec.fc_width is not None):
            raise ExtractorError(
                f"{where}: the spec says fc_width={spec.fc_width} but the graph "
                + ("has" if self.has_fc else "has no")
                + " fc_feats output"
            )
        self.outputs = list(EXTRACTOR_OUTPUTS) + (list(EXTRACTOR_OPTIONAL_OUTPUTS) if self.has_fc else [])
        self._probe()

    @classmethod
    def from_bytes(
        cls,
        onnx_bytes: bytes,
        spec_bytes: bytes,
        where: str = EXTRACTOR,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> Extractor:
        """From the graph's and the spec's bytes (an export dir's files, already checked against their hashes)."""
        import onnxruntime as ort

        from aoanet_runtime.sessions import choose_providers, session_options

        try:
            spec = ExtractorSpec.from_json(json.loads(spec_bytes.decode("utf-8")), f"{where}: {EXTRACTOR_SPEC}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExtractorError(f"{where}: {EXTRACTOR_SPEC} is not JSON ({e})") from None
        try:
            session = ort.InferenceSession(
                onnx_bytes, sess_options=session_options(threads), providers=choose_providers(providers)
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExtractorError(f"{where}: onnxruntime cannot load the extractor graph ({e})") from None
        return cls(session, spec, where)

    @classmethod
    def from_files(
        cls,
        onnx_path: str | os.PathLike,
        spec_path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> Extractor:
        onnx_path, spec_path = Path(onnx_path), Path(spec_path)
        ExtractorSpec.read(spec_path)  # its errors name the spec file
        try:
            onnx_bytes = onnx_path.read_bytes()
        except FileNotFoundError:
            raise ExtractorError(f"{onnx_path}: extractor graph not found") from None
        except OSError as e:
            raise ExtractorError(f"{onnx_path}: cannot read it ({e})") from None
        return cls.from_bytes(
            onnx_bytes, spec_path.read_bytes(), f"{onnx_path} (spec {spec_path.name})", providers, threads
        )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, **kwargs) -> Extractor:
        directory = Path(directory)
        if not directory.is_dir():
            raise ExtractorError(f"{directory}: extractor directory not found")
        return cls.from_files(directory / EXTRACTOR, directory / EXTRACTOR_SPEC, **kwargs)

    def _probe(self) -> None:
        """Run the graph once at the spec's input size: the output shapes must be the spec's grid and widths."""
        w, h = self.spec.input_size(self.spec.min_side, self.spec.min_side)
        try:
            out = self.session.run(self.outputs, {EXTRACTOR_INPUT: np.zeros((1, 3, h, w), np.float32)})
        except Exception as e:
            raise ExtractorError(
                f"{self.where}: the graph does not run on the spec's input [1, 3, {h}, {w}] ({e})"
            ) from None
        rows, cols = self.spec.grid(w, h)
        want = (1, rows * cols, self.spec.feature_width)
        if out[0].ndim != 3 or tuple(out[0].shape) != want:
            raise ExtractorError(
                f"{self.where}: the spec does not match the graph: for an input of {w}x{h} the graph gives "
                f"att_feats of shape {list(out[0].shape)}, the spec promises {list(want)} (a {rows}x{cols} grid of "
                f"feature_width {self.spec.feature_width}, stride {self.spec.stride})"
            )
        if self.has_fc and tuple(out[1].shape) != (1, self.spec.fc_width):
            raise ExtractorError(
                f"{self.where}: the spec does not match the graph: fc_feats has shape {list(out[1].shape)}, the "
                f"spec promises [1, {self.spec.fc_width}]"
            )

    # ------------------------------------------------------------------------------------- running
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, H, W] (pre-processed) -> (att_feats [B, N, F], fc_feats [B, F'])."""
        out = self.session.run(self.outputs, {EXTRACTOR_INPUT: np.ascontiguousarray(batch, np.float32)})
        att = out[0]
        fc = out[1] if self.has_fc else att.mean(axis=1)
        return att, fc

    def load(self, source, name: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
        """One picture (path, bytes, PIL image or uint8 array) -> (pre-processed [3, H, W], (width, height)
        decoded)."""
        return load_picture(source, self.spec, self.max_pixels, name)

    def features_of(self, loaded: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> list[ImageFeatures]:
        """Run pre-processed pictures (``load``'s results), batching those of one input size together."""
        out: list[ImageFeatures | None] = [None] * len(loaded)
        by_size: dict[tuple, list[int]] = {}
        for j, (x, _) in enumerate(loaded):
            by_size.setdefault(x.shape, []).append(j)
        for idx in by_size.values():
            att, fc = self.run(np.stack([loaded[j][0] for j in idx]))
            for row, j in enumerate(idx):
                x, (w, h) = loaded[j]
                rows, cols = self.spec.grid(x.shape[2], x.shape[1])
                boxes = cell_boxes(rows, cols) * np.array([w, h, w, h], np.float32)
                out[j] = ImageFeatures(att[row], fc[row], boxes, (w, h), (rows, cols))
        return out  # type: ignore[return-value]

    def features(
        self,
        images: Sequence,
        batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
        workers: int = 2,
    ) -> list[ImageFeatures]:
        """Features of each picture (paths, PIL images or uint8 arrays), in order. Pictures are decoded and
        pre-processed on ``workers`` threads (Pillow releases the GIL) while the graph runs on the previous
        batch; inputs of one size are batched together. The first bad picture raises its ImageError."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        chunks = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]

        def load_chunk(pos):
            return [
                self.load(images[i], None if isinstance(images[i], (str, os.PathLike)) else f"image {i}") for i in pos
            ]

        out: list[ImageFeatures] = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = [pool.submit(load_chunk, c) for c in chunks[:2]]
            try:
                for k, pos in enumerate(chunks):
                    loaded = pending[k].result()
                    if k + 2 < len(chunks):
                        pending.append(pool.submit(load_chunk, chunks[k + 2]))
                    out.extend(self.features_of(loaded))
                    if on_batch is not None:
                        on_batch(len(pos))
            finally:
                for future in pending:
                    future.cancel()
        return out


__all__ += ["ImageError"]
