"""checkpoint dir -> export dir: static graphs, ONNX graphs, parity check, manifest; all or nothing.

Everything is written to a temporary directory next to the destination and renamed into place at the end, so a
failed export (bad checkpoint, conversion error, parity beyond tolerance) leaves the destination as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from aoanet_export import manifest as manifest_mod
from aoanet_export import quantize
from aoanet_export.errors import ExportError, ParityError
from aoanet_export.onnx_convert import check_opset, convert, import_paddle2onnx
from aoanet_export.parity import ATTENTION_TOLERANCE, LOGPROB_TOLERANCE, describe, run_parity, summary
from aoanet_export.static import save_static
from aoanet_runtime.contract import EXTRACTOR_FILES, EXTRACTOR_SPEC, MANIFEST, PARITY, graph_specs

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def export_checkpoint(
    checkpoint_dir,
    out_dir,
    opset: int = DEFAULT_OPSET,
    which: str = "best",
    force: bool = False,
    *,
    tolerance: float | None = None,
    int8: bool = False,
    fold_embedding: bool = True,
    extractor: str | os.PathLike | None = None,
) -> dict:
    """Export a checkpoint directory to ``out_dir``; returns the manifest (also written as manifest.json).

    ``extractor``: the image extractor directory to serve the model with. By default the one the checkpoint's
    features came from (recorded in its model.json, checked by sha256); a model without one is exported for
    region features only. The extractor's files are copied into the export and hashed in its manifest.

    ``int8``: also write ``encoder.int8.onnx`` and ``decoder.int8.onnx`` (dynamic quantization of the parity-checked
    fp32 graphs, ``aoanet_export.quantize``), listed in the manifest's ``files`` with the others and measured against
    the fp32 graphs in its ``int8`` section.

    ``fold_embedding`` (default): the decoder looks up each word's share of the LSTM gates in a [V+1, 4R] table
    instead of multiplying its embedding (``aoanet.model.FoldedStep``): faster steps, a larger decoder file
    (docs/benchmarks.md). Recorded in the manifest as ``decoder_step``.

    The checkpoint's files are verified against its manifest (``aoanet.train.checkpoint``) before anything is
    traced, and the manifest's ``source_checkpoint`` records the sha256 of the weights exported.

    Raises ExportError (ParityError when the graphs do not match the model) with ``out_dir`` untouched.
    """
    from aoanet.train.checkpoint import CheckpointError, load_model_from, with_checkpoint

    start = time.perf_counter()
    checkpoint_dir, out_dir = Path(checkpoint_dir).resolve(), Path(out_dir).resolve()
    tolerance = LOGPROB_TOLERANCE if tolerance is None else tolerance
    check_opset(opset)
    if which not in ("best", "last"):
        raise ExportError(f"which must be 'best' or 'last', got {which!r}")
    if out_dir == checkpoint_dir or out_dir in checkpoint_dir.parents:
        raise ExportError(f"the export directory {out_dir} would replace the checkpoint {checkpoint_dir}")
    _check_destination(out_dir, force)
    import_paddle2onnx()  # fail before the slow part
    if int8:
        quantize.check_available()

    def load(ck):
        model, ix_to_word, role = load_model_from(ck, which)
        return model, ix_to_word, ck.path(role), ck.sha256(role)

    try:
        model, ix_to_word, weights, weights_sha256 = with_checkpoint(checkpoint_dir, load)
    except CheckpointError as e:
        raise ExportError(f"cannot load the checkpoint: {e}") from e
    log.info("loaded %s (vocabulary %d, rnn_size %d)", weights, model.vocab_size, model.options.rnn_size)
    image_extractor = _find_extractor(checkpoint_dir, extractor, model.options.att_feat_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the export dir should be like any other
    try:
        log.info("tracing the static graphs")
        static = save_static(model, tmp / "static", fold_embedding)
        o = model.options
        specs = graph_specs(model.vocab_size, o.rnn_size, o.att_feat_size, o.num_heads)
        graphs, onnx_files = {}, {}
        for name, (inputs, outputs) in specs.items():
            log.info("converting the %s to ONNX (opset %d)", name, opset)
            onnx_files[name] = tmp / manifest_mod.FILES["fp32"][name]
            graphs[name] = convert(static[name], onnx_files[name], opset, inputs, outputs)

        log.info("checking parity: dynamic graph vs paddle.inference vs onnxruntime")
        report = run_parity(model, static, onnx_files, tolerance=tolerance)
        (tmp / PARITY).write_text(json.dumps(report, indent=1))
        log.info("parity: %s", describe(report))
        if not report["passed"]:
            raise ParityError(
                f"the exported graphs do not reproduce the model: max |log-prob difference| above "
                f"{tolerance:g} or max |attention difference| above {ATTENTION_TOLERANCE:g} ({describe(report)})",
                report,
            )

        if image_extractor is not None:
            for name in EXTRACTOR_FILES:
                shutil.copyfile(image_extractor["dir"] / name, tmp / name)

        int8_section = None
        if int8:
            int8_section = _quantize(onnx_files, tmp, model.options.att_feat_size)

        source = {
            "path": str(checkpoint_dir),
            "which": which,
            "weights_file": weights.relative_to(checkpoint_dir).as_posix(),
            "weights_sha256": weights_sha256,
        }
        manifest = manifest_mod.build(
            tmp, model, ix_to_word, opset, graphs, static, summary(report), source, int8=int8_section,
            extractor=image_extractor,
        )
        manifest["decoder_step"] = "folded_embedding" if fold_embedding else "embedding"
        manifest["export_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        _move_into_place(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s in %.1f s", out_dir, time.perf_counter() - start)
    return manifest


def _find_extractor(checkpoint_dir: Path, given, att_feat_size: int) -> dict | None:
    """The extractor to copy into the export: ``given``, or the one recorded in the checkpoint's model.json;
    checked against the recorded sha256 and the model's feature width. None when there is neither."""
    from aoanet.train.checkpoint import read_model_json
    from aoanet.vision.extract import extractor_hashes
    from aoanet_runtime.extractor import ExtractorError, ExtractorSpec

    record = read_model_json(checkpoint_dir).get("extractor")
    if given is None and record is None:
        return None
    directory = Path(given if given is not None else record["dir"])
    missing = [name for name in EXTRACTOR_FILES if not (directory / name).is_file()]
    if missing:
        trained = f"the checkpoint's features came from the {record.get('backbone')} extractor in " if record else ""
        raise ExportError(
            f"{trained}{directory}, which has no {', '.join(missing)}: pass --extractor DIR (that extractor, e.g. "
            "the extractor/ folder of the data directory)"
        )
    hashes = extractor_hashes(directory)
    if record is not None and hashes != record.get("sha256"):
        raise ExportError(
            f"{directory} is not the extractor the checkpoint was trained with (its files' sha256 differ from those "
            f"in {checkpoint_dir / 'model.json'}): a model must be served with the features it was trained on"
        )
    try:
        spec = ExtractorSpec.read(directory / EXTRACTOR_SPEC)
    except ExtractorError as e:
        raise ExportError(str(e)) from None
    if spec.feature_width != att_feat_size:
        raise ExportError(
            f"{directory / EXTRACTOR_SPEC}: the extractor gives {spec.feature_width}-d features, the model reads "
            f"{att_feat_size}-d (att_feat_size)"
        )
    return {"dir": directory, "sha256": hashes, "spec": spec, "trained_with": record is not None}


