"""Checkpoints that cannot run code, are saved and verified as sets, and are not overwritten by accident.

- every weight file the project reads, planted with a pickle that would run code: nothing runs, the refused
  global is named (checkpoint weights, best weights, optimizer state, --resume, --start-from, aoanet-eval,
  aoanet-export, aoanet-infer --backend paddle, aoanet-convert's inputs);
- SIGKILL at six points of a save, in a real process: --resume ends with the weights of an uninterrupted run, no
  temporary or unlisted file is left, metrics.jsonl holds each event once;
- a file mixed in from another save, a truncated file, flipped bits: refused by resume, --start-from, export, eval
  and the Paddle backend, naming the file;
- a checkpoint of the earlier format (.pdparams/.pdopt pickles) still loads and resumes exactly;
- a new run never replaces an earlier one without --overwrite; a lock stops a second writer and is stale once its
  process is gone.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml
from test_train import max_diff, read_state, small_config, weights
from typer.testing import CliRunner

from aoanet.config import dump_config
from aoanet.train import checkpoint as ckpt
from aoanet.train.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, load_model
from aoanet.train.runlock import LOCK, LockError, RunLock, process_start_time
from aoanet.train.trainer import Trainer

TESTS = Path(__file__).resolve().parent
ITERS, SAVE_EVERY = 8, 3  # saves at 3, 6 and 8 (the end)


class RunsCode:
    """Unpickling this runs ``touch marker``: what a tampered weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(marker) -> bytes:
    return pickle.dumps({"embed.0.weight": RunsCode(marker)}, protocol=4)


def paddle_bytes(obj) -> bytes:
    buf = io.BytesIO()
    paddle.save(obj, buf)
    return buf.getvalue()


