"""fp32 ONNX -> int8 ONNX: dynamic quantization of the weight matmuls (``aoanet-export --int8``).

paddle2onnx stores the weights as ``Constant`` nodes (behind ``Identity``), not as initializers, and
``onnxruntime.quantization.quantize_dynamic`` only quantizes a MatMul/Gemm whose weight is an initializer: on the
raw export it quantizes nothing. So the graph first goes through onnxruntime's basic graph optimisations, saved to
a file (constants folded into initializers, MatMul + Add fused into Gemm; standard ONNX ops only), and that file
is quantized: int8 weights, activations quantized to uint8 at run time (``DynamicQuantizeLinear`` +
``MatMulInteger``; onnxruntime fuses them into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` when the
session is created). Matmuls of two activations (attention scores and weights) stay in float32.

The result is lossy: the export measures it against the fp32 graphs (``measure``) and records the figures in the
manifest, but only refuses non-finite outputs; the fp32 graphs keep their parity guarantee, the int8 ones do not.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from aoanet_export.errors import ExportError

log = logging.getLogger(__name__)

# Per-channel weight scales (one scale per output column) rather than per-tensor: as fast, as small and a little
# more accurate (docs/int8.md, "Settings").
PER_CHANNEL = True
WEIGHT_TYPE = "QInt8"
# 8-bit weights (not 7). VNNI CPUs have no u8 x s8 saturation problem; on x86 CPUs without VNNI the runtime's session
# option (aoanet_runtime.sessions.INT8_PRECISION_OPTION) has onnxruntime run these weights as uint8, without saturation,
# which keeps more captions equal to fp32's than 7-bit weights do (docs/int8.md, "Settings").
REDUCE_RANGE = False

# What quantize_dynamic emits for a weight matmul (MatMulInteger; the fused forms in case a later onnxruntime
# emits them directly).
QUANTIZED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm")
FLOAT_MATMULS = ("MatMul", "Gemm")


def settings(per_channel: bool = PER_CHANNEL) -> dict:
    """The quantization settings, for the manifest."""
    import onnxruntime

    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": WEIGHT_TYPE,
        "activation_type": "QUInt8 (dynamic, per tensor)",
        "per_channel": per_channel,
        "reduce_range": REDUCE_RANGE,
        "preprocessing": "onnxruntime ORT_ENABLE_BASIC graph optimisations (constants -> initializers)",
        "onnxruntime": onnxruntime.__version__,
    }


class _QuantizerChatter(logging.Filter):
    # quantize_dynamic logs on the root logger: an INFO line for every tensor and skipped MatMul, and a warning
    # that the model did not go through its own pre-processing (shape inference + the same basic optimisations,
    # done here by fold_constants; shape inference is not needed for the weight matmuls). Noise for
    # aoanet-export's users; its real warnings and errors still pass.
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "consider to run pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    hint = _QuantizerChatter()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _import_quantization():
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:  # onnxruntime.quantization needs onnx and ml_dtypes
        raise ExportError(
            f"--int8 needs onnxruntime's quantization tools ({e}); install them with pip install 'aoanet[export]'"
        ) from None
    return onnxruntime, QuantType, quantize_dynamic


def check_available() -> None:
    """Raise ExportError now (before the slow part of an export) when the quantization tools are missing."""
    _import_quantization()


def _signature(model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.input], [v.name for v in model.graph.output]


def _weight_matmuls(path: Path) -> int:
    """MatMul/Gemm nodes with an initializer operand (the ones quantize_dynamic can quantize)."""
    import onnx

    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    return sum(
        node.op_type in FLOAT_MATMULS and any(x in initializers for x in node.input[:2]) for node in model.graph.node
    )


def fold_constants(src: Path, dst: Path) -> None:
    """onnxruntime's basic (semantics-preserving, standard-op) optimisations of ``src``, saved to ``dst``."""
    ort, _, _ = _import_quantization()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3  # it lists every unused constant it removes
    try:
        ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot optimise {src.name} for quantization: {e}") from None
    if not dst.is_file():
        raise ExportError(f"onnxruntime wrote no optimised graph for {src.name}")


def _restore_declared_shapes(model, source) -> bool:
    """Give the quantized graph's inputs and outputs the fp32 graph's declared types. The optimisation pass
    writes inferred shapes, which can pin a dynamic size to one value (an optional input's default, such as a
    format-3 decoder's ``topk``, would make ``cand_ids`` [batch, 1] instead of [batch, k]). Returns whether anything
    changed."""
    declared = {v.name: v.type for v in list(source.graph.input) + list(source.graph.output)}
    changed = False
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in declared and value.type != declared[value.name]:
            value.type.CopyFrom(declared[value.name])
            changed = True
    return changed


