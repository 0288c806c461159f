"""manifest.json: what the runtime needs besides the two graphs (vocabulary, special ids, sizes, decoding
defaults), and what the export was made from and measured at (versions, hashes, parity)."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from aoanet.model import AoAModel
from aoanet_export.errors import ExportError
from aoanet_runtime.contract import (
    CELLS,
    EXTRACTOR,
    EXTRACTOR_FILES,
    EXTRACTOR_INPUT,
    FORMAT_VERSION,
    HEIGHT,
    MANIFEST,
    MODEL_FILES,
    WIDTH,
)

# {precision: {"encoder": file, "decoder": file}}: the fp32 graphs, and the optional int8 ones (aoanet-export --int8;
# a manifest without them is still complete).
FILES = {precision: dict(zip(("encoder", "decoder"), names, strict=True)) for precision, names in MODEL_FILES.items()}

# The authors' evaluation settings (docs/model.md, "Decoding"): beam 2, 20 steps, raw log-prob sums, UNK
# suppressed.
DECODING = {
    "beam_size": 2,
    "max_length": 20,
    "length_penalty": "",
    "suppress_unk": True,
    "block_trigrams": False,
    "remove_bad_endings": False,
    "early_stop": True,
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    import onnx
    import onnxruntime
    import paddle
    import paddle2onnx

    import aoanet

    return {
        "aoanet": aoanet.__version__,
        "paddle": paddle.__version__,
        "paddle2onnx": paddle2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def build(
    export_dir: Path,
    model: AoAModel,
    ix_to_word: dict,
    opset: int,
    graphs: dict,
    static: dict,
    parity: dict,
    source: dict,
    int8: dict | None = None,
    extractor: dict | None = None,
) -> dict:
    """The manifest of the files already in ``export_dir``.

    graphs: {"encoder": {"inputs": [...], "outputs": [...]}, "decoder": {...}} as written by the conversion.
    static: {"encoder": StaticFiles, "decoder": StaticFiles}.
    int8: the ``int8`` section (settings and figures) when the int8 graphs were written, else None.
    extractor: {"spec": ExtractorSpec, "trained_with": bool, ...} when the image extractor's files were copied.
    """
    export_dir = Path(export_dir)
    v = model.vocab_size
    o = model.options
    names = list(FILES["fp32"].values()) + (list(FILES["int8"].values()) if int8 is not None else [])
    files = {}
    for name in names:
        path = export_dir / name
        files[name] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            **graphs[name.split(".")[0]],  # the int8 graphs have the fp32 graphs' inputs and outputs
        }
    if extractor is not None:
        spec = extractor["spec"]
        for name in EXTRACTOR_FILES:
            path = export_dir / name
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        files[EXTRACTOR].update(
            inputs=[{"name": EXTRACTOR_INPUT, "dtype": "float32", "shape": ["batch", 3, HEIGHT, WIDTH]}],
            outputs=[{"name": "att_feats", "dtype": "float32", "shape": ["batch", CELLS, spec.feature_width]}]
            + ([{"name": "fc_feats", "dtype": "float32", "shape": ["batch", spec.fc_width]}] if spec.fc_width else []),
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": "aoanet",
        "ix_to_word": {str(k): w for k, w in ix_to_word.items()},
        "bos_id": 0,
        "eos_id": 0,
        "pad_id": 0,
        "unk_id": model.unk_idx,
        "vocab_size": v,
        "sizes": {
            "vocab_size": v,
            "num_classes": v + 1,
            "rnn_size": o.rnn_size,
            "att_feat_size": o.att_feat_size,
            "input_encoding_size": o.input_encoding_size,
            "num_heads": o.num_heads,
            "refine_layers": o.refine_layers if o.refine else 0,
            "state_layers": 2,
        },
        "model_options": o.to_dict(),
        "decoding": dict(DECODING),
        "opset": opset,
        "versions": versions(),
        "files": files,
        "static": {
            name: {
                "format": f.format,
                "model_file": f.model_file.relative_to(export_dir).as_posix(),
                "params_file": f.params_file.relative_to(export_dir).as_posix(),
            }
            for name, f in static.items()
        },
        "parity": parity,
        "source_checkpoint": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if int8 is not None:
        manifest["int8"] = int8
    if extractor is not None:
        spec = extractor["spec"]
        manifest["extractor"] = {
            "files": list(EXTRACTOR_FILES),
            "backbone": spec.backbone,
            "feature_width": spec.feature_width,
            "size": spec.size,
            "weights": spec.weights,
            # False: attached with aoanet-export --extractor to a model whose training features were not recorded
            "trained_with": bool(extractor["trained_with"]),
        }
    return manifest


def verify(export_dir: Path) -> dict:
    """Load the manifest as the runtime does and check the hash of every file it lists (the runtime checks only
    the graphs it loads); returns the manifest."""
    from aoanet_runtime.exportdir import ExportDirError, load_manifest

    try:
        manifest = load_manifest(export_dir)
    except ExportDirError as e:
        raise ExportError(str(e)) from None
    for name, entry in manifest.get("files", {}).items():
        path = Path(export_dir) / name
        if not path.is_file():
            raise ExportError(f"{export_dir}: {name} is listed in {MANIFEST} but missing")
        if sha256_file(path) != entry.get("sha256"):
            raise ExportError(f"{export_dir}: {name} does not match its sha256 in {MANIFEST}")
    return manifest