def make_legacy(src: Path, dst: Path) -> Path:
    """The checkpoint ``src`` in the earlier format: flat files, weights and optimizer state pickled by paddle.save,
    no manifest (what this project wrote before checkpoint.json)."""
    ck = Checkpoint.open(src)
    dst.mkdir(parents=True)
    for role in ("model", "config", "state"):
        if ck.has(role):
            (dst / ckpt.LEGACY_NAMES[role]).write_bytes(ck.read(role))
    for which, role in (("last", "weights_last"), ("best", "weights_best")):
        if ck.has(role):
            state = {k: paddle.to_tensor(v) for k, v in ck.weights(which)[0].items()}
            (dst / ckpt.LEGACY_NAMES[role]).write_bytes(paddle_bytes(state))
    if ck.has("optimizer"):
        state = {k: paddle.to_tensor(v) for k, v in ck.optimizer_state().items()}
        (dst / "optimizer.pdopt").write_bytes(paddle_bytes(state))
    return dst


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted XE run of ITERS iterations, saving every SAVE_EVERY."""
    d = tmp_path_factory.mktemp("reference") / "run"
    Trainer(small_config(data_dir, d, max_iters=ITERS, save_checkpoint_every=SAVE_EVERY), "xe", progress=False).run()
    return d


def events(directory) -> list[tuple]:
    lines = (Path(directory) / "metrics.jsonl").read_text().splitlines()
    return [(e["event"], e["iteration"]) for e in map(json.loads, lines)]


def listed_files(directory) -> set[str]:
    return {e["path"] for e in Checkpoint.open(directory).manifest["files"].values()}


def files_on_disk(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in Path(directory).glob("save-*/*")}


# ----------------------------------------------------------------------------------------------- 1. no code runs
def test_new_checkpoints_hold_no_pickle(reference):
    ck = Checkpoint.open(reference)
    assert set(ck.manifest["files"]) == {"model", "config", "state", "weights_last", "weights_best", "optimizer"}
    for role in ck.manifest["files"]:
        data = ck.read(role)
        assert not data.startswith(b"\x80"), role  # no pickle protocol header
    for role in ("weights_last", "optimizer"):  # safetensors: an 8-byte header length, then a JSON header
        data = ck.read(role)
        n = int.from_bytes(data[:8], "little")
        assert json.loads(data[8 : 8 + n])


def test_planted_pickles_run_nothing(reference, data_dir, tmp_path, monkeypatch):
    """Every weight file the project reads, replaced by a pickle that would run code."""
    marker = tmp_path / "pwned"
    legacy = make_legacy(reference, tmp_path / "legacy")
    cases = {}
    for name in ("model.pdparams", "model-best.pdparams", "optimizer.pdopt"):
        d = tmp_path / f"evil-{name}"
        shutil.copytree(legacy, d)
        (d / name).write_bytes(evil_pickle(marker))
        cases[name] = d
    # Paddle's own tensor form with another expression for eval: refused too
    d = tmp_path / "evil-eval"
    shutil.copytree(legacy, d)
    (d / "model.pdparams").write_bytes(pickle.dumps({"w": _EvalCall(f"__import__('os').system('touch {marker}')")},
                                                    protocol=4))
    cases["eval"] = d

    def refused(fn, *args, **kwargs):
        with pytest.raises(CheckpointError, match="refusing to load global|builtins.eval"):
            fn(*args, **kwargs)
        assert not marker.exists()

    refused(load_model, cases["model.pdparams"], "last")  # aoanet-eval / export / infer paddle load through this
    refused(load_model, cases["model-best.pdparams"], "best")
    refused(load_model, cases["eval"], "last")
    for name in ("model.pdparams", "optimizer.pdopt"):  # --resume and --start-from
        refused(Trainer, small_config(data_dir, cases[name], max_iters=ITERS), "xe", resume=True, progress=False)
        refused(Trainer, small_config(data_dir, tmp_path / f"rl-{name}", max_iters=2), "scst",
                start_from=str(cases[name]), progress=False)

    # the commands, end to end
    from aoanet.cli.eval import app as eval_app
    from aoanet_export.cli import app as export_app
    from aoanet_runtime import cli as infer_cli

    res = CliRunner().invoke(export_app, ["--checkpoint", str(cases["model-best.pdparams"]), "--out",
                                          str(tmp_path / "export")])
    assert res.exit_code == 1 and "refusing to load global posix.system" in res.output, res.output
    res = CliRunner().invoke(infer_cli.app, ["--backend", "paddle", "--checkpoint", str(cases["model.pdparams"]),
                                             "--which", "last", "--features", str(data_dir), "--out",
                                             str(tmp_path / "c.json")])
    assert res.exit_code == 1 and "refusing to load global" in res.output, res.output
    res = CliRunner().invoke(eval_app, ["--checkpoint", str(cases["model-best.pdparams"]), "--num-images", "2"])
    assert res.exit_code == 2 and "refusing to load global" in res.output, res.output
    assert not marker.exists()

    # the current format: a pickle under a safetensors name, with the manifest's hash made to match
    d = tmp_path / "evil-safetensors"
    shutil.copytree(reference, d)
    manifest = json.loads((d / "checkpoint.json").read_text())
    data = evil_pickle(marker)
    entry = manifest["files"]["weights_last"]
    (d / entry["path"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=ckpt.sha256_bytes(data))
    (d / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="could not be read as safetensors"):
        load_model(d, "last")
    assert not marker.exists()


class _DenseTensorForm:
    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return eval, ("data", {"data": self.array})


class _EvalCall:
    """Pickles as ``eval(expression)``: the global Paddle's tensor form uses, with another argument."""

    def __init__(self, expression):
        self.expression = expression

    def __reduce__(self):
        return eval, (self.expression,)


def test_convert_inputs_run_nothing(tmp_path):
    """aoanet-convert's inputs: the infos pickle (restricted unpickler) and the .pth (torch >= 2.6's weights-only
    loader, or, without torch, not read at all)."""
    from aoanet import convert

    marker = tmp_path / "pwned"
    (tmp_path / "infos.pkl").write_bytes(pickle.dumps({"opt": RunsCode(marker)}, protocol=2))
    with pytest.raises(convert.UnsafePickleError, match="posix.system"):
        convert.load_reference_infos(tmp_path / "infos.pkl")
    (tmp_path / "model.pth").write_bytes(evil_pickle(marker))
    with pytest.raises(convert.ConversionError):
        convert.read_pytorch_state_dict(tmp_path / "model.pth")
    assert not marker.exists()


