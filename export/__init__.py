"""Checkpoint -> static graph -> ONNX, with a manifest and a parity check (``aoanet-export``).

``export_checkpoint(checkpoint_dir, out_dir, opset=17, which="best", force=False, int8=False) -> manifest`` writes::

    out_dir/encoder.onnx  decoder.onnx  manifest.json  parity.json
    out_dir/static/{encoder,decoder}.{json|pdmodel,pdiparams}
    out_dir/encoder.int8.onnx  decoder.int8.onnx       (int8=True: dynamically quantized, lossy; aoanet_export.quantize)
"""

from aoanet_export.errors import ExportError, ParityError

__all__ = ["ExportError", "ParityError", "export_checkpoint"]


def __getattr__(name):
    # Paddle is imported with the pipeline, on first use: the command (aoanet_export.cli) configures the math
    # library and the warnings first.
    if name == "export_checkpoint":
        from aoanet_export.pipeline import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module 'aoanet_export' has no attribute {name!r}")
