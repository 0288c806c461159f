"""The contract between ``aoanet-export`` (the writer) and the runtime (the reader): file names, format versions,
tensor names and dimensions. Both sides import it from here, so they cannot drift apart.

An export directory holds ``manifest.json`` and two ONNX graphs per precision:

* the encoder, ``att_feats [B, N, F]``, ``att_masks [B, N]`` -> ``mean_feats [B, R]``, ``p_att_feats [B, N, 2R]``
  (the model's own form of the memory) and the same memory in the decoder attention's head layout,
  ``att_values``, ``att_keys [B, H, N, R/H]``;
* one decoder step, ``it [B]``, ``state_h``, ``state_c [2, B, R]``, ``mean_feats [B, R]``, the memory
  (``att_values``, ``att_keys [I, H, N, R/H]``, ``att_masks [I, N]``) and ``topk [1]`` -> ``logprobs [B, V+1]``,
  ``next_state_h``, ``next_state_c``, ``attention [B, H, N]`` (each row's attention weights over the regions, per
  head; fetched only by callers that ask for them) and the candidate head ``cand_logprobs``, ``cand_ids [B, k]``
  (each row's ``topk`` best words, ties to the lower id). Rows are image-major with the same number per image (the
  beams), and the memory has one row per image (I = B / beams) or one per row (I = B).

and, when the model was trained on features of an image extractor, that extractor: ``extractor.onnx`` (``images
[B, 3, H, W]`` -> ``att_feats [B, N, F]``, optionally ``fc_feats [B, F]``) and its spec ``extractor.json``
(``aoanet_runtime.extractor``), so that the export captions image files.

docs/export-format.md describes every field and what each format version changed.
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST = "manifest.json"
PARITY = "parity.json"

# 6: the decoder has the output ``attention`` [B, H, N] (the step's attention weights); exports of 2-5 are read and
#    caption as before, without attention.
# 5: the manifest may list an image extractor (``extractor.onnx`` + ``extractor.json``, hashed in ``files``, described
#    in its ``extractor`` section); a reader of 4 would silently ignore it.
# 4: ``topk`` is a required decoder input (3 gave it a default through an initializer, which onnxruntime warns
#    about), and the graphs carry no unused constants.
# 3: the decoder has the candidate head. 2: the decoder takes the memory in head layout, a row per image.
FORMAT_VERSION = 6
READABLE_FORMAT_VERSIONS = (2, 3, 4, 5, 6)

ENCODER, DECODER = "encoder.onnx", "decoder.onnx"
# The graphs of each precision; the int8 ones are optional in an export (aoanet-export --int8).
MODEL_FILES = {"fp32": (ENCODER, DECODER), "int8": ("encoder.int8.onnx", "decoder.int8.onnx")}
PRECISIONS = tuple(MODEL_FILES)

# The image extractor (optional in an export; also the unit ``aoanet-data extractor`` writes and ``aoanet-data
# extract`` reads): one graph and its spec, side by side.
EXTRACTOR, EXTRACTOR_SPEC = "extractor.onnx", "extractor.json"
EXTRACTOR_FILES = (EXTRACTOR, EXTRACTOR_SPEC)
EXTRACTOR_SPEC_VERSION = 1
EXTRACTOR_INPUT = "images"
EXTRACTOR_OUTPUTS = ("att_feats",)
EXTRACTOR_OPTIONAL_OUTPUTS = ("fc_feats",)
# The extractor's symbolic dimensions (the grid's cell count N follows from H and W).
HEIGHT, WIDTH, CELLS = "height", "width", "cells"

# Symbolic dimensions.
BATCH, REGIONS, IMAGES, TOPK = "batch", "regions", "images", "k"

ENCODER_INPUTS = ("att_feats", "att_masks")
ENCODER_OUTPUTS = ("mean_feats", "p_att_feats", "att_values", "att_keys")
# What the decoder needs of the encoder's outputs (p_att_feats is for callers that want the model's form).
ENCODER_MEMORY_OUTPUTS = ("mean_feats", "att_values", "att_keys")
# The traced decoder step, in the order of its arguments and results.
DECODER_INPUTS = ("it", "state_h", "state_c", "mean_feats", "att_values", "att_keys", "att_masks")
DECODER_OUTPUTS = ("logprobs", "next_state_h", "next_state_c")
# The decoder step's attention weights over the regions, per head [B, H, N]: traced after DECODER_OUTPUTS (format 6);
# a search fetches it only when asked for the weights.
ATTENTION_OUTPUT = "attention"
# The candidate head, appended to the converted decoder graph.
HEAD_INPUTS = ("topk",)
HEAD_OUTPUTS = ("cand_logprobs", "cand_ids")
# What a search fetches when it reads only each row's best words.
CANDIDATE_OUTPUTS = ("cand_ids", "cand_logprobs", "next_state_h", "next_state_c")
# The decoder inputs that hold an image's memory: one row per image, shared by its beams.
MEMORY = ("att_values", "att_keys", "att_masks")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64
    shape: tuple  # ints for fixed sizes, names for the dynamic ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def graph_specs(vocab_size: int, rnn_size: int, att_feat_size: int, num_heads: int) -> dict[str, tuple[list, list]]:
    """{"encoder" | "decoder": (inputs, outputs)} as TensorSpecs, in graph order."""
    r, f, b, n, h = rnn_size, att_feat_size, BATCH, REGIONS, num_heads
    masks = TensorSpec("att_masks", "float32", (b, n))
    mean = TensorSpec("mean_feats", "float32", (b, r))
    return {
        "encoder": (
            [TensorSpec("att_feats", "float32", (b, n, f)), masks],
            [
                mean,
                TensorSpec("p_att_feats", "float32", (b, n, 2 * r)),
                TensorSpec("att_values", "float32", (b, h, n, r // h)),
                TensorSpec("att_keys", "float32", (b, h, n, r // h)),
            ],
        ),
        "decoder": (
            [
                TensorSpec("it", "int64", (b,)),
                TensorSpec("state_h", "float32", (2, b, r)),
                TensorSpec("state_c", "float32", (2, b, r)),
                mean,
                TensorSpec("att_values", "float32", (IMAGES, h, n, r // h)),
                TensorSpec("att_keys", "float32", (IMAGES, h, n, r // h)),
                TensorSpec("att_masks", "float32", (IMAGES, n)),
                TensorSpec("topk", "int64", (1,)),
            ],
            [
                TensorSpec("logprobs", "float32", (b, vocab_size + 1)),
                TensorSpec("next_state_h", "float32", (2, b, r)),
                TensorSpec("next_state_c", "float32", (2, b, r)),
                TensorSpec(ATTENTION_OUTPUT, "float32", (b, h, n)),
                TensorSpec("cand_logprobs", "float32", (b, TOPK)),
                TensorSpec("cand_ids", "int64", (b, TOPK)),
            ],
        ),
    }
