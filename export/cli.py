"""``aoanet-export --checkpoint DIR --out EXPORT_DIR [--which best|last] [--opset 17] [--force] [--int8]
[--no-fold-embedding] [--extractor DIR]``."""

from __future__ import annotations

import json
import logging
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from aoanet_runtime.cliutil import EPILOG, check_output_dir, command_args, report_errors

app = typer.Typer(
    add_completion=False, help="Export an AoANet checkpoint to ONNX (with a manifest and a parity check)."
)


class Which(str, Enum):
    best = "best"
    last = "last"


@app.command(epilog=EPILOG)
def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint directory (model.json + weights)"),
    out: Path = typer.Option(..., "--out", help="export directory to create"),
    which: Which = typer.Option(Which.best, "--which", help="weights: best (falls back to last) or last"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 13..17"),
    force: bool = typer.Option(False, "--force", help="replace an existing export directory (only after success)"),
    int8: bool = typer.Option(
        False, "--int8", help="also write int8 (dynamically quantized) graphs: faster and smaller, lossy"
    ),
    extractor: Optional[Path] = typer.Option(
        None,
        "--extractor",
        help="image extractor dir to serve the model with (default: the one its training features came from)",
    ),
    fold_embedding: bool = typer.Option(
        True,
        "--fold-embedding/--no-fold-embedding",
        help="decoder: the word embedding folded into the LSTM's input weights (16%% faster steps, larger file)",
    ),
) -> None:
    """Trace the model's encoder and decoder step, convert them to ONNX, check parity, write the manifest."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from aoanet.cpu import configure_math_library

    configure_math_library()  # before Paddle is imported
    warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)  # (custom operators only)
    from aoanet_export import ExportError

    report_errors("aoanet-export", ExportError, ValueError)(_export)(checkpoint, out, which, opset, force, int8,
                                                                    fold_embedding, extractor)


def _export(checkpoint, out, which, opset, force, int8, fold_embedding, extractor=None) -> None:
    from aoanet_export import export_checkpoint

    check_output_dir(out)  # before the work, not after it
    manifest = export_checkpoint(
        checkpoint, out, opset=opset, which=which.value, force=force, int8=int8, fold_embedding=fold_embedding,
        extractor=extractor,
    )
    figures = manifest["parity"]["max_abs_diff"]
    typer.echo(
        f"wrote {out} (opset {manifest['opset']}); max |diff| of log-probs: "
        + json.dumps({name: figures[name]["logprobs"] for name in figures})
    )
    if "extractor" in manifest:
        typer.echo(f"with the image extractor {manifest['extractor']['backbone']} (captions image files)")
    if "int8" in manifest:
        q = manifest["int8"]
        typer.echo(
            f"int8 graphs vs fp32 (lossy, not gated): max |diff| of log-probs {q['max_abs_diff_logprobs']:.2e}, "
            f"argmax agreement {q['argmax_agreement']:.3f}"
        )


def main() -> None:
    app(args=command_args(), prog_name="aoanet-export")


if __name__ == "__main__":
    main()
