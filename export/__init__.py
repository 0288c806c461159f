"""Checkpoint -> static graph -> ONNX, with a manifest and a parity check (``aoanet-export``).

``export_checkpoint(checkpoint_dir, out_dir, opset=17, which="best", force=False, int8=False) -> manifest`` writes::

    out_dir/encoder.onnx  decoder.onnx  manifest.json  parity.json
    out_dir/static/{encoder,decoder}.{json|pdmodel,pdiparams}
    out_dir/encoder.int8.onnx  decoder.int8.onnx       (int8=True: dynamically quantized, lossy; aoanet_export.quantize)
"""

from aoanet_export.errors import ExportError, ParityError
from aoanet_export.pipeline import export_checkpoint

__all__ = ["ExportError", "ParityError", "export_checkpoint"]
