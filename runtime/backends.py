"""The engines ``aoanet-infer`` can caption with: onnxruntime (here), and any other that an installed package
registers under the entry-point group ``aoanet_runtime.backends``. The training package registers ``paddle`` (its
dynamic graph, ``aoanet.infer_backend``), so the runtime never names it.

A backend has ``width`` (feature width), ``ix_to_word``, ``streams`` and ``decode(att_feats, att_masks, beam_size,
max_length, **options) -> DecodeResult`` over one padded batch, may have ``memory_model``
(``aoanet_runtime.features.MemoryModel``: batches are then bounded in memory), and has ``image_extractor()`` -> the
``aoanet_runtime.extractor.Extractor`` its model was trained with (``aoanet-infer --images``), raising BackendError
when it has none. A backend with ``has_attention`` True takes ``decode(..., return_attention=True)`` and returns each
chosen token's attention weights (``DecodeResult.attention``, ``aoanet-infer --attention``); when it is False,
``no_attention_message()`` says why.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "aoanet_runtime.backends"
# What to install for the backends this project knows of, when they are missing or cannot be loaded.
INSTALL_HINTS = {
    "paddle": "the Paddle backend comes with the training package: pip install 'aoanet[paddle,train]'",
}


class BackendError(RuntimeError):
    """A backend that cannot be found, loaded or opened (the message says why and what to install)."""


class OnnxBackend:
    def __init__(self, model: Path, threads: int | None = None, precision: str = "fp32", streams: int = 1):
        from aoanet_runtime.captioner import Captioner
        from aoanet_runtime.exportdir import ExportDirError

        try:
            self.captioner = Captioner.from_dir(model, threads=threads, precision=precision, streams=streams)
        except ExportDirError as e:
            raise BackendError(str(e)) from None
        self.streams = self.captioner.streams
        self.width = self.captioner.att_feat_size
        self.ix_to_word = self.captioner.ix_to_word
        self.memory_model = self.captioner.memory_model
        self.decode = self.captioner.decode
        self.has_attention = self.captioner.has_attention
        self.no_attention_message = self.captioner.no_attention_message

    def image_extractor(self):
        from aoanet_runtime.exportdir import ExportDirError

        try:
            return self.captioner.extractor
        except ExportDirError as e:
            raise BackendError(str(e)) from None


def registered() -> dict:
    """{name: entry point} of the backends installed packages provide."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str, **arguments):
    """Open backend ``name`` with ``arguments`` (its own keyword arguments)."""
    if name == "onnx":
        return OnnxBackend(**arguments)
    hint = INSTALL_HINTS.get(name, "")
    found = registered().get(name)
    if found is None:
        known = ", ".join(["onnx", *sorted(registered())])
        raise BackendError(f"no backend {name!r} is installed (available: {known})" + (f"; {hint}" if hint else ""))
    try:  # a backend may import its framework when it is loaded or when it is opened
        return found.load()(**arguments)
    except ImportError as e:
        raise BackendError(f"the {name} backend cannot be loaded ({e})" + (f"; {hint}" if hint else "")) from None