def test_restricted_unpickler_reads_what_paddle_save_writes():
    """Both forms paddle.save gives tensors (a state dict's arrays; (name, array) pairs and eval('data', ...)
    elsewhere), and arrays split into slices by pickle protocols 2 and 3."""
    from aoanet.safe_pickle import load_paddle_state

    lin = paddle.nn.Linear(3, 2)
    opt = paddle.optimizer.Adam(parameters=lin.parameters())
    lin(paddle.ones([1, 3])).sum().backward()
    opt.step()
    for obj in (lin.state_dict(), opt.state_dict(), {"nested": {"t": paddle.ones([2])}, "lr": 0.5}):
        for protocol in (2, 3, 4):
            buf = io.BytesIO()
            paddle.save(obj, buf, protocol=protocol)
            got = load_paddle_state(buf.getvalue(), "test")
            want = paddle.load(io.BytesIO(buf.getvalue()), return_numpy=True)
            want.pop("StructuredToParameterName@@", None)
            assert got.keys() == want.keys()
            for k in got:
                if isinstance(got[k], dict):
                    assert {n: v.tolist() for n, v in got[k].items()} == {n: np.asarray(v).tolist()
                                                                          for n, v in want[k].items()}
                else:
                    np.testing.assert_array_equal(got[k], np.asarray(want[k]))
    # eval('data', {'data': array}): the DenseTensor form
    got = load_paddle_state(pickle.dumps({"t": _DenseTensorForm(np.arange(3.0))}, protocol=2), "t")
    np.testing.assert_array_equal(got["t"], np.arange(3.0))
    sliced = {"big@@.0": np.arange(4.0), "big@@.1": np.arange(4.0, 6.0),
              "UnpackBigParamInfor@@": {"big": {"OriginShape": (2, 3), "slices": ["big@@.0", "big@@.1"]}}}
    np.testing.assert_array_equal(load_paddle_state(pickle.dumps(sliced), "t")["big"],
                                  np.arange(6.0).reshape(2, 3))


