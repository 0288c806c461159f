"""`aoanet-train xe|scst`: the two training stages."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train AoANet: cross-entropy, then SCST.")


def _run(stage: str, config: str, overrides: List[str], resume: bool, start_from: Optional[str], quiet: bool):
    from aoanet.config import ConfigError, load_config
    from aoanet.train.checkpoint import CheckpointError
    from aoanet.train.trainer import Trainer, TrainingDiverged

    try:
        cfg = load_config(config, overrides)
        trainer = Trainer(cfg, stage, resume=resume, start_from=start_from, progress=not quiet)
        state = trainer.run()
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from e
    best = state.get("best_score")
    typer.echo(f"{stage} done: {state['iteration']} iterations, best val CIDEr "
               f"{'n/a' if best is None else f'{best:.4f}'}; checkpoint in {cfg.train.checkpoint_path}")


@app.command()
def xe(
    config: str = typer.Option("configs/aoa.yml", "--config", "-c", help="YAML config (validated)."),
    overrides: List[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.checkpoint_path exactly."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Cross-entropy training (label smoothing, scheduled sampling, value clipping: the authors' recipe)."""
    _run("xe", config, overrides, resume, None, quiet)


@app.command()
def scst(
    config: str = typer.Option("configs/aoa_rl.yml", "--config", "-c", help="YAML config (validated)."),
    start_from: Optional[str] = typer.Option(None, "--start-from", help="XE checkpoint dir (its LAST weights)."),
    overrides: List[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.checkpoint_path exactly."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Self-critical sequence training with the CIDEr-D reward, starting from an XE checkpoint."""
    if not resume and not start_from:
        typer.echo("error: --start-from XE_CHECKPOINT_DIR is required (or --resume)", err=True)
        raise typer.Exit(2)
    _run("scst", config, overrides, resume, start_from, quiet)


def main():
    app()
