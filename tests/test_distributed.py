"""Data-parallel training (aoanet.train.distributed) on two CPU processes with Paddle's gloo backend.

One ``paddle.distributed.launch`` run of this file (as a script: ``worker``) trains several tiny models on 2 ranks;
the tests compare them with one-process runs:

- 2 ranks x batch 3 follow the same loss curve and end with the same weights (<= 1e-5) as 1 process x batch 6
  over the same images (dropout and scheduled sampling off, label smoothing on), and the two ranks end with
  bit-identical weights (the gradient all-reduce works);
- a 2-rank run killed and resumed on 2 ranks matches the uninterrupted one; killed on 2 ranks and resumed on 1,
  or killed on 1 and resumed on 2, it matches too (same global batch: the loader position is re-sharded);
- SCST on 2 ranks (loss from ``model.sample``, dropout on, per-rank sampling RNG) keeps the ranks in sync and
  resumes exactly from per-rank RNG states;
- rank 0 alone writes metrics and checkpoints; ``aoanet-train xe --nproc 2`` starts the launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aoanet.config import ConfigError, from_dict
from aoanet.train.distributed import (
    derived_seed,
    launch_command,
    rank_rng_state,
    reshard_loader_state,
)

ITERS, CRASH, SAVE_EVERY = 12, 6, 4  # 56 training images / global batch 6: 10 steps an epoch, the last of 2


# ----------------------------------------------------------------------------------------- helpers
def raw_config(data_dir, ckpt_dir, batch_size, dropout=False, **train):
    no_drop = {} if dropout else {"drop_prob_lm": 0.0, "dropout_aoa": 0.0, "attention_dropout": 0.0}
    return {
        "data": {"input_json": str(data_dir / "cocotalk.json"), "input_label_h5": str(data_dir / "cocotalk_label.h5"),
                 "input_att_dir": str(data_dir / "cocobu_att"),
                 "references_json": str(data_dir / "dataset_coco.json"),
                 "cached_tokens": str(data_dir / "ngrams.json.gz"), "num_workers": 0},
        "model": {"rnn_size": 32, "input_encoding_size": 32, "att_feat_size": 128, "num_heads": 4,
                  "refine_layers": 1, **no_drop},
        "train": {"checkpoint_path": str(ckpt_dir), "batch_size": batch_size, "max_epochs": 3,
                  "max_iters": ITERS, "save_checkpoint_every": SAVE_EVERY, "scheduled_sampling_start": -1,
                  "learning_rate_decay_every": 1, "losses_log_every": 1, "seed": 7, "num_threads": 1,
                  # The attention key biases get a zero gradient in exact arithmetic (softmax is shift-invariant);
                  # Adam turns the float noise there into steps of up to lr * noise / epsilon, which differs
                  # between any two summation orders. A larger epsilon keeps that noise below the tolerance.
                  "optim_epsilon": 1e-6, **train},
        "val": {"val_images_use": 4, "batch_size": 4, "language_eval": False},
        "scst": {"train_sample_n": 3, "max_length": 8},
    }


def run_steps(steps):
    """Trainer runs in this process; each step: raw config, stage, resume, start_from, crash_at, dump."""
    import paddle
    from faults import crash_at

    from aoanet.train.trainer import Trainer

    for s in steps:
        if s.get("copy"):
            if paddle.distributed.get_rank() == 0:
                shutil.copytree(s["copy"], s["to"])
            paddle.distributed.barrier()
            continue
        trainer = Trainer(from_dict(s["cfg"], source="test"), s["stage"], resume=s.get("resume", False),
                          start_from=s.get("start_from"), progress=False)
        if s.get("crash_at"):
            try:
                crash_at(trainer, s["crash_at"]).run()
            except KeyboardInterrupt:
                pass
        else:
            trainer.run()
        if s.get("dump"):
            np.savez(f"{s['dump']}-rank{trainer.dist.rank}.npz",
                     **{k: v.numpy() for k, v in trainer.model.state_dict().items()})


def worker(spec_path):
    run_steps(json.loads(Path(spec_path).read_text()))


def launch(tmp_path, steps, nproc=2):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(steps))
    logs = tmp_path / "launch"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir",
           str(logs), __file__, str(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if res.returncode != 0:
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("workerlog.*")))
        pytest.fail(f"launcher exited {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{tails}")
    return logs


def read_state(directory):
    from aoanet.train.checkpoint import Checkpoint

    return Checkpoint.open(directory).state()


def weights(directory):
    from aoanet.train.checkpoint import load_model

    model, _ = load_model(directory, which="last")
    return {k: v.numpy() for k, v in model.state_dict().items()}


def dumped(prefix, rank):
    with np.load(f"{prefix}-rank{rank}.npz") as z:
        return {k: z[k] for k in z.files}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def train_losses(directory):
    events = [json.loads(x) for x in (Path(directory) / "metrics.jsonl").read_text().splitlines()]
    return [(e["iteration"], e["loss"]) for e in events if e["event"] == "train"]


# ----------------------------------------------------------------------------------------- 2 CPU processes
@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The one-process references, then one launch of 2 ranks doing all distributed runs."""
    root = tmp_path_factory.mktemp("runs")
    one = lambda name, **kw: raw_config(data_dir, root / name, 6, **kw)  # noqa: E731
    two = lambda name, **kw: raw_config(data_dir, root / name, 3, **kw)  # noqa: E731
    # 1 process, batch 6: the reference, and a run killed at CRASH (checkpoint at SAVE_EVERY) for 1 -> 2 ranks
    run_steps([{"cfg": one("one"), "stage": "xe"},
               {"cfg": one("one_to_two"), "stage": "xe", "crash_at": CRASH}])
    scst = dict(dropout=True, max_iters=5, save_checkpoint_every=2, learning_rate=5e-4,
                learning_rate_decay_start=-1, label_smoothing=0.0)
    steps = [
        {"cfg": two("two"), "stage": "xe", "dump": str(root / "two")},
        {"cfg": two("two_resumed"), "stage": "xe", "crash_at": CRASH},
        {"copy": str(root / "two_resumed"), "to": str(root / "two_to_one")},
        {"cfg": two("two_resumed"), "stage": "xe", "resume": True},
        {"cfg": two("one_to_two"), "stage": "xe", "resume": True},
        {"cfg": two("rl", **scst), "stage": "scst", "start_from": str(root / "two"), "dump": str(root / "rl")},
        {"cfg": two("rl_resumed", **scst), "stage": "scst", "start_from": str(root / "two"), "crash_at": 4},
        {"cfg": two("rl_resumed", **scst), "stage": "scst", "resume": True},
    ]
    launch(root, steps)
    # killed on 2 ranks, resumed on 1 process with the same global batch
    with pytest.warns(UserWarning, match="re-sharded"):
        run_steps([{"cfg": one("two_to_one"), "stage": "xe", "resume": True}])
    return root