# ----------------------------------------------------------------------------------------------- 2. sets, verified
KILL_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from aoanet.cpu import configure_math_library
configure_math_library()
from faults import kill_during_save
from aoanet.config import from_dict
from aoanet.train.trainer import Trainer
kill_during_save(2, {point!r})
Trainer(from_dict(json.loads({cfg!r}), source="test"), "xe", progress=False).run()
"""


@pytest.mark.parametrize("point", ["before", "first_file", "between_files", "mid_file", "renamed", "manifest"])
def test_sigkill_during_a_save_then_resume(point, reference, data_dir, tmp_path):
    from faults import KILL_POINTS

    assert point in KILL_POINTS
    d = tmp_path / "run"
    cfg = small_config(data_dir, d, max_iters=ITERS, save_checkpoint_every=SAVE_EVERY)
    script = KILL_SCRIPT.format(tests=str(TESTS), point=point, cfg=json.dumps(cfg.to_dict()))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # what the kill left: the first save, or the second one if its manifest was written
    state = read_state(d)
    assert state["iteration"] == (6 if point == "manifest" else 3)
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".")] + sorted(files_on_disk(d) - listed_files(d))
    assert leftovers or point in ("before", "manifest")  # (the kill left something to clean up)
    Trainer(cfg, "xe", resume=True, progress=False).run()
    assert max_diff(weights(reference), weights(d)) <= 1e-6
    assert read_state(d)["iteration"] == ITERS
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]  # no temporary file or directory
    assert files_on_disk(d) == listed_files(d)  # nothing unlisted
    assert not (d / LOCK).exists()
    assert events(d) == events(reference)  # every event once, in order


def _flip_bits(path: Path, n: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    header = 8 + int.from_bytes(data[:8], "little")
    for pos in rng.choice(np.arange(header, len(data) - 4, 4), size=n, replace=False):
        data[pos + 3] ^= 0x40  # the exponent's high bit of a little-endian float32
    path.write_bytes(bytes(data))


def test_a_mixed_set_or_flipped_bits_are_refused(reference, data_dir, tmp_path):
    ck = Checkpoint.open(reference)
    other = tmp_path / "other"  # a run with different weights: its file is the one mixed in
    Trainer(small_config(data_dir, other, max_iters=2, seed=11), "xe", progress=False).run()
    cases = {}
    mixed = tmp_path / "mixed"
    shutil.copytree(reference, mixed)
    shutil.copy(Checkpoint.open(other).path("weights_last"), mixed / ck.manifest["files"]["weights_last"]["path"])
    cases["mixed"] = (mixed, "weights_last")
    flipped = tmp_path / "flipped"
    shutil.copytree(reference, flipped)
    _flip_bits(flipped / ck.manifest["files"]["weights_best"]["path"])
    cases["flipped"] = (flipped, "weights_best")
    truncated = tmp_path / "truncated"
    shutil.copytree(reference, truncated)
    path = truncated / ck.manifest["files"]["optimizer"]["path"]
    path.write_bytes(path.read_bytes()[:-100])
    cases["truncated"] = (truncated, "optimizer")
    state = tmp_path / "state"
    shutil.copytree(reference, state)
    path = state / ck.manifest["files"]["state"]["path"]
    path.write_text(path.read_text().replace('"iteration": 8', '"iteration": 7'))
    cases["state"] = (state, "state")

    from aoanet.cli.eval import app as eval_app
    from aoanet_export import ExportError, export_checkpoint
    from aoanet_runtime import cli as infer_cli

    for name, (d, role) in cases.items():
        bad = Checkpoint.open(d).path(role).relative_to(d).as_posix()
        with pytest.raises(CheckpointError, match=f"{bad} does not match .*checkpoint.json"):
            Trainer(small_config(data_dir, d, max_iters=ITERS), "xe", resume=True, progress=False)
        if role in ("weights_last", "optimizer"):  # what --start-from reads
            with pytest.raises(CheckpointError, match=f"{bad} does not match"):
                Trainer(small_config(data_dir, tmp_path / f"rl-{name}", max_iters=2), "scst", start_from=str(d),
                        progress=False)
        if role.startswith("weights"):
            which = role.split("_")[1]
            with pytest.raises(ExportError, match=f"{bad} does not match"):
                export_checkpoint(d, tmp_path / f"export-{name}", which=which)
            res = CliRunner().invoke(eval_app, ["--checkpoint", str(d), "--which", which, "--num-images", "2"])
            assert res.exit_code == 2 and f"{bad} does not match" in res.output, res.output
            res = CliRunner().invoke(infer_cli.app, ["--backend", "paddle", "--checkpoint", str(d), "--which", which,
                                                     "--features", str(data_dir), "--out", str(tmp_path / "c.json")])
            assert res.exit_code == 1 and f"{bad} does not match" in res.output, res.output
        assert not (d / LOCK).exists()


def test_the_final_save_does_not_copy_the_best_weights(data_dir, tmp_path):
    """A run whose last iteration was just validated saves once more (finished); its weights are the best ones,
    already written: the manifest points at that file instead of a second copy."""
    d = tmp_path / "run"
    Trainer(small_config(data_dir, d, max_iters=6, save_checkpoint_every=3), "xe", progress=False).run()
    ck = Checkpoint.open(d)
    assert ck.manifest["finished"] and ck.manifest["save"] == "save-00000006.1"
    assert ck.path("weights_last") == ck.path("weights_best") == d / "save-00000006" / "model.safetensors"
    assert sorted(files_on_disk(d)) == sorted(listed_files(d)) and len(list(d.glob("save-*/model.safetensors"))) == 1


def test_a_reader_follows_a_save_made_while_it_reads(reference, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    ck = Checkpoint.open(d)
    model, ix_to_word = load_model(d, "last")
    CheckpointWriter(d).save({"model": ck.read("model"), "weights_last": ckpt.weights_bytes(model)},
                             info={"iteration": 9})  # the previous save's files are deleted
    with pytest.raises(ckpt.CheckpointMoved):
        ck.read("weights_last")
    assert ckpt.with_checkpoint(d, lambda c: c.manifest["iteration"]) == 9


def test_an_earlier_format_checkpoint_loads_and_resumes_exactly(reference, data_dir, tmp_path):
    """.pdparams / .pdopt / state.json of the earlier format: loaded through the restricted unpickler; a resumed
    run writes the current format, carries the best weights over and ends with the uninterrupted run's weights."""
    first = tmp_path / "first"
    Trainer(small_config(data_dir, first, max_iters=SAVE_EVERY * 2, save_checkpoint_every=SAVE_EVERY), "xe",
            progress=False).run()
    legacy = make_legacy(first, tmp_path / "legacy")
    shutil.copy(first / "metrics.jsonl", legacy / "metrics.jsonl")
    state = json.loads((legacy / "state.json").read_text())
    del state["metrics_bytes"]  # the earlier format had none: the log is cut back by iteration
    (legacy / "state.json").write_text(json.dumps(state))
    assert Checkpoint.open(legacy).legacy
    m1, _ = load_model(first, "best")
    m2, _ = load_model(legacy, "best")
    assert max_diff({k: v.numpy() for k, v in m1.state_dict().items()},
                    {k: v.numpy() for k, v in m2.state_dict().items()}) == 0.0
    best_before = Checkpoint.open(legacy).weights("best")[0]
    with open(legacy / "metrics.jsonl", "a") as f:  # events logged after the save, before a kill
        f.write(json.dumps({"event": "train", "stage": "xe", "iteration": 7, "loss": 1.0}) + "\n")
        f.write('{"event": "tra')
    Trainer(small_config(data_dir, legacy, max_iters=ITERS, save_checkpoint_every=SAVE_EVERY), "xe", resume=True,
            progress=False).run()
    assert max_diff(weights(reference), weights(legacy)) <= 1e-6
    assert not Checkpoint.open(legacy).legacy
    assert events(legacy) == events(reference)
    if read_state(legacy)["best_score"] is None:  # no language eval in the tests: every save is "best"
        return
    best_after = Checkpoint.open(legacy).weights("best")[0]
    assert max_diff(best_before, best_after) == 0.0


