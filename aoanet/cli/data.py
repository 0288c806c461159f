"""``aoanet-data``: the data pipeline commands (prepro, bu, ngrams, synth, check).

The seed's script names in ``scripts/`` (prepro_labels.py, make_bu_data.py, prepro_ngrams.py) call these same
commands, so the seed's underscore flags (``--input_json``, ``--output_h5 data/cocotalk`` ...) are accepted as
aliases. A data error prints one clear message (file, image id, field) and exits with status 1, no traceback.
"""

import functools
import json
from pathlib import Path
from typing import Optional

import typer

from aoanet.data.errors import DataError
from aoanet_runtime.cliutil import EPILOG, check_output_dir, check_output_file, command_args, report_errors

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prepare captioning data in the reference formats, or generate the embedded dataset.",
    epilog=EPILOG,
)


def _report(fn):
    """Expected failures (bad data, unwritable outputs, bad values) -> one line and exit status 1."""
    return functools.wraps(fn)(report_errors("aoanet-data", DataError, ValueError)(fn))


def _print_summary(title: str, summary: dict) -> None:
    typer.echo(title)
    for k, v in summary.items():
        typer.echo(f"  {k:<22} {json.dumps(v) if isinstance(v, (dict, list)) else v}")


def _label_h5_path(output_h5: Path) -> Path:
    # The seed passes a prefix (`--output_h5 data/cocotalk` writes data/cocotalk_label.h5); a path ending in
    # .h5 is taken as the file name itself.
    return output_h5 if output_h5.suffix == ".h5" else output_h5.with_name(output_h5.name + "_label.h5")


@app.command()
@_report
def prepro(
    input_json: Path = typer.Option(..., "--input-json", "--input_json", help="Karpathy-style dataset_coco.json"),
    output_json: Path = typer.Option("cocotalk.json", "--output-json", "--output_json"),
    output_h5: Path = typer.Option(
        "cocotalk_label.h5",
        "--output-h5",
        "--output_h5",
        help="file name, or a prefix to which _label.h5 is appended (seed style)",
    ),
    word_count_threshold: int = typer.Option(
        5,
        "--word-count-threshold",
        "--word_count_threshold",
        help="keep words seen more than this many times",
    ),
    max_length: int = typer.Option(16, "--max-length", "--max_length", help="label width; longer captions are cut"),
):
    """Build the vocabulary and cocotalk.json + cocotalk_label.h5 from dataset_coco.json."""
    from aoanet.data.prepro import prepro_labels

    check_output_file(output_json, "--output-json")
    check_output_file(_label_h5_path(output_h5), "--output-h5")
    summary = prepro_labels(input_json, output_json, _label_h5_path(output_h5), word_count_threshold, max_length)
    _print_summary("prepro done", summary)


@app.command()
@_report
def bu(
    files: Optional[list[Path]] = typer.Argument(None, help="more TSV files (after --tsv)", show_default=False),
    tsv: Optional[list[Path]] = typer.Option(None, "--tsv", help="bottom-up TSV file(s)"),
    out: Optional[Path] = typer.Option(None, "--out", help="data dir: writes DIR/cocobu_att, cocobu_fc, cocobu_box"),
    downloaded_feats: Optional[Path] = typer.Option(
        None,
        "--downloaded_feats",
        "--downloaded-feats",
        help="seed style: a directory whose *.tsv files are read",
    ),
    output_dir: Optional[Path] = typer.Option(
        None,
        "--output_dir",
        "--output-dir",
        help="seed style prefix: writes PREFIX_att, PREFIX_fc, PREFIX_box",
    ),
    feat_dim: Optional[int] = typer.Option(None, "--feat-dim", help="expected feature width (default: first line)"),
):
    """Convert bottom-up-attention TSV files to cocobu_att/*.npz, cocobu_fc/*.npy, cocobu_box/*.npy."""
    from aoanet.data.bottom_up import convert_tsv
    from aoanet.data.features import feature_dirs

    paths = list(tsv or []) + list(files or [])
    if downloaded_feats is not None:
        paths += sorted(downloaded_feats.glob("*.tsv"))
    if not paths:
        raise DataError("no TSV file given (use --tsv FILE..., or --downloaded_feats DIR)")
    if (out is None) == (output_dir is None):
        raise typer.BadParameter("give exactly one of --out DIR or --output_dir PREFIX")
    if out is not None:
        dirs = feature_dirs(out)
    else:
        dirs = tuple(output_dir.with_name(output_dir.name + s) for s in ("_att", "_fc", "_box"))
    for d in dirs:
        check_output_dir(d, "--out" if out is not None else "--output_dir")
    _print_summary("bu done", convert_tsv(paths, *dirs, feat_dim=feat_dim))