def test_two_ranks_match_one_process_with_the_global_batch(runs):
    one, two = train_losses(runs / "one"), train_losses(runs / "two")
    assert [i for i, _ in two] == list(range(1, ITERS + 1))  # rank 0 alone logs: one line per iteration
    assert [i for i, _ in one] == [i for i, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) <= 1e-5
    assert max_diff(weights(runs / "one"), weights(runs / "two")) <= 1e-5
    # the ranks hold the same weights (the gradients were averaged), and those were checkpointed
    r0, r1 = dumped(runs / "two", 0), dumped(runs / "two", 1)
    assert max_diff(r0, r1) == 0.0
    assert max_diff(r0, weights(runs / "two")) == 0.0
    state = read_state(runs / "two")
    assert state["world_size"] == 2
    assert state["epoch"] == 1 and state["finished"]  # crossed the epoch boundary (10 steps an epoch)
    assert sorted(state["rng"]) == ["0", "1"] and state["rng"]["0"] != state["rng"]["1"]
    assert len(state["history"]) == ITERS // SAVE_EVERY  # validated on rank 0 at every save


def test_distributed_resume_is_exact_and_works_across_world_sizes(runs):
    full = weights(runs / "two")
    assert max_diff(full, weights(runs / "two_resumed")) <= 1e-6  # killed and resumed on 2 ranks
    assert train_losses(runs / "two_resumed")[-1][0] == ITERS
    reference = weights(runs / "one")
    assert max_diff(reference, weights(runs / "two_to_one")) <= 1e-5  # 2 ranks -> 1 process
    assert max_diff(reference, weights(runs / "one_to_two")) <= 1e-5  # 1 process -> 2 ranks
    state = read_state(runs / "one_to_two")
    assert state["world_size"] == 2 and sorted(state["rng"]) == ["0", "1"]


