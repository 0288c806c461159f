"""XE and SCST training on a tiny embedded dataset: exact resume, NaN stop, checkpoints, metrics, SCST start."""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest
from faults import crash_at

from aoanet.config import from_dict
from aoanet.train import trainer as trainer_mod
from aoanet.train.checkpoint import Checkpoint, load_model
from aoanet.train.trainer import Trainer, TrainingDiverged


def small_config(data_dir, ckpt_dir, **train):
    raw = {
        "data": {
            "input_json": str(data_dir / "cocotalk.json"),
            "input_label_h5": str(data_dir / "cocotalk_label.h5"),
            "input_att_dir": str(data_dir / "cocobu_att"),
            "references_json": str(data_dir / "dataset_coco.json"),
            "cached_tokens": str(data_dir / "ngrams.json.gz"),
            "num_workers": 0,
        },
        "model": {
            "rnn_size": 32,
            "input_encoding_size": 32,
            "att_feat_size": 128,
            "num_heads": 4,
            "refine_layers": 1,
        },
        "train": {
            "checkpoint_path": str(ckpt_dir),
            "batch_size": 8,
            "max_epochs": 3,
            "save_checkpoint_every": 3,
            "scheduled_sampling_start": 0,
            "scheduled_sampling_increase_every": 1,
            "learning_rate_decay_every": 1,
            "losses_log_every": 1,
            "seed": 7,
            **train,
        },
        "val": {"val_images_use": 4, "batch_size": 4, "language_eval": False},
        "scst": {"train_sample_n": 3, "max_length": 8},
    }
    return from_dict(raw, source="test")


def read_state(directory):
    return Checkpoint.open(directory).state()


def weights(directory):
    model, _ = load_model(directory, which="last")
    return {k: v.numpy() for k, v in model.state_dict().items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_xe_resume_is_exact(data_dir, tmp_path):
    # 6 training images per epoch / batch 8 -> 1 batch an epoch would be too few: the synth split has ~45 images
    full = small_config(data_dir, tmp_path / "full", max_iters=11)
    Trainer(full, "xe", progress=False).run()
    broken = small_config(data_dir, tmp_path / "broken", max_iters=11)
    with pytest.raises(KeyboardInterrupt):
        crash_at(Trainer(broken, "xe", progress=False), 8).run()
    state = read_state(tmp_path / "broken")
    assert state["iteration"] == 6 and not state["finished"]
    paddle.seed(999)  # a fresh process would have a different RNG: resume must restore it
    Trainer(broken, "xe", resume=True, progress=False).run()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "broken")
    assert max_diff(a, b) <= 1e-6
    # and the runs really moved the weights and crossed an epoch boundary with scheduled sampling on
    final = read_state(tmp_path / "full")
    assert final["iteration"] == 11 and final["epoch"] >= 1 and final["finished"]
    events = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "train" and e["ss_prob"] > 0 for e in events)
    assert any(e["event"] == "val" for e in events)
    assert (tmp_path / "full" / "curves.png").stat().st_size > 1000
    ck = Checkpoint.open(tmp_path / "full")
    for role in ("model", "config", "state", "weights_last", "weights_best", "optimizer"):
        assert ck.path(role).is_file()
    assert not list((tmp_path / "full").glob(".*tmp")) and not (tmp_path / "full" / "train.lock").exists()


def test_nan_loss_stops_naming_the_iteration(data_dir, tmp_path, monkeypatch):
    cfg = small_config(data_dir, tmp_path / "nan", max_iters=10)
    real = trainer_mod.language_model_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer_mod, "language_model_loss", sometimes_nan)
    with pytest.raises(TrainingDiverged, match="iteration 5"):
        Trainer(cfg, "xe", progress=False).run()
    state = read_state(tmp_path / "nan")
    assert state["iteration"] == 3  # the last good checkpoint is kept
    w = weights(tmp_path / "nan")
    assert all(np.isfinite(v).all() for v in w.values())


def test_scst_starts_from_last_xe_and_resumes_exactly(data_dir, tmp_path):
    xe = small_config(data_dir, tmp_path / "xe", max_iters=4)
    Trainer(xe, "xe", progress=False).run()

    def scst_cfg(name):
        cfg = small_config(
            data_dir,
            tmp_path / name,
            max_iters=7,
            learning_rate=2e-5,
            scheduled_sampling_start=-1,
            learning_rate_decay_start=-1,
            label_smoothing=0.0,
        )
        return cfg

    t = Trainer(scst_cfg("rl_full"), "scst", start_from=str(tmp_path / "xe"), progress=False)
    # starts from the LAST XE weights, with the XE optimizer state, at the SCST learning rate
    xe_w = weights(tmp_path / "xe")
    assert max_diff({k: v.numpy() for k, v in t.model.state_dict().items()}, xe_w) == 0.0
    assert abs(float(t.optimizer.get_lr()) - 2e-5) < 1e-12
    t.run()
    with pytest.raises(KeyboardInterrupt):
        crash_at(Trainer(scst_cfg("rl_broken"), "scst", start_from=str(tmp_path / "xe"), progress=False), 5).run()
    Trainer(scst_cfg("rl_broken"), "scst", resume=True, progress=False).run()
    assert max_diff(weights(tmp_path / "rl_full"), weights(tmp_path / "rl_broken")) <= 1e-6
    assert max_diff(weights(tmp_path / "rl_full"), xe_w) > 0  # SCST changed the model
    events = [json.loads(x) for x in (tmp_path / "rl_full" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert train and all("reward" in e and "sample_cider" in e for e in train)


def test_resume_without_checkpoint_is_a_clear_error(data_dir, tmp_path):
    from aoanet.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(small_config(data_dir, tmp_path / "none"), "xe", resume=True, progress=False)
