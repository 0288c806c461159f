"""Static graph -> ONNX with paddle2onnx, then the contract's tensor names and symbolic dimensions.

paddle2onnx 2.x (Paddle 3.x, PIR ``.json`` graphs) and 1.x (Paddle 2.6, ``.pdmodel`` graphs; 2.x refuses a
Paddle older than 3.0) share the ``export()`` call used here; 2.x calls ``sys.exit`` on a failed conversion,
1.x returns nothing, and both become an ExportError.

paddle2onnx names the graph's results ``fetch_name_<i>`` and its dynamic dimensions
``DynamicDimension.<k>``; the runtime relies on the names of the contract (``aoanet_runtime.contract``) instead, so
both are rewritten here, constants nothing reads are dropped, and the result is checked with ``onnx.checker``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from aoanet_export.errors import ExportError
from aoanet_export.static import StaticFiles
from aoanet_runtime.contract import BATCH, HEAD_INPUTS, HEAD_OUTPUTS, TOPK, TensorSpec

log = logging.getLogger(__name__)

# The opsets this export is tested with (every op it needs exists unchanged in 13..17).
MIN_OPSET, MAX_OPSET = 13, 17

def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET} (the tested range), got {opset!r}"
        )
    return opset


def import_paddle2onnx():
    try:
        import paddle2onnx
    except ImportError as e:
        raise ExportError(
            f"paddle2onnx is not installed ({e}); install the export extra: pip install -e '.[export]' "
            "(paddle2onnx==2.1.0, onnx; with Paddle 2.6: paddle2onnx==1.3.1)"
        ) from e
    except ValueError as e:  # paddle2onnx 2.x refuses a Paddle older than 3.0 with a ValueError at import
        raise ExportError(f"paddle2onnx cannot be used with the installed Paddle: {e}") from e
    return paddle2onnx


def convert(files: StaticFiles, onnx_path: Path, opset: int, inputs: list, outputs: list) -> dict:
    """Convert one static graph, rename its results, add the candidate head when ``inputs``/``outputs`` name it
    (HEAD_INPUTS, HEAD_OUTPUTS: the traced graph has the others), fix its symbolic dims, check and save it.

    Returns a description of the graph's inputs and outputs as written (names, dtypes, shapes).
    """
    import onnx

    check_opset(opset)
    paddle2onnx = import_paddle2onnx()
    major = _major(getattr(paddle2onnx, "__version__", ""))
    if files.format == "pir" and major is not None and major < 2:
        raise ExportError(
            f"paddle2onnx {paddle2onnx.__version__} cannot read {files.model_file.name}, a PIR graph (Paddle 3.x); "
            "install paddle2onnx==2.1.0"
        )
    try:
        # save_file=None: get the bytes back. On a conversion error paddle2onnx logs it and calls
        # sys.exit(-1): catch that too, so that a failed conversion is an ExportError, not the process's end.
        data = paddle2onnx.export(
            str(files.model_file),
            str(files.params_file),
            None,
            opset_version=opset,
            auto_upgrade_opset=False,
            enable_onnx_checker=True,
        )
    except (Exception, SystemExit) as e:
        detail = "its error is logged above" if isinstance(e, SystemExit) else repr(e)
        raise ExportError(
            f"paddle2onnx could not convert {files.model_file.name} at opset {opset} ({detail})"
        ) from e
    if not data:  # paddle2onnx 1.x reports a failed conversion this way (logged, empty result)
        raise ExportError(
            f"paddle2onnx could not convert {files.model_file.name} at opset {opset} "
            "(it returned nothing; its error is logged above)"
        )
    model = onnx.load_from_string(data)
    got = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
    if got != opset:
        raise ExportError(f"paddle2onnx wrote opset {got} for {files.model_file.name}, {opset} was asked for")

    traced_inputs = [s for s in inputs if s.name not in HEAD_INPUTS]
    traced_outputs = [s for s in outputs if s.name not in HEAD_OUTPUTS]
    _check_inputs(model, traced_inputs, files)
    _rename_outputs(model, [o.name for o in traced_outputs], files)
    fused = fuse_log_softmax(model)
    if fused:
        log.info("%s: %d x - ReduceLogSumExp(x) fused into LogSoftmax", onnx_path.name, fused)
    bypass_output_identities(model)
    prune_unused(model)
    if len(traced_outputs) < len(outputs):
        add_candidate_head(model)
    for spec, value in zip(inputs + outputs, list(model.graph.input) + list(model.graph.output), strict=True):
        _set_shape(value, spec)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"{onnx_path.name} fails onnx.checker: {e}") from e
    onnx_path.write_bytes(model.SerializeToString())
    return {"inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs]}


def fuse_log_softmax(model) -> int:
    """Rewrite ``Sub(x, ReduceLogSumExp(x, axes=[last], keepdims=1))`` as ``LogSoftmax(x, axis=-1)``.

    The model writes log-softmax as ``x - logsumexp(x)`` because Paddle's CPU log_softmax kernel is slow; in
    onnxruntime it is the other way round: ReduceLogSumExp is much slower than LogSoftmax at the decoder's
    shape (docs/benchmarks.md). Same function; the export's parity check covers the result.
    Returns the number of rewrites.
    """
    import onnx

    graph = model.graph
    nodes = [copy.deepcopy(n) for n in graph.node]
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.input) + list(graph.value_info)}
    users: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            users.setdefault(name, []).append(i)
    graph_outputs = {v.name for v in graph.output}
    replace, drop = {}, set()
    for i, node in enumerate(nodes):
        if node.op_type != "ReduceLogSumExp" or len(node.input) != 1:  # opset <= 17: axes is an attribute
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes, keepdims = list(attrs.get("axes", [])), attrs.get("keepdims", 1)
        x, lse = node.input[0], node.output[0]
        last = axes == [-1] or (x in rank and axes == [rank[x] - 1])
        if keepdims != 1 or not last:
            continue
        chain = [i]  # paddle2onnx puts Identity nodes between the reduction and its user
        while lse not in graph_outputs and len(users.get(lse, [])) == 1 and nodes[users[lse][0]].op_type == "Identity":
            chain.append(users[lse][0])
            lse = nodes[chain[-1]].output[0]
        if lse in graph_outputs or len(users.get(lse, [])) != 1:
            continue
        j = users[lse][0]
        sub = nodes[j]
        if sub.op_type != "Sub" or list(sub.input) != [x, lse]:
            continue
        drop.update(chain)
        replace[j] = onnx.helper.make_node(
            "LogSoftmax", [x], list(sub.output), axis=-1, name=f"{sub.name or 'sub'}_log_softmax"
        )
    if replace:
        kept = [replace.get(i, n) for i, n in enumerate(nodes) if i not in drop]
        del graph.node[:]
        graph.node.extend(kept)
    return len(replace)


def prune_unused(model) -> int:
    """Drop the nodes and initializers no graph output depends on (paddle2onnx leaves Constant nodes that nothing
    reads; onnxruntime removes them itself, with a warning per constant). Returns the number of nodes dropped."""
    graph = model.graph
    needed = {v.name for v in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are in topological order
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(_reads(node))
    dropped = len(graph.node) - len(kept)
    if dropped:
        del graph.node[:]
        graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    if len(initializers) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(initializers)
    return dropped


def _reads(node) -> set[str]:
    """The names a node reads, with those its subgraphs (If, Loop, Scan bodies) read from the outer scope."""
    import onnx

    names = {name for name in node.input if name}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                names |= _reads(inner)
    return names


def add_candidate_head(model, logprobs: str = "logprobs") -> None:
    """Append to the decoder graph an input ``topk`` int64 [1] and the outputs ``cand_ids``
    int64 [B, k], each row's ``topk`` words by log-prob, best first, ties to the lower id (ONNX TopK's order, the
    same as a stable descending sort), and ``cand_logprobs`` float32 [B, k], their log-probs.

    Why: a beam search of K beams reads only each row's K best words after the UNK penalty, which are among the
    K + 1 best before it (aoanet_runtime.beam.Candidates.top), so fetching those moves [rows, K + 1] numbers out of the
    graph instead of [rows, V+1] (5.7 MB per full-size step at batch 50 x beam 3) and leaves no vocabulary scan
    to numpy; on a GPU it also spares the device-to-host copy. ``logprobs`` stays an output for the searches that
    need every value (block_trigrams, remove_bad_endings). ``topk`` is a plain required input: a default given
    through an initializer of the same name makes onnxruntime warn at every session and keeps it from folding
    constants around it, and every caller knows what k it wants.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    if logprobs not in {o.name for o in graph.output}:
        raise ExportError(f"the decoder graph has no output {logprobs!r} to add the candidate head to")
    graph.input.append(helper.make_tensor_value_info("topk", TensorProto.INT64, [1]))
    graph.node.append(
        helper.make_node(
            "TopK", [logprobs, "topk"], ["cand_logprobs", "cand_ids"], axis=-1, largest=1, sorted=1,
            name="candidates_topk",
        )
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info("cand_logprobs", TensorProto.FLOAT, [BATCH, TOPK]),
            helper.make_tensor_value_info("cand_ids", TensorProto.INT64, [BATCH, TOPK]),
        ]
    )


