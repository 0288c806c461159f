"""``aoanet-convert``: the authors' PyTorch checkpoint (model.pth + infos_<id>.pkl) -> a checkpoint dir."""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

from aoanet import convert
from aoanet_runtime.cliutil import EPILOG, check_output_dir, command_args, report_errors

app = typer.Typer(add_completion=False, help=__doc__, epilog=EPILOG)


def _load_torch_state_dict(path: Path) -> dict:
    """The .pth as name -> numpy array (a separate function so tests can stand in for torch)."""
    return convert.read_pytorch_state_dict(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@app.command()
def main_command(
    pytorch: Path = typer.Option(
        ...,
        "--pytorch",
        exists=True,
        dir_okay=False,
        help="The authors' model.pth (or model-best.pth): a state dict.",
    ),
    infos: Path = typer.Option(
        ...,
        "--infos",
        exists=True,
        dir_okay=False,
        help="The matching infos_<id>.pkl (vocabulary and options).",
    ),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create."),
    num_heads: int | None = typer.Option(
        None, "--num-heads", help="Attention heads; default: the infos' opt.num_heads, else 8 (the authors')."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint directory at --out."),
):
    """Convert the authors' PyTorch AoANet checkpoint into a checkpoint dir for aoanet-eval/export/infer."""
    from aoanet.train.checkpoint import CheckpointError

    report_errors("aoanet-convert", convert.ConversionError, convert.UnsafePickleError, CheckpointError)(_convert)(
        pytorch, infos, out, num_heads, force)


def _convert(pytorch: Path, infos: Path, out: Path, num_heads: int | None, force: bool) -> None:
    check_output_dir(out)  # before the work, not after it
    info = convert.load_reference_infos(infos)
    options = convert.options_from_opt(info.get("opt"))
    opt_heads = options.pop("num_heads", 8)
    heads = num_heads if num_heads is not None else opt_heads
    state_dict = _load_torch_state_dict(pytorch)
    model = convert.model_from_reference(state_dict, num_heads=heads, **options)
    ix_to_word = convert.vocabulary_from_infos(info, model.vocab_size)
    provenance = {
        "source": "pytorch reference checkpoint (husthuaan/AoANet layout)",
        "pytorch": str(pytorch.resolve()),
        "pytorch_sha256": _sha256(pytorch),
        "infos": str(infos.resolve()),
        "infos_sha256": _sha256(infos),
        **{k: info[k] for k in ("epoch", "iter", "best_val_score") if k in info},
    }
    convert.write_checkpoint_dir(
        model, ix_to_word, out, force=force, extra={"converted_from.json": provenance}
    )

    o = model.options
    n_params = sum(int(p.size) for p in model.parameters())
    typer.echo(
        f"wrote {out}: V={model.vocab_size} words, rnn_size={o.rnn_size}, "
        f"input_encoding_size={o.input_encoding_size}, "
        f"att_feat_size={o.att_feat_size}, refiner layers={o.refine_layers if o.refine else 0}, "
        f"num_heads={o.num_heads}, {n_params:,} parameters"
    )
    if ix_to_word[str(model.vocab_size)] != "UNK":
        typer.echo(
            f"note: the last word is {ix_to_word[str(model.vocab_size)]!r}, not 'UNK'; beam search still "
            "lowers the last index by 1000, as the authors' code does",
            err=True,
        )


def main():
    app(args=command_args(), prog_name="aoanet-convert")


if __name__ == "__main__":
    main()
