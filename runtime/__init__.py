"""Captioning with the exported ONNX graphs: numpy + onnxruntime only (never paddle, never ``aoanet``).

``Captioner.from_dir(EXPORT_DIR).caption(att_feats)``; ``aoanet-infer`` is the command. ``runtime.beam`` (the
shared search) is also used by the training side, which is why onnxruntime is only imported on first use of
``Captioner`` here.
"""

__all__ = ["Captioner", "Captions", "ExportDirError", "FeatureError"]


def __getattr__(name):
    if name in __all__:
        from runtime import captioner

        return getattr(captioner, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