@app.command()
@_report
def ngrams(
    input_json: Path = typer.Option(..., "--input-json", "--input_json", help="Karpathy-style dataset_coco.json"),
    dict_json: Path = typer.Option(..., "--dict-json", "--dict_json", help="cocotalk.json (the vocabulary)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output file, e.g. DIR/coco-train-ngrams.json.gz"),
    output_pkl: Optional[Path] = typer.Option(
        None,
        "--output_pkl",
        "--output-pkl",
        help="seed style prefix: writes PREFIX-ngrams.json.gz (no pickle)",
    ),
    split: str = typer.Option("train", "--split", help="train (= train + restval), val, test or all"),
):
    """Document frequencies of the split's 1-4-grams (token ids, EOS appended) for the CIDEr-D reward."""
    from aoanet.data.ngrams import prepro_ngrams

    if (out is None) == (output_pkl is None):
        raise typer.BadParameter("give exactly one of --out FILE or --output_pkl PREFIX")
    target = out if out is not None else output_pkl.with_name(output_pkl.name + "-ngrams.json.gz")
    check_output_file(target, "--out")
    _print_summary("ngrams done", prepro_ngrams(input_json, dict_json, target, split))


@app.command()
@_report
def synth(
    out: Path = typer.Option(..., "--out", help="output data dir"),
    images: int = typer.Option(4000, "--images", help="number of images (all splits)"),
    seed: int = typer.Option(123, "--seed"),
    feat_dim: int = typer.Option(128, "--feat-dim", help="region feature width (att_feat_size)"),
    render: bool = typer.Option(
        False, "--render", help="draw the scenes as pictures (DIR/images/<id>.jpg) instead of writing features"
    ),
):
    """Generate the embedded synthetic dataset: dataset_coco.json + cocobu_att/fc/box (or, with --render, the
    scenes as pictures, to run through `aoanet-data extract`)."""
    from aoanet.data.synth import make_synth

    check_output_dir(out)
    _print_summary("synth done", make_synth(out, images=images, seed=seed, feat_dim=feat_dim, render=render))


@app.command()
@_report
def extractor(
    out: Path = typer.Option(..., "--out", help="extractor directory to create (extractor.onnx + extractor.json)"),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="efficientnet_lite0 | resnet50 | resnet101 | resnet152"
    ),
    weights: Optional[Path] = typer.Option(
        None, "--weights", help="backbone weights (.pth for efficientnet_lite0, .pdparams for the ResNets)"
    ),
    pretrained: bool = typer.Option(False, "--pretrained", help="ResNets: Paddle's ImageNet download (online)"),
    size: Optional[int] = typer.Option(None, "--size", help="fixed square input size (default: the backbone's)"),
    shorter_side: Optional[int] = typer.Option(
        None, "--shorter-side", help="instead of --size: scale the shorter side to this (aspect kept)"
    ),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="with --shorter-side: cap of the longer side"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="instead of --backbone: any ONNX image model ..."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="... with its extractor.json spec"),
    opset: int = typer.Option(17, "--opset"),
    force: bool = typer.Option(False, "--force", help="replace an existing extractor directory"),
):
    """Build an image extractor: a Paddle backbone exported to ONNX with a parity check, or an ONNX model + spec
    checked and copied (see docs/images.md)."""
    from aoanet.cpu import configure_math_library

    configure_math_library()
    from aoanet_runtime.extractor import ExtractorError

    try:
        if onnx is not None or spec is not None:
            if onnx is None or spec is None or backbone is not None:
                raise DataError("give --onnx FILE and --spec FILE together, without --backbone")
            from aoanet.vision.export import import_extractor

            result = import_extractor(onnx, spec, out, force=force)
        else:
            if backbone is None:
                raise DataError("give --backbone NAME (or --onnx FILE --spec FILE)")
            from aoanet.vision.backbones import BACKBONES, BackboneError
            from aoanet.vision.export import default_size, export_extractor

            if backbone not in BACKBONES:
                raise DataError(f"unknown backbone {backbone!r} (one of {', '.join(BACKBONES)})")
            try:
                policy = default_size(backbone, size, shorter_side, max_side)
                result = export_extractor(
                    backbone, out, weights=weights, pretrained=pretrained, size=policy, opset=opset, force=force
                )
            except BackboneError as e:
                raise DataError(str(e)) from None
    except ExtractorError as e:
        raise DataError(str(e)) from None
    summary = {k: result.get(k) for k in ("backbone", "layer", "size", "feature_width", "weights")}
    if "parity" in result:
        summary["parity_max_rel_diff"] = result["parity"]["max_rel_diff"]
    _print_summary(f"extractor written to {out}", summary)


