"""`aoanet-eval`: caption a split with a checkpoint and score it with the coco-caption metrics."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from aoanet_runtime.cliutil import EPILOG, check_output_file, command_args, report_errors

app = typer.Typer(add_completion=False)


class Which(str, Enum):
    best = "best"
    last = "last"


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    restval = "restval"
    all = "all"


def _num_images(value: int) -> int:
    if value < -1 or value == 0:
        raise typer.BadParameter(f"{value}: give a number of images >= 1, or -1 for the whole split")
    return value


def _expected_errors() -> tuple:
    from aoanet.config import ConfigError
    from aoanet.data.errors import DataError
    from aoanet.metrics.coco_eval import JavaNotFoundError, JavaToolError
    from aoanet.train.checkpoint import CheckpointError
    from aoanet_runtime.beam import NonFiniteError

    return ConfigError, CheckpointError, DataError, JavaNotFoundError, JavaToolError, NonFiniteError, ValueError, \
        KeyError


def evaluate_checkpoint(
    checkpoint: str,
    split: str = "test",
    beam_size: int = 2,
    which: str = "best",
    max_length: int = 20,
    batch_size: int = 50,
    num_images: int = -1,
    spice=None,
    data_overrides: Optional[dict] = None,
    progress: bool = True,
):
    """-> (predictions, metrics). Data paths come from the checkpoint's config.yml unless overridden."""
    from aoanet.config import Config, config_from_text
    from aoanet.data.loader import CaptionData
    from aoanet.evaluation import evaluate_predictions, load_references, predict
    from aoanet.metrics.coco_eval import check_java
    from aoanet.train.checkpoint import load_model_from, with_checkpoint
    from aoanet.train.trainer import set_threads

    for name, value in (("beam_size", beam_size), ("max_length", max_length), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_images == 0 or num_images < -1:
        raise ValueError(f"num_images must be >= 1 or -1 (the whole split), got {num_images}")
    check_java()  # before any decoding: the tokenizer and METEOR need it
    set_threads(0)

    def load(ck):  # the model and the config of the same save, both verified
        model, vocab, _ = load_model_from(ck, which)
        text = ck.config_text()
        return model, vocab, (config_from_text(text, str(ck.path("config"))) if text is not None else Config())

    model, vocab, cfg = with_checkpoint(checkpoint, load)
    d = cfg.data
    for k, v in (data_overrides or {}).items():
        if v:
            setattr(d, k, v)
    data = CaptionData(
        d.input_json,
        d.input_label_h5,
        d.input_att_dir,
        att_feat_size=model.options.att_feat_size,
        seq_per_img=d.seq_per_img,
    )
    preds = predict(
        model,
        data,
        split,
        beam_size=beam_size,
        max_length=max_length,
        batch_size=batch_size,
        num_images=num_images,
        progress=progress,
        vocab=vocab,
    )
    metrics = evaluate_predictions(preds, load_references(d.references_json), spice=spice)
    return preds, metrics


@app.command(epilog=EPILOG)
def main_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory."),
    split: Split = typer.Option(Split.test, "--split"),
    beam_size: int = typer.Option(2, "--beam-size", min=1, help="The authors report beam 2."),
    which: Which = typer.Option(Which.best, "--which", help="best | last"),
    max_length: int = typer.Option(20, "--max-length", min=1),
    batch_size: int = typer.Option(50, "--batch-size", min=1),
    num_images: int = typer.Option(-1, "--num-images", callback=_num_images, help="-1: the whole split."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the captions (COCO results format) here."),
    metrics_out: Optional[str] = typer.Option(
        None, "--metrics-out", help="Metrics JSON (default: next to --out)."
    ),
    input_json: Optional[str] = typer.Option(None, "--input-json"),
    input_label_h5: Optional[str] = typer.Option(None, "--input-label-h5"),
    input_att_dir: Optional[str] = typer.Option(None, "--input-att-dir"),
    references_json: Optional[str] = typer.Option(None, "--references-json"),
):
    """Caption SPLIT with the checkpoint (beam search) and print BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE)."""
    report_errors("aoanet-eval", *_expected_errors(), status=2)(_evaluate)(
        checkpoint, split.value, beam_size, which.value, max_length, batch_size, num_images, out, metrics_out,
        dict(input_json=input_json, input_label_h5=input_label_h5, input_att_dir=input_att_dir,
             references_json=references_json))


def _evaluate(checkpoint, split, beam_size, which, max_length, batch_size, num_images, out, metrics_out,
              data_overrides):
    from aoanet.metrics.coco_eval import format_table
    from aoanet.train.checkpoint import atomic_write_text

    target = metrics_out or (str(Path(out).with_suffix("")) + ".metrics.json" if out else None)
    if out:
        check_output_file(out, "--out")  # before the work, not after it
    if target:
        check_output_file(target, "--metrics-out")
    preds, metrics = evaluate_checkpoint(checkpoint, split, beam_size, which, max_length, batch_size, num_images,
                                         data_overrides=data_overrides)
    typer.echo(format_table(metrics))
    if out:
        atomic_write_text(Path(out), json.dumps(preds))
    if target:
        atomic_write_text(
            Path(target), json.dumps({"split": split, "beam_size": beam_size, **metrics}, indent=1)
        )


def main():
    app(args=command_args(), prog_name="aoanet-eval")
