"""AoANet captioning from an export directory with numpy and onnxruntime: no Paddle, no training package.

``Captioner.from_dir(EXPORT_DIR).caption(att_feats)`` in Python (``caption_images(pictures)`` when the export has an
image extractor); ``aoanet-infer`` on the command line. The search
(``aoanet_runtime.beam``) is also what the training package decodes with, so onnxruntime is imported only when the
captioner is first used.
"""

__all__ = [
    "Captioner", "Captions", "ExportDirError", "Extractor", "ExtractorError", "FeatureError", "ImageError",
    "NonFiniteError", "load_manifest",
]

_HOMES = {
    "Captioner": "aoanet_runtime.captioner",
    "Captions": "aoanet_runtime.captioner",
    "ExportDirError": "aoanet_runtime.exportdir",
    "load_manifest": "aoanet_runtime.exportdir",
    "FeatureError": "aoanet_runtime.features",
    "Extractor": "aoanet_runtime.extractor",
    "ExtractorError": "aoanet_runtime.extractor",
    "ImageError": "aoanet_runtime.images",
    "NonFiniteError": "aoanet_runtime.beam",
}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'aoanet_runtime' has no attribute {name!r}")