# ----------------------------------------------------------------------------------------------- 3. overwrite, lock
def test_a_new_run_does_not_replace_an_earlier_one(reference, data_dir, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(reference, d)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    cfg = small_config(data_dir, d, max_iters=2)
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint \(xe, iteration 8\).*--resume.*--overwrite"):
        Trainer(cfg, "xe", progress=False)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before and not (d / LOCK).exists()
    # through the command: exit status 2, one line
    from aoanet.cli.train import app

    (tmp_path / "c.yml").write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["xe", "-c", str(tmp_path / "c.yml"), "--quiet"])
    assert res.exit_code == 2 and "already holds a checkpoint" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["xe", "-c", str(tmp_path / "c.yml"), "--quiet", "--resume", "--overwrite"])
    assert res.exit_code == 2 and "give one of them" in res.output
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    with pytest.raises(CheckpointError, match="is train.checkpoint_path itself"):  # SCST into its own source
        Trainer(small_config(data_dir, d, max_iters=2), "scst", start_from=str(d), overwrite=True, progress=False)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    # a directory of anything else is never deleted, even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="thesis.tex"):
        Trainer(small_config(data_dir, foreign, max_iters=2), "xe", progress=False, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    # --overwrite replaces the earlier run
    res = CliRunner().invoke(app, ["xe", "-c", str(tmp_path / "c.yml"), "--quiet", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert read_state(d)["iteration"] == 2 and events(d)[-1] == ("val", 2)
    assert files_on_disk(d) == listed_files(d)


def test_the_lock_stops_a_second_writer_and_goes_stale_with_its_process(data_dir, tmp_path):
    d = tmp_path / "run"
    cfg = small_config(data_dir, d, max_iters=2)
    first = Trainer(cfg, "xe", progress=False)
    info = json.loads((d / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["start_time"] == process_start_time(os.getpid())
    with pytest.raises(LockError, match=f"pid {os.getpid()}"):
        Trainer(cfg, "xe", progress=False)
    first.close()
    assert not (d / LOCK).exists()
    # a lock left by a process that is gone (killed): stale, taken over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (d / LOCK).write_text(json.dumps({**info, "pid": gone.pid, "start_time": None, "token": "x"}))
    Trainer(cfg, "xe", progress=False).run()
    assert not (d / LOCK).exists()
    # a live process holds it: refused; the same pid with another start time (a recycled pid): stale
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / LOCK).write_text(json.dumps({**info, "pid": live.pid, "start_time": process_start_time(live.pid),
                                          "token": "y"}))
        with pytest.raises(LockError, match=f"pid {live.pid}"):
            RunLock(d).acquire()
        (d / LOCK).write_text(json.dumps({**info, "pid": live.pid, "start_time": 1, "token": "z"}))
        lock = RunLock(d).acquire()
        lock.release()
    finally:
        live.kill()
        live.wait()
    # a lock taken on another host cannot be checked: refused, naming the file to delete
    (d / LOCK).write_text(json.dumps({**info, "host": "elsewhere", "token": "w"}))
    with pytest.raises(LockError, match=f"another host.*delete {d / LOCK}"):
        RunLock(d).acquire()


def test_two_processes_cannot_train_into_one_directory(data_dir, tmp_path):
    """A real second process is refused while the first trains; after the first is killed (SIGKILL), its stale lock
    does not stop a --resume."""
    d = tmp_path / "run"
    cfg = small_config(data_dir, d, max_iters=10_000, save_checkpoint_every=3)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg.to_dict()))
    train = [str(Path(sys.executable).with_name("aoanet-train")), "xe", "-c", str(tmp_path / "c.yml"), "--quiet"]
    first = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (d / "checkpoint.json").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (d / LOCK).is_file() and first.poll() is None
        second = subprocess.run([*train, "--resume"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"is being written by another training run: pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    assert (d / LOCK).is_file()  # left by the killed run: stale
    cfg = small_config(data_dir, d, max_iters=read_state(d)["iteration"] + 1, save_checkpoint_every=3)
    Trainer(cfg, "xe", resume=True, progress=False).run()
    assert not (d / LOCK).exists()
