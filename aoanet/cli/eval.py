"""`aoanet-eval`: caption a split with a checkpoint and score it with the coco-caption metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False)


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
    from aoanet.config import load_config
    from aoanet.data.loader import CaptionData
    from aoanet.evaluation import evaluate_predictions, load_references, predict
    from aoanet.metrics.coco_eval import check_java
    from aoanet.train.checkpoint import load_model
    from aoanet.train.trainer import set_threads

    check_java()  # before any decoding: the tokenizer and METEOR need it
    set_threads(0)
    model, vocab = load_model(checkpoint, which=which)
    cfg = load_config(Path(checkpoint) / "config.yml")
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


@app.command()
def main_command(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory."),
    split: str = typer.Option("test", "--split"),
    beam_size: int = typer.Option(2, "--beam-size", help="The authors report beam 2."),
    which: str = typer.Option("best", "--which", help="best | last"),
    max_length: int = typer.Option(20, "--max-length"),
    batch_size: int = typer.Option(50, "--batch-size"),
    num_images: int = typer.Option(-1, "--num-images", help="-1: the whole split."),
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
    from aoanet.metrics.coco_eval import format_table
    from aoanet.train.checkpoint import atomic_write_text

    try:
        preds, metrics = evaluate_checkpoint(
            checkpoint,
            split,
            beam_size,
            which,
            max_length,
            batch_size,
            num_images,
            data_overrides=dict(
                input_json=input_json,
                input_label_h5=input_label_h5,
                input_att_dir=input_att_dir,
                references_json=references_json,
            ),
        )
    except (RuntimeError, FileNotFoundError, ValueError, KeyError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(format_table(metrics))
    if out:
        atomic_write_text(Path(out), json.dumps(preds))
    target = metrics_out or (str(Path(out).with_suffix("")) + ".metrics.json" if out else None)
    if target:
        atomic_write_text(
            Path(target), json.dumps({"split": split, "beam_size": beam_size, **metrics}, indent=1)
        )


def main():
    typer.run(main_command)