def bypass_output_identities(model) -> int:
    """Remove the ``Identity`` nodes paddle2onnx puts in front of graph outputs, renaming the producer's output
    instead (when that output is the Identity's alone). onnxruntime drops such an Identity itself only while the
    output has no other consumer; the candidate head reads ``logprobs``, and the Identity would then copy it at
    every step (docs/benchmarks.md). Returns the number removed."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    fixed = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    producer = {name: node for node in graph.node for name in node.output}
    drop = []
    for node in graph.node:
        if node.op_type != "Identity" or node.output[0] not in outputs:
            continue
        src, out = node.input[0], node.output[0]
        if src in fixed or src in outputs or users.get(src, 0) != 1 or src not in producer:
            continue
        owner = producer[src]
        owner.output[:] = [out if x == src else x for x in owner.output]
        for info in graph.value_info:
            if info.name == src:
                info.name = out
        drop.append(node)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _dtype_name(value) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name


def _check_inputs(model, inputs: list, files: StaticFiles) -> None:
    got = [(i.name, _dtype_name(i)) for i in model.graph.input]
    want = [(s.name, s.dtype) for s in inputs]
    if got != want:
        raise ExportError(f"{files.model_file.name}: ONNX inputs are {got}, expected {want}")


def _rename_outputs(model, names: list[str], files: StaticFiles) -> None:
    """Give the graph outputs the contract names, keeping every producer and consumer consistent."""
    import onnx

    graph = model.graph
    if len(graph.output) != len(names):
        raise ExportError(
            f"{files.model_file.name}: {len(graph.output)} ONNX outputs {[o.name for o in graph.output]}, "
            f"expected {len(names)} ({names})"
        )
    taken = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    taken |= {name for node in graph.node for name in node.output}
    produced = {name for node in graph.node for name in node.output}
    graph_inputs = {v.name for v in graph.input}
    old_names = [v.name for v in graph.output]
    for value, new in zip(graph.output, names, strict=True):
        old = value.name
        if old == new:
            continue
        if new in taken:
            raise ExportError(
                f"{files.model_file.name}: cannot rename {old} to {new}, the name is already used"
            )
        if old in produced and old_names.count(old) == 1 and old not in graph_inputs:
            for node in graph.node:
                node.output[:] = [new if x == old else x for x in node.output]
                node.input[:] = [new if x == old else x for x in node.input]
            for info in graph.value_info:
                if info.name == old:
                    info.name = new
        else:  # an input or initializer passed straight through: name a copy of it
            graph.node.append(onnx.helper.make_node("Identity", [old], [new], name=f"rename_{new}"))
        value.name = new
        taken.add(new)


def _set_shape(value, spec: TensorSpec) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(spec.shape):
        raise ExportError(f"ONNX tensor {spec.name} has rank {len(dims)}, expected {list(spec.shape)}")
    if _dtype_name(value) != spec.dtype:
        raise ExportError(f"ONNX tensor {spec.name} is {_dtype_name(value)}, expected {spec.dtype}")
    for dim, want in zip(dims, spec.shape, strict=True):
        if isinstance(want, str):
            dim.dim_param = want  # clears dim_value (oneof)
        elif dim.HasField("dim_value") and dim.dim_value != want:
            raise ExportError(f"ONNX tensor {spec.name} has size {dim.dim_value} where {want} is expected")
        else:
            dim.dim_value = want