def test_distributed_scst_keeps_ranks_in_sync_and_resumes_exactly(runs):
    r0, r1 = dumped(runs / "rl", 0), dumped(runs / "rl", 1)
    assert max_diff(r0, r1) == 0.0  # the SCST loss (model.sample, not forward) was all-reduced too
    assert max_diff(r0, weights(runs / "two")) > 0  # and SCST did train
    assert max_diff(weights(runs / "rl"), weights(runs / "rl_resumed")) <= 1e-6
    events = [json.loads(x) for x in (runs / "rl" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert [e["iteration"] for e in train] == [1, 2, 3, 4, 5]
    assert all("reward" in e and "sample_cider" in e for e in train)
    state = read_state(runs / "rl")
    assert state["rng"]["0"] != state["rng"]["1"]  # per-rank sampling streams


def test_nproc_shortcut_starts_the_launcher(data_dir, tmp_path):
    import yaml

    from aoanet.cli.train import app

    raw = raw_config(data_dir, tmp_path / "ck", 3, max_iters=2, save_checkpoint_every=-1)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["xe", "-c", str(tmp_path / "c.yml"), "--nproc", "2", "--quiet",
                                   "--set", "train.max_iters=3"])
    assert res.exit_code == 0, res.output
    state = read_state(tmp_path / "ck")
    assert state["world_size"] == 2 and state["iteration"] == 3 and state["finished"]
    assert [i for i, _ in train_losses(tmp_path / "ck")] == [1, 2, 3]
    assert {p.name for p in (tmp_path / "ck" / "launch").glob("workerlog.*")} == {"workerlog.0", "workerlog.1"}


# ----------------------------------------------------------------------------------------- fast unit tests
def test_reshard_loader_state():
    saved = {"split": "train", "epoch": 1, "position": 4, "seed": 7, "batch_size": 3, "world_size": 2,
             "shuffle": True, "num_images": 56}
    assert reshard_loader_state(saved, 3, 2) == (saved, 0)
    state, repeated = reshard_loader_state(saved, 6, 1)  # 24 images consumed = 4 steps of 6
    assert (state["position"], state["batch_size"], state["world_size"], repeated) == (4, 6, 1, 0)
    state, repeated = reshard_loader_state(saved, 5, 1)  # 24 = 4 x 5 + 4 images seen again
    assert (state["position"], repeated) == (4, 4)
    state, repeated = reshard_loader_state(dict(saved, position=10), 4, 4)  # a finished epoch stays finished
    assert (state["position"], repeated) == (4, 0)  # ceil(56 / 16)


def test_rank_rng_states():
    single = {"paddle": [], "numpy": [], "python": []}
    assert rank_rng_state(single, 0) is single and rank_rng_state(single, 1) is None  # one-process state.json
    assert rank_rng_state({"0": single, "1": 5}, 1) == 5
    assert rank_rng_state({"0": single}, 3) is None and rank_rng_state(None, 0) is None
    assert derived_seed(7, 2, 100) == derived_seed(7, 2, 100) != derived_seed(7, 3, 100)


def test_launch_command():
    cmd = launch_command(4, ["xe", "--config", "c.yml"], "/tmp/logs", devices="0,1,2,3")
    assert cmd[:3] == [sys.executable, "-m", "paddle.distributed.launch"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[cmd.index("--devices") + 1] == "0,1,2,3"
    assert Path(cmd[-4]).name == "aoanet-train" and cmd[-3:] == ["xe", "--config", "c.yml"]


def test_attention_dropout_option_changes_no_weights():
    import paddle

    from aoanet.model import build_model

    paddle.seed(3)
    a = build_model(20, rnn_size=16, input_encoding_size=16, att_feat_size=8, num_heads=2, refine_layers=1)
    paddle.seed(3)
    b = build_model(20, rnn_size=16, input_encoding_size=16, att_feat_size=8, num_heads=2, refine_layers=1,
                    drop_prob_lm=0.0, dropout_aoa=0.0, attention_dropout=0.0)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    assert max_diff({k: v.numpy() for k, v in sa.items()}, {k: v.numpy() for k, v in sb.items()}) == 0.0
    # with every dropout at 0, training mode computes what eval mode does
    rng = np.random.default_rng(0)
    feats = paddle.to_tensor(rng.normal(size=(2, 5, 8)).astype("float32"))
    masks = paddle.ones([2, 5])
    seq = paddle.to_tensor(rng.integers(1, 20, size=(2, 6)).astype("int64"))
    b.train()
    train_out = b(feats, masks, seq).numpy()
    b.eval()
    assert np.abs(train_out - b(feats, masks, seq).numpy()).max() == 0.0
    with pytest.raises(ValueError, match="attention_dropout"):
        build_model(20, attention_dropout=1.0)


def test_amp_on_cpu_is_a_clear_error(data_dir, tmp_path):
    from aoanet.cli.train import app
    from aoanet.train.amp import check_supported
    from aoanet.train.trainer import Trainer

    for mode in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"train.amp={mode}: .*only on GPU"):
            check_supported(mode, "cpu")
    check_supported("none", "cpu")
    with pytest.raises(ConfigError, match="train.amp must be one of none, bf16, fp16"):
        from_dict({"train": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match="train.amp=bf16"):
        Trainer(from_dict(raw_config(data_dir, tmp_path / "amp", 3, amp="bf16")), "xe", progress=False)
    import yaml

    (tmp_path / "c.yml").write_text(yaml.safe_dump(raw_config(data_dir, tmp_path / "amp", 3)))
    for nproc in ("0", "2"):  # refused before the launcher starts any rank
        res = CliRunner().invoke(app, ["xe", "-c", str(tmp_path / "c.yml"), "--amp", "fp16", "--nproc", nproc])
        assert res.exit_code == 2 and "train.amp=fp16" in res.output
    assert not (tmp_path / "amp" / "launch").exists()


if __name__ == "__main__":  # started by paddle.distributed.launch on every rank (see launch())
    worker(sys.argv[1])
