"""Checkpoint -> static graph -> ONNX, with a manifest and a parity check (``aoanet-export``).

``export_checkpoint(checkpoint_dir, out_dir, opset=17, which="best", force=False) -> manifest`` writes::

    out_dir/encoder.onnx  decoder.onnx  manifest.json  parity.json
    out_dir/static/{encoder,decoder}.{json|pdmodel,pdiparams}
"""

import aoanet  # noqa: F401  (sets MKL_DEBUG_CPU_TYPE before Paddle is imported)
from export.errors import ExportError, ParityError
from export.pipeline import export_checkpoint

__all__ = ["ExportError", "ParityError", "export_checkpoint"]