@app.command()
@_report
def extract(
    images: list[Path] = typer.Option(..., "--images", help="directory of pictures, a .txt list, or files"),
    out: Path = typer.Option(..., "--out", help="data dir: writes DIR/cocobu_att, cocobu_fc, cocobu_box"),
    extractor_dir: Optional[Path] = typer.Option(
        None, "--extractor", help="extractor directory (aoanet-data extractor)"
    ),
    extractor_onnx: Optional[Path] = typer.Option(
        None, "--extractor-onnx", help="instead of --extractor: any ONNX image model ..."
    ),
    extractor_spec: Optional[Path] = typer.Option(None, "--extractor-spec", help="... with its extractor.json"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="go on without unreadable pictures (listed at the end)"),
    coco_ids: bool = typer.Option(
        False, "--coco-ids", help="image ids are the number ending the file name (COCO_val2014_000000391895.jpg)"
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: all)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Features of pictures through an image extractor, in the reference layout; resumable."""
    from aoanet.vision.extract import EXTRACTOR_DIR, extract_features

    if (extractor_dir is None) == (extractor_onnx is None) or (extractor_onnx is None) != (extractor_spec is None):
        raise DataError("give --extractor DIR, or --extractor-onnx FILE with --extractor-spec FILE")
    if extractor_onnx is not None:
        # checked as the runtime will, and copied into DATA/extractor, the record of where the features came from
        from aoanet.vision.export import import_extractor
        from aoanet_runtime.extractor import ExtractorError

        extractor_dir = out / EXTRACTOR_DIR
        if not extractor_dir.exists():
            try:
                import_extractor(extractor_onnx, extractor_spec, extractor_dir)
            except ExtractorError as e:
                raise DataError(str(e)) from None

    summary = extract_features(
        images, extractor_dir, out, batch_size=batch_size, skip_bad=skip_bad, coco_ids=coco_ids,
        progress=progress, threads=threads,
    )
    skipped = summary.pop("skipped_bad", None)
    _print_summary("extract done", summary)
    if skipped:
        typer.echo(f"skipped {len(skipped)} bad picture(s) (--skip-bad):", err=True)
        for path in skipped:
            typer.echo(f"  {path}", err=True)


@app.command()
@_report
def check(
    data_dir: Path = typer.Argument(..., help="prepared data dir"),
    input_json: Optional[Path] = typer.Option(None, "--input-json", "--input_json"),
    input_h5: Optional[Path] = typer.Option(None, "--input-h5", "--input_label_h5", "--input-label-h5"),
    att_dir: Optional[Path] = typer.Option(None, "--att-dir", "--input_att_dir"),
    fc_dir: Optional[Path] = typer.Option(None, "--fc-dir", "--input_fc_dir"),
    box_dir: Optional[Path] = typer.Option(None, "--box-dir", "--input_box_dir"),
    att_feat_size: Optional[int] = typer.Option(None, "--att-feat-size", "--att_feat_size"),
    full: bool = typer.Option(False, "--full", help="decode every array (slower), not only the headers"),
):
    """Check json <-> h5 <-> feature files; list every problem, exit 1 if there is any."""
    from aoanet.data.check import check_data_dir

    problems, summary = check_data_dir(data_dir, input_json, input_h5, att_dir, fc_dir, box_dir, att_feat_size, full)
    if problems:
        for p in problems:
            typer.echo(str(p))
        typer.echo(f"{len(problems)} problem(s) found in {data_dir}", err=True)
        raise typer.Exit(1)
    what = ("every array decoded" if full else
            "array headers and file sizes checked; --full also decodes every array (NaN/inf, corrupted data)")
    _print_summary(f"{data_dir}: OK ({what})", summary)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``aoanet-data``; ``argv`` lets the seed-named scripts prepend their command."""
    app(args=command_args(argv), prog_name="aoanet-data")


if __name__ == "__main__":
    main()
