"""Clean exit: SIGINT (a terminal's Ctrl-C, sent to the whole process group), SIGTERM and SIGKILL of a training run
or of an evaluation leave no loader worker and no Java process behind, and Ctrl-C during METEOR ends the process
within seconds (pycocoevalcap's own Meteor hangs there: its clean-up waits on a lock the interrupted call holds).
Real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_data_support import COCO_CAPTIONS
from test_train import small_config

from aoanet.train.runlock import LOCK

ROOT = Path(__file__).resolve().parents[1]
EXIT_WITHIN = 10.0  # seconds from the signal to the process's end (measured: docs/robustness.md)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"  # a zombie has ended


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def gone_within(pids, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def send(process: subprocess.Popen, sig: int) -> None:
    # SIGINT as a terminal sends it: to the whole foreground process group
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)


@contextlib.contextmanager
def running(cmd: list[str]):
    """The command in its own session (so that SIGINT reaches only its group), killed if a test leaves it running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def signal_and_wait(process: subprocess.Popen, sig: int) -> float:
    """Seconds from the signal to the process's end."""
    start = time.time()
    send(process, sig)
    process.wait(timeout=60)
    return time.time() - start


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_training_leaves_no_loader_worker(sig, data_dir, tmp_path):
    d = tmp_path / "run"
    cfg = small_config(data_dir, d, max_iters=100_000, save_checkpoint_every=100_000, max_epochs=10_000)
    raw = cfg.to_dict()
    raw["data"]["num_workers"] = 2
    (tmp_path / "c.yml").write_text(yaml.safe_dump(raw))
    train = [str(Path(sys.executable).with_name("aoanet-train")), "xe", "-c", str(tmp_path / "c.yml"), "--quiet"]
    with running(train) as proc:
        workers = wait_for(lambda: len(children(proc.pid)) >= 2 and children(proc.pid), 120, "the loader workers")
        time.sleep(1.0)  # training steps are running
        took = signal_and_wait(proc, sig)
    stderr = proc.stderr.read().decode()
    assert took < EXIT_WITHIN, took
    assert gone_within(workers, 5.0), [cmdline(p) for p in workers if alive(p)]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert (d / LOCK).is_file()  # stale: the next run checks its pid
    else:
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr
        expected = "aoanet-train: interrupted" if sig == signal.SIGINT else "aoanet-train: terminated (SIGTERM)"
        assert stderr.strip().splitlines() == [expected], stderr
        assert not (d / LOCK).exists()


EVAL_SCRIPT = """
import json, sys
from aoanet.metrics.coco_eval import language_eval
from aoanet_runtime.cliutil import report_errors
raw = json.load(open({captions!r}))
by_image = {{}}
for ann in raw["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann["caption"])
preds, refs = [], {{}}
for copy in range({copies}):  # enough images for METEOR to run for a while
    for image_id, caps in by_image.items():
        key = copy * 10_000_000 + image_id
        preds.append({{"image_id": key, "caption": caps[0]}})
        refs[key] = caps[1:]
import typer
try:
    report_errors("aoanet-eval")(language_eval)(preds, refs, spice=False)
except typer.Exit as e:  # what the command's typer app does with it
    sys.exit(e.exit_code)
print("finished")
"""


def java_children(pid: int, jar: str) -> list[int]:
    return [c for c in children(pid) if jar in cmdline(c)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_meteor_stops_with_its_parent(sig, tmp_path):
    if not any((Path(p) / "java").is_file() for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("no java")
    script = EVAL_SCRIPT.format(captions=str(COCO_CAPTIONS), copies=20)
    with running([sys.executable, "-c", script]) as proc:
        java = wait_for(lambda: java_children(proc.pid, "meteor-1.5.jar"), 180, "the METEOR process")
        time.sleep(1.0)  # scoring
        assert proc.poll() is None, "METEOR finished before the signal: give it more images"
        took = signal_and_wait(proc, sig)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    assert "finished" not in out
    assert took < EXIT_WITHIN, took
    assert gone_within(java, 5.0), [cmdline(p) for p in java if alive(p)]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
        assert "Traceback" not in err
    print(json.dumps({"signal": signal.Signals(sig).name, "exit_seconds": round(took, 2)}))