def quantize_file(src, dst, per_channel: bool = PER_CHANNEL) -> dict:
    """Quantize the fp32 ONNX file ``src`` into ``dst``; returns the quantized and float node counts.

    Raises ExportError when no weight matmul was quantized (the int8 file would be the fp32 graph, slower).
    """
    src, dst = Path(src), Path(dst)
    _, QuantType, quantize_dynamic = _import_quantization()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}.") as work:
        folded = Path(work) / "folded.onnx"
        fold_constants(src, folded)
        candidates = _weight_matmuls(folded)
        try:
            with _quiet_root_logger():
                quantize_dynamic(
                    folded,
                    dst,
                    weight_type=getattr(QuantType, WEIGHT_TYPE),
                    per_channel=per_channel,
                    reduce_range=REDUCE_RANGE,
                )
        except Exception as e:
            raise ExportError(f"onnxruntime could not quantize {src.name}: {e}") from None
    import onnx

    model = onnx.load(str(dst))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    source = onnx.load(str(src), load_external_data=False)
    if _restore_declared_shapes(model, source):
        onnx.save(model, str(dst))
    want = _signature(source)
    if _signature(model) != want:
        dst.unlink(missing_ok=True)
        raise ExportError(f"quantizing {src.name} changed its inputs/outputs to {_signature(model)} (expected {want})")
    quantized = {op: ops[op] for op in QUANTIZED_OPS if ops[op]}
    left = {op: ops[op] for op in FLOAT_MATMULS if ops[op]}
    if not quantized:
        dst.unlink(missing_ok=True)
        raise ExportError(
            f"quantizing {src.name} quantized no MatMul/Gemm ({candidates} with a constant weight after constant "
            f"folding; node types now: {dict(ops.most_common(8))}): the int8 graph would be the fp32 graph"
        )
    log.info(
        "%s -> %s: %d weight matmul(s) quantized %s, float matmuls left %s (activation x activation)",
        src.name,
        dst.name,
        sum(quantized.values()),
        quantized,
        left,
    )
    return {"quantized_nodes": quantized, "float_matmuls": left, "weight_matmuls_found": candidates}


def measure(fp32_files: dict, int8_files: dict, att_feat_size: int, threads: int | None = None) -> dict:
    """int8 graphs vs the fp32 graphs on the parity inputs (same cases, seed and chained steps as the parity
    check): max |difference| per output, and the fraction of decoder rows whose argmax token agrees.

    Raises ExportError when an int8 output is not finite (or has the wrong shape).
    """
    from aoanet_export import parity

    threads = threads or min(os.cpu_count() or 1, 4)
    reference = parity.OnnxBackend(fp32_files["encoder"], fp32_files["decoder"], threads)
    backends = {"int8": parity.OnnxBackend(int8_files["encoder"], int8_files["decoder"], threads)}
    rng = np.random.default_rng(0)  # run_parity's seed and case order: the same random inputs
    results = []
    for case in parity.DEFAULT_CASES:
        feats, masks = parity.random_inputs(rng, case, att_feat_size)
        results.append(parity.compare(reference, backends, case, feats, masks, parity.STEPS))
    diffs = {out: max(r["max_abs_diff"]["int8"][out] for r in results) for out in parity.OUTPUTS}
    bad = [out for out, v in diffs.items() if not np.isfinite(v)]
    if bad:
        raise ExportError(
            f"the int8 graphs give non-finite (or mis-shaped) {', '.join(bad)} on the parity inputs; "
            "export without --int8"
        )
    candidates = backends["int8"].candidates
    if candidates and candidates["mismatched_rows"]:
        raise ExportError(
            f"the int8 decoder's candidate head differs from numpy's top-{candidates['k']} of its own log-probs in "
            f"{candidates['mismatched_rows']} of {candidates['rows']} rows"
        )
    rows = [case.rows * parity.STEPS for case in parity.DEFAULT_CASES]
    agreeing = sum(r["argmax_agreement"]["int8"] * n for r, n in zip(results, rows, strict=True))
    from aoanet_runtime.sessions import cpu_has_int8_dot, int8_session_entries

    return {
        "reference": "the fp32 ONNX graphs (onnxruntime)",
        # int8 kernels differ by CPU: the figures below hold for the one they were measured on
        "measured_on": {
            "cpu_int8_dot_product": cpu_has_int8_dot(),  # x86 VNNI; None: unknown (not x86)
            "session_options": int8_session_entries(),
        },
        "steps": parity.STEPS,
        "cases": [[c.batch, c.regions] for c in parity.DEFAULT_CASES],
        "max_abs_diff_logprobs": diffs["logprobs"],
        "max_abs_diff": diffs,
        "argmax_agreement": agreeing / sum(rows),
        "min_argmax_agreement": min(r["argmax_agreement"]["int8"] for r in results),
        "candidates": candidates,
    }
