"""Expected failures are one line naming the file, field or value, with a non-zero exit status, for every command;
a traceback only with --debug. Outputs are checked before the work. The cases of the issue that found tracebacks
(data errors at training time, truncated checkpoint files on resume, a _base_ cycle, --out a directory or not
writable, grad_clip=-1, synth --images 0, --beam-size 0, nan/inf learning rates), plus each command's real console
script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_checkpoint_safety import make_legacy
from test_train import small_config
from typer.testing import CliRunner

from aoanet.cli.data import app as data_app
from aoanet.cli.eval import app as eval_app
from aoanet.cli.train import app as train_app
from aoanet.config import ConfigError, load_config
from aoanet.train.checkpoint import Checkpoint
from aoanet.train.trainer import Trainer

BIN = Path(sys.executable).parent


def one_line(result, status: int, *fragments: str) -> str:
    """The command failed with ``status`` and one message holding the fragments, no traceback."""
    assert result.exit_code == status, (result.exit_code, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    message = result.output.strip()
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def write_config(path: Path, cfg, **train) -> Path:
    raw = cfg.to_dict()
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained") / "run"
    Trainer(small_config(data_dir, d, max_iters=3), "xe", progress=False).run()
    return d


# ----------------------------------------------------------------------------------------------- aoanet-train
def test_data_error_at_training_time(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    images = json.loads((data / "cocotalk.json").read_text())["images"]
    train_ids = [im["id"] for im in images if im["split"] == "train"]
    bad = data / "cocobu_att" / f"{train_ids[0]}.npz"
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = small_config(data, tmp_path / "run", max_iters=20)
    cfg.data.input_att_dir = str(data / "cocobu_att")
    config = write_config(tmp_path / "c.yml", cfg)
    res = CliRunner().invoke(train_app, ["xe", "-c", str(config), "--quiet"])
    one_line(res, 2, f"{bad} (image id {train_ids[0]})", "cannot read feature file")


@pytest.mark.parametrize("name", ["state.json", "model.pdparams", "optimizer.pdopt", "checkpoint.json", "weights"])
def test_truncated_checkpoint_file_on_resume(name, trained, data_dir, tmp_path):
    if name in ("state.json", "model.pdparams", "optimizer.pdopt"):  # an earlier version's checkpoint
        d = make_legacy(trained, tmp_path / "run")
        path = d / name
    else:
        d = tmp_path / "run"
        shutil.copytree(trained, d)
        path = d / name if name == "checkpoint.json" else Checkpoint.open(d).path("weights_last")
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    config = write_config(tmp_path / "c.yml", small_config(data_dir, d, max_iters=6))
    res = CliRunner().invoke(train_app, ["xe", "-c", str(config), "--quiet", "--resume"])
    one_line(res, 2, path.name)
    assert not (d / "train.lock").exists()


def test_config_errors(data_dir, tmp_path):
    cfg = small_config(data_dir, tmp_path / "run", max_iters=2)
    cases = {
        "grad_clip": ({"grad_clip": -1}, "train.grad_clip must be > 0, got -1"),
        "nan": ({"learning_rate": float("nan")}, "train.learning_rate: expected a finite number, got nan"),
        "inf": ({"learning_rate": ".inf"}, "train.learning_rate: expected a finite number, got inf"),
        "text-nan": ({"learning_rate": "nan"}, "expected a finite number"),
        "beta": ({"optim_beta": 1.0}, "train.optim_beta must be in [0, 1)"),
    }
    for name, (train, message) in cases.items():
        raw = cfg.to_dict()
        raw["train"].update(train)
        text = yaml.safe_dump(raw).replace("'.inf'", ".inf")
        (tmp_path / f"{name}.yml").write_text(text)
        res = CliRunner().invoke(train_app, ["xe", "-c", str(tmp_path / f"{name}.yml"), "--quiet"])
        one_line(res, 2, message)
    res = CliRunner().invoke(train_app, ["xe", "-c", str(tmp_path / "nan.yml"), "--set", "train.learning_rate=inf"])
    one_line(res, 2, "expected a finite number, got inf")
    assert not (tmp_path / "run").exists()


def test_base_cycle_is_one_error(tmp_path):
    (tmp_path / "a.yml").write_text("_base_: b.yml\ntrain: {batch_size: 2}\n")
    (tmp_path / "b.yml").write_text("_base_: c.yml\n")
    (tmp_path / "c.yml").write_text("_base_: a.yml\n")
    with pytest.raises(ConfigError, match=r"_base_ files form a cycle: .*a.yml -> .*b.yml -> .*c.yml -> .*a.yml"):
        load_config(tmp_path / "a.yml")
    (tmp_path / "self.yml").write_text("_base_: self.yml\n")
    res = CliRunner().invoke(train_app, ["xe", "-c", str(tmp_path / "self.yml")])
    one_line(res, 2, "cycle", "self.yml -> ")
    (tmp_path / "orphan.yml").write_text("_base_: missing.yml\n")
    with pytest.raises(ConfigError, match="missing.yml \\(the _base_ of .*orphan.yml\\)"):
        load_config(tmp_path / "orphan.yml")


def test_diverged_without_a_checkpoint_says_so(data_dir, tmp_path, monkeypatch):
    from aoanet.train import trainer as trainer_mod
    from aoanet.train.trainer import TrainingDiverged

    real = trainer_mod.language_model_loss
    monkeypatch.setattr(trainer_mod, "language_model_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="iteration 1 .*no checkpoint had been saved yet"):
        Trainer(small_config(data_dir, tmp_path / "run", max_iters=5), "xe", progress=False).run()


# ----------------------------------------------------------------------------------------------- aoanet-eval
def test_eval_arguments_and_out_are_checked_first(trained, tmp_path):
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(trained), "--beam-size", "0"])
    assert res.exit_code == 2 and "Invalid value for '--beam-size'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(trained), "--num-images", "-5"])
    assert res.exit_code == 2 and "-5: give a number of images >= 1, or -1" in res.output
    # --out a directory: refused before the checkpoint is even opened (it does not exist)
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)])
    one_line(res, 2, f"--out {tmp_path} is a directory")
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "file" / "o")])
    one_line(res, 2, "--out", "is not a directory")
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(tmp_path / "nope")])
    one_line(res, 2, "nope: checkpoint directory not found")


# ----------------------------------------------------------------------------------------------- aoanet-data
def test_synth_bad_arguments_leave_nothing(tmp_path):
    out = tmp_path / "synth"
    for args, message in ((["--images", "0"], "--images 0: the synthetic dataset needs at least 8 images"),
                          (["--images", "-3"], "needs at least 8 images"),
                          (["--feat-dim", "8"], "feat_dim must be >= 16")):
        res = CliRunner().invoke(data_app, ["synth", "--out", str(out), *args])
        one_line(res, 1, message)
        assert not out.exists()
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(data_app, ["synth", "--out", str(tmp_path / "file" / "d")])
    one_line(res, 1, "--out", "is not a directory")


def test_check_says_what_it_read_and_finds_truncated_files(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    res = CliRunner().invoke(data_app, ["check", str(data)])
    assert res.exit_code == 0 and "array headers and file sizes checked; --full also decodes" in res.output
    res = CliRunner().invoke(data_app, ["check", str(data), "--full"])
    assert res.exit_code == 0 and "every array decoded" in res.output
    fc = sorted((data / "cocobu_fc").glob("*.npy"))[0]
    fc.write_bytes(fc.read_bytes()[:-8])
    res = CliRunner().invoke(data_app, ["check", str(data)])
    assert res.exit_code == 1 and f"{fc}" in res.output and "truncated" in res.output


def test_bu_refuses_non_finite_features(tmp_path):
    import base64

    boxes = base64.b64encode(np.zeros((2, 4), np.float32).tobytes())
    feats = np.ones((2, 8), np.float32)
    feats[1, 3] = np.nan
    line = b"\t".join([b"42", b"100", b"100", b"2", boxes, base64.b64encode(feats.tobytes())])
    (tmp_path / "f.tsv").write_bytes(line + b"\n")
    res = CliRunner().invoke(data_app, ["bu", "--tsv", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "out")])
    one_line(res, 1, "image id 42", "NaN or infinite", "region(s) [1]")
    assert not list((tmp_path / "out").rglob("42.*"))


# ----------------------------------------------------------------------------------------------- the console scripts
def run(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=300)


def test_every_command_gives_one_line_and_debug_a_traceback(trained, tmp_path):
    (tmp_path / "self.yml").write_text("_base_: self.yml\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "infos.pkl").write_bytes(b"not a pickle")
    (tmp_path / "model.pth").write_bytes(b"x")
    cases = [
        ("aoanet-train", ["xe", "-c", str(tmp_path / "self.yml")], 2, "cycle"),
        ("aoanet-eval", ["--checkpoint", str(tmp_path / "nope")], 2, "checkpoint directory not found"),
        ("aoanet-data", ["synth", "--images", "0", "--out", str(tmp_path / "s")], 1, "at least 8 images"),
        ("aoanet-convert", ["--pytorch", str(tmp_path / "model.pth"), "--infos", str(tmp_path / "infos.pkl"),
                            "--out", str(tmp_path / "file" / "c")], 1, "is not a directory"),
        ("aoanet-convert", ["--pytorch", str(tmp_path / "model.pth"), "--infos", str(tmp_path / "infos.pkl"),
                            "--out", str(tmp_path / "c")], 1, "not a readable infos pickle"),
        ("aoanet-export", ["--checkpoint", str(trained), "--out", str(tmp_path / "file" / "e")], 1,
         "is not a directory"),
        ("aoanet-export", ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "e")], 1,
         "checkpoint directory not found"),
        ("aoanet-infer", ["--model", str(tmp_path / "nope"), "--features", str(tmp_path), "--out", str(tmp_path)],
         1, "is a directory"),
    ]
    for i, (command, args, status, fragment) in enumerate(cases):
        res = run(command, *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == status and len(lines) == 1 and lines[0].startswith(f"{command}: error: "), \
            (command, res.returncode, res.stderr)
        assert fragment in lines[0], (command, lines)
        if i in (0, len(cases) - 1):  # --debug (anywhere on the line): the traceback
            res = run(command, "--debug", *args)
            assert res.returncode != 0 and "Traceback" in res.stderr, (command, res.stderr)
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists() and not (tmp_path / "e").exists()
