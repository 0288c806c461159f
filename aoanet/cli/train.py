"""`aoanet-train xe|scst`: the two training stages."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import List, Optional

import typer

from aoanet_runtime.cliutil import EPILOG, command_args, report_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train AoANet: cross-entropy, then SCST.",
                  epilog=EPILOG)

NPROC_HELP = ("Start K data-parallel processes on this machine (python -m paddle.distributed.launch "
              "--nproc_per_node K; gloo on the CPU). Rank logs: <checkpoint_path>/launch/.")
DEVICES_HELP = "With --nproc: the GPUs to use, e.g. 0,1 (default: the first K visible)."
AMP_HELP = "Mixed precision none|bf16|fp16 (overrides train.amp; GPU only)."
OVERWRITE_HELP = ("Start a new run even if train.checkpoint_path holds an earlier one, deleting it (without this, a "
                  "non-empty checkpoint directory is refused: --resume continues it).")


def _expected_errors() -> tuple:
    from aoanet.config import ConfigError
    from aoanet.data.errors import DataError
    from aoanet.metrics.coco_eval import JavaNotFoundError, JavaToolError
    from aoanet.train.checkpoint import CheckpointError, LockError

    return ConfigError, CheckpointError, LockError, DataError, JavaNotFoundError, JavaToolError


def _errors(fn):
    """Expected failures: one line, exit status 2 (3 for a diverged loss, raised separately)."""

    def run(*args, **kwargs):
        return report_errors("aoanet-train", *_expected_errors(), status=2)(fn)(*args, **kwargs)

    return run


def _launch(stage: str, config: str, overrides: List[str], resume: bool, start_from: Optional[str], quiet: bool,
            nproc: int, devices: Optional[str], overwrite: bool) -> None:
    """Relaunch this command on ``nproc`` ranks through Paddle's launcher and wait for it. The launcher gets SIGTERM
    (and stops its ranks) when this process ends, however it ends."""
    import paddle

    from aoanet import procs
    from aoanet.config import load_config
    from aoanet.train.amp import check_supported
    from aoanet.train.checkpoint import prepare_new_run
    from aoanet.train.distributed import launch_command

    cfg = load_config(config, overrides)  # fail here, not once per rank
    check_supported(cfg.train.amp, paddle.device.get_device())
    if not resume and not overwrite:
        prepare_new_run(cfg.train.checkpoint_path)  # refuses a non-empty directory before any rank starts
    args = [stage, "--config", config, *[a for o in overrides for a in ("--set", o)]]
    args += ["--resume"] * resume + (["--start-from", start_from] if start_from else []) + ["--quiet"] * quiet
    args += ["--overwrite"] * overwrite
    cmd = launch_command(nproc, args, str(Path(cfg.train.checkpoint_path) / "launch"), devices)
    launcher = procs.popen(cmd, death_signal=signal.SIGTERM, start_new_session=False,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        code = launcher.wait()
    except BaseException:
        launcher.terminate()  # the launcher stops its ranks
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
        raise
    if code:
        typer.echo(f"aoanet-train: error: the launcher exited with status {code}; rank logs in "
                   f"{Path(cfg.train.checkpoint_path) / 'launch'}", err=True)
        raise typer.Exit(code)


@_errors
def _run(stage: str, config: str, overrides: List[str], resume: bool, start_from: Optional[str], quiet: bool,
         nproc: int = 0, devices: Optional[str] = None, amp: Optional[str] = None, overwrite: bool = False):
    from aoanet.config import load_config
    from aoanet.train.distributed import launched_world_size
    from aoanet.train.trainer import Trainer, TrainingDiverged

    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in the checkpoint directory, --overwrite replaces it: "
                                 "give one of them")
    overrides = list(overrides) + ([f"train.amp={amp}"] if amp else [])
    if nproc > 1 and launched_world_size() == 1:
        _launch(stage, config, overrides, resume, start_from, quiet, nproc, devices, overwrite)
        return
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, stage, resume=resume, start_from=start_from, progress=not quiet, overwrite=overwrite)
    try:
        state = trainer.run()
    except TrainingDiverged as e:
        typer.echo(f"aoanet-train: error: {e}", err=True)
        raise typer.Exit(3) from None
    if not trainer.dist.main:
        return
    best = state.get("best_score")
    typer.echo(f"{stage} done: {state['iteration']} iterations, best val CIDEr "
               f"{'n/a' if best is None else f'{best:.4f}'}; checkpoint in {cfg.train.checkpoint_path}")


@app.command()
def xe(
    config: str = typer.Option("configs/aoa.yml", "--config", "-c", help="YAML config (validated)."),
    overrides: List[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.checkpoint_path exactly."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    nproc: int = typer.Option(0, "--nproc", help=NPROC_HELP),
    devices: Optional[str] = typer.Option(None, "--devices", help=DEVICES_HELP),
    amp: Optional[str] = typer.Option(None, "--amp", help=AMP_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Cross-entropy training (label smoothing, scheduled sampling, value clipping: the authors' recipe)."""
    _run("xe", config, overrides, resume, None, quiet, nproc, devices, amp, overwrite)


@app.command()
def scst(
    config: str = typer.Option("configs/aoa_rl.yml", "--config", "-c", help="YAML config (validated)."),
    start_from: Optional[str] = typer.Option(None, "--start-from", help="XE checkpoint dir (its LAST weights)."),
    overrides: List[str] = typer.Option([], "--set", help="Override: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.checkpoint_path exactly."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    nproc: int = typer.Option(0, "--nproc", help=NPROC_HELP),
    devices: Optional[str] = typer.Option(None, "--devices", help=DEVICES_HELP),
    amp: Optional[str] = typer.Option(None, "--amp", help=AMP_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Self-critical sequence training with the CIDEr-D reward, starting from an XE checkpoint."""
    if not resume and not start_from:
        typer.echo("aoanet-train: error: --start-from XE_CHECKPOINT_DIR is required (or --resume)", err=True)
        raise typer.Exit(2)
    _run("scst", config, overrides, resume, start_from, quiet, nproc, devices, amp, overwrite)


def main():
    app(args=command_args(), prog_name="aoanet-train")