def _quantize(onnx_files: dict, tmp: Path, att_feat_size: int) -> dict:
    """Write the int8 graphs next to the fp32 ones; the manifest's ``int8`` section."""
    int8_files, graphs = {}, {}
    for name, path in onnx_files.items():
        int8_files[name] = tmp / manifest_mod.FILES["int8"][name]
        log.info("quantizing the %s to int8", name)
        graphs[name] = quantize.quantize_file(path, int8_files[name])
    log.info("measuring the int8 graphs against the fp32 graphs on the parity inputs")
    figures = quantize.measure(onnx_files, int8_files, att_feat_size)
    log.info(
        "int8 vs fp32: max |log-prob difference| %.2e, argmax agreement %.3f",
        figures["max_abs_diff_logprobs"],
        figures["argmax_agreement"],
    )
    return {**quantize.settings(), "graphs": graphs, **figures}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a directory")
        if not force:
            raise ExportError(f"{out_dir} already exists; pass --force (force=True) to replace it")
        # --force replaces a previous export, not an arbitrary directory given by mistake.
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise ExportError(
                f"{out_dir} is not empty and is not an export directory (no {MANIFEST}); "
                "refusing to replace it even with --force"
            )


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    _check_destination(out_dir, force)  # again: it may have appeared during the export
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / out_dir.name, out_dir)  # put the previous export back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
