"""The training loop shared by both stages: cross-entropy (XE) and self-critical sequence training (SCST).

What a run guarantees:
- one writer per checkpoint directory (``train.lock``, ``aoanet.train.runlock``), and a new run never replaces an
  earlier one's files unless asked to (``overwrite=True``);
- each save is a verified set (``aoanet.train.checkpoint``): the last weights, the best ones (val CIDEr), the
  optimizer and the training state of one iteration, bound by a manifest written last;
- ``resume=True`` continues exactly: weights, optimizer, loader position and RNG states are restored, so a run
  killed at any point (even during a save) and resumed ends with the same weights as one that was not (with the
  same number of ranks; what a resume on another number of ranks changes is said in
  ``aoanet.train.distributed``); ``metrics.jsonl`` is cut back to the resumed save;
- a non-finite loss stops the run naming the iteration; the last checkpoint is kept;
- progress bar with loss, rate and ETA; metrics appended to ``metrics.jsonl``; VisualDL scalars when installed;
  ``curves.png`` (training loss and validation scores) at the end;
- under ``paddle.distributed.launch`` it trains data-parallel (``aoanet.train.distributed``: sharded batches,
  averaged gradients, rank 0 writes and validates); ``train.amp`` selects mixed precision (``aoanet.train.amp``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from aoanet.config import Config, dump_config
from aoanet.model import AoAModel
from aoanet.train import checkpoint as ckpt
from aoanet.train.amp import Precision
from aoanet.train.distributed import (
    Ranks,
    derived_seed,
    rank_rng_state,
    reshard_loader_state,
    warn_reshard,
)
from aoanet.train.losses import language_model_loss, reward_loss, reward_mask
from aoanet.train.optim import build_optimizer
from aoanet.vision.extract import extractor_record

STATE_FORMAT = "aoanet-train-state/1"


class TrainingDiverged(RuntimeError):
    pass


def set_threads(num_threads: int) -> None:
    n = num_threads or os.cpu_count() or 1
    try:
        paddle.base.core.set_num_threads(n)
    except AttributeError:  # older Paddle
        pass


def seed_all(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def rng_state() -> dict:
    return {
        "paddle": [list(s.__getstate__()) for s in paddle.get_rng_state()],
        "numpy": _np_state_to_json(np.random.get_state()),
        "python": _py_state_to_json(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    cls = type(paddle.get_rng_state()[0])
    restored = []
    for s in state["paddle"]:
        g = cls.__new__(cls)
        g.__setstate__(tuple(s))
        restored.append(g)
    paddle.set_rng_state(restored)
    np.random.set_state(_np_state_from_json(state["numpy"]))
    random.setstate(_py_state_from_json(state["python"]))


def _np_state_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_state_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


class Trainer:
    """One training run of a stage ('xe' or 'scst') with a validated config."""

    def __init__(self, cfg: Config, stage: str, resume: bool = False, start_from: str | None = None,
                 progress: bool = True, overwrite: bool = False):
        if stage not in ("xe", "scst"):
            raise ValueError(f"stage must be 'xe' or 'scst', got {stage!r}")
        self.cfg, self.stage = cfg, stage
        self.dist = Ranks()  # joins the launcher's process group, if any (aoanet.train.distributed)
        self.progress = progress and self.dist.main
        self.dir = Path(cfg.train.checkpoint_path)
        self.lock = ckpt.RunLock(self.dir)
        self.saver = ckpt.CheckpointWriter(self.dir)
        self._saved_iteration: int | None = None  # of the checkpoint in self.dir, if any
        self._carry: dict[str, bytes] = {}  # files of the next save taken from an earlier version's checkpoint
        self._loader = None
        if start_from and not resume and Path(start_from).resolve() == self.dir.resolve():
            raise ckpt.CheckpointError(
                f"--start-from {start_from} is train.checkpoint_path itself: the new stage needs its own directory")
        if self.dist.main:  # rank 0 alone writes the directory
            self.lock.acquire()
        try:
            if self.dist.main:
                if resume:
                    self.saver.collect_garbage()  # what a killed save left behind
                else:
                    ckpt.prepare_new_run(self.dir, overwrite)
            self._setup(cfg, stage, resume, start_from)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: Config, stage: str, resume: bool, start_from: str | None) -> None:
        from aoanet.data.loader import CaptionData

        set_threads(cfg.train.num_threads or self.dist.threads_per_rank())
        self.amp = Precision(cfg.train.amp)
        seed_all(cfg.train.seed)  # the same on every rank: identical initial weights

        d = cfg.data
        self.data = CaptionData(d.input_json, d.input_label_h5, d.input_att_dir,
                                att_feat_size=self.model_width(cfg), seq_per_img=d.seq_per_img)
        self.model = AoAModel(self.data.vocab_size, cfg.model_options())
        # The image extractor the features came from (None for bottom-up or generated features), kept in model.json.
        self.extractor = extractor_record(d.input_att_dir, self.model_width(cfg))
        self.optimizer = build_optimizer(cfg.train, self.model.parameters())
        seed_all(cfg.train.seed + self.dist.rank)  # dropout and sampling differ across ranks
        self.state = {"format": STATE_FORMAT, "stage": stage, "epoch": 0, "iteration": 0, "loader": None,
                      "best_score": None, "history": [], "lr": cfg.train.learning_rate,
                      "plateau": {"best": None, "bad_epochs": 0}, "finished": False,
                      "world_size": self.dist.world_size}
        self.scorer = None
        if resume:
            self._resume()
        elif start_from:
            self._start_from(start_from)
        self.dist.wrap(self.model)
        self.references = None
        self.writer = self._visualdl()
        # run() starts from this RNG state, whatever is drawn between construction and run() (other models built,
        # tests inspecting weights), so a fresh run and a resumed one draw the same numbers.
        self._rng_at_start = rng_state()

    @staticmethod
    def model_width(cfg: Config) -> int:
        return int(cfg.model.get("att_feat_size", 2048))

    # ----------------------------------------------------------------------------------- checkpoint I/O
    def _resume(self):
        if not (self.dir / ckpt.MANIFEST).is_file() and not (self.dir / "state.json").is_file():
            raise ckpt.CheckpointError(
                f"cannot resume: {self.dir} holds no checkpoint ({ckpt.MANIFEST} does not exist: nothing was saved "
                "yet); start the run without --resume")
        state = ckpt.with_checkpoint(self.dir, self._restore)
        self._saved_iteration = state["iteration"]
        self.optimizer.set_lr(state["lr"])
        rng = rank_rng_state(state.get("rng"), self.dist.rank)
        if rng is not None:
            set_rng_state(rng)
        else:  # more ranks than the run that saved this state
            seed_all(derived_seed(self.cfg.train.seed, self.dist.rank, state["iteration"]))
        self.amp.set_state_dict(state.get("amp_scaler"))
        self.state = state
        if self.dist.main:
            self._cut_metrics(state)

    def _restore(self, ck: ckpt.Checkpoint) -> dict:
        """Weights, optimizer and training state of the checkpoint in self.dir (every file verified)."""
        state = ck.state()
        where = ck.path("state") if ck.has("state") else self.dir
        if state is None:
            raise ckpt.CheckpointError(
                f"cannot resume: {self.dir} holds a model but no training state (a converted checkpoint?); start a "
                "new run from it with --start-from")
        if state.get("format") != STATE_FORMAT or state.get("stage") != self.stage:
            raise ckpt.CheckpointError(
                f"{where}: not a {self.stage} training state (stage {state.get('stage')!r}, format "
                f"{state.get('format')!r})")
        missing = [k for k in ("iteration", "epoch", "lr", "history", "loader") if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"{where}: field(s) {', '.join(missing)} missing from the training state")
        weights, source = ck.weights("last")
        ckpt.load_state_dict_checked(self.model, weights, source)
        optimizer = ck.optimizer_state()
        if optimizer is None:
            raise ckpt.CheckpointError(f"cannot resume: {self.dir} has no optimizer state")
        ckpt.load_portable_optimizer_state(self.model, self.optimizer, optimizer)
        if ck.legacy and ck.has("weights_best"):  # carried into the first save of the current format
            self._carry["weights_best"] = ckpt.tensors_to_bytes(ck.weights("best")[0])
        return state

    def _cut_metrics(self, state: dict) -> None:
        """Drop the events logged after the resumed save (they happen again), and a line cut by a kill."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return
        size = state.get("metrics_bytes")
        if isinstance(size, int):
            if path.stat().st_size > size:
                os.truncate(path, size)
            return
        # an earlier version's state: keep the events up to the resumed iteration
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("stage") != self.stage or event.get("iteration", 0) <= state["iteration"]:
                kept.append(line + "\n")
        ckpt.atomic_write_text(path, "".join(kept))

    def _start_from(self, directory):
        """SCST starts from the LAST XE checkpoint with its optimizer state (Adam moments), lr reset
        (docs/model.md, "Training")."""
        ckpt.with_checkpoint(Path(directory), self._load_start)
        self.optimizer.set_lr(self.cfg.train.learning_rate)

    def _load_start(self, ck: ckpt.Checkpoint) -> None:
        meta = ck.model_meta()
        if meta["vocab_size"] != self.data.vocab_size:
            raise ckpt.CheckpointError(
                f"{ck.directory}: vocabulary of {meta['vocab_size']} words, but the data has {self.data.vocab_size}")
        weights, source = ck.weights("last")
        ckpt.load_state_dict_checked(self.model, weights, source)
        optimizer = ck.optimizer_state()
        if optimizer is not None:
            ckpt.load_portable_optimizer_state(self.model, self.optimizer, optimizer)

    def save(self, best: bool):
        # every rank's RNG state (a collective: all ranks call save); rank 0 writes
        self.state["rng"] = {str(r): s for r, s in enumerate(self.dist.gather(rng_state()))}
        self.state["lr"] = float(self.optimizer.get_lr())
        self.state["world_size"] = self.dist.world_size
        self.state["amp_scaler"] = self.amp.state_dict()
        if self.dist.main:
            metrics = self.dir / "metrics.jsonl"
            self.state["metrics_bytes"] = metrics.stat().st_size if metrics.is_file() else 0
            self._write_checkpoint(best)
        self.dist.barrier()

    def _write_checkpoint(self, best: bool):
        """One save, as a set (aoanet.train.checkpoint): until its manifest replaces the previous one, the previous
        save is the checkpoint."""
        files = {
            "model": ckpt.model_json_bytes(self.model, self.data.vocab, extractor=self.extractor),
            "config": dump_config(self.cfg).encode("utf-8"),
            "weights_last": ckpt.weights_bytes(self.model),
            "optimizer": ckpt.optimizer_bytes(ckpt.portable_optimizer_state(self.model, self.optimizer)),
            "state": json.dumps(self.state).encode("utf-8"),
        }
        if not best:
            files.update(self._carry)
        info = {k: self.state[k] for k in ("stage", "iteration", "epoch", "finished")}
        self.saver.save(files, same={"weights_best": "weights_last"} if best else {}, keep=("weights_best",),
                         info=info)
        self._carry = {}
        self._saved_iteration = self.state["iteration"]

    # ----------------------------------------------------------------------------------- logging
    def _visualdl(self):
        if not self.dist.main:
            return None
        try:
            from visualdl import LogWriter
        except ImportError:
            return None
        return LogWriter(logdir=str(self.dir / "visualdl"))

    def log(self, event: dict):
        if not self.dist.main:
            return
        event = {"stage": self.stage, "time": time.time(), **event}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.writer is not None:
            for k, v in event.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "epoch", "time"):
                    self.writer.add_scalar(tag=f"{event['event']}/{k}", step=event["iteration"], value=v)

    # ----------------------------------------------------------------------------------- schedules
    def epoch_schedule(self, epoch: int) -> tuple[float, float]:
        """(learning rate, scheduled-sampling probability) at the start of an epoch (docs/model.md, "Training")."""
        t = self.cfg.train
        if self.stage == "scst":
            return self.state["lr"], 0.0
        lr = t.learning_rate
        if t.learning_rate_decay_start >= 0 and epoch > t.learning_rate_decay_start:
            frac = (epoch - t.learning_rate_decay_start) // t.learning_rate_decay_every
            lr = t.learning_rate * t.learning_rate_decay_rate**frac
        ss = 0.0
        if t.scheduled_sampling_start >= 0 and epoch > t.scheduled_sampling_start:
            frac = (epoch - t.scheduled_sampling_start) // t.scheduled_sampling_increase_every
            ss = min(t.scheduled_sampling_increase_prob * frac, t.scheduled_sampling_max_prob)
        return lr, ss

    # ----------------------------------------------------------------------------------- steps
    def _tensors(self, batch):
        return (paddle.to_tensor(np.asarray(batch["att_feats"])), paddle.to_tensor(np.asarray(batch["att_masks"])))

    def xe_step(self, batch, ss_prob: float) -> dict:
        feats, masks = self._tensors(batch)
        labels = paddle.to_tensor(np.asarray(batch["labels"], dtype="int64"))
        label_masks = paddle.to_tensor(np.asarray(batch["masks"], dtype="float32"))
        logprobs = self.model(feats, masks, labels, seq_per_img=self.cfg.data.seq_per_img, ss_prob=ss_prob)
        loss = language_model_loss(logprobs, labels[:, 1:], label_masks[:, 1:], self.cfg.train.label_smoothing)
        return {"loss": loss, "tokens": float(np.asarray(batch["masks"])[:, 1:].sum())}

    def scst_step(self, batch, _ss_prob: float) -> dict:
        from aoanet.train.scst import self_critical_rewards

        s = self.cfg.scst
        feats, masks = self._tensors(batch)
        greedy = None
        if s.baseline == "greedy":
            self.model.eval()
            with self.amp.float32():
                greedy = self.model.decode(feats, masks, beam_size=1, max_length=s.max_length).seqs
            self.model.train()
        seqs, logps = self.model.sample(feats, masks, sample_n=s.train_sample_n, max_length=s.max_length,
                                        temperature=s.temperature)
        t0 = time.perf_counter()
        rewards, info = self_critical_rewards(self.scorer, seqs.numpy(), greedy, batch["gts"], s.train_sample_n,
                                              s.baseline, s.cider_weight)
        info["reward_seconds"] = time.perf_counter() - t0
        loss = reward_loss(logps, seqs, rewards)
        return {"loss": loss, "tokens": float(reward_mask(seqs).sum()), **info}

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> dict:
        from aoanet.evaluation import evaluate_predictions, load_references, predict

        v = self.cfg.val
        preds = predict(self.model, self.data, "val", beam_size=v.beam_size, max_length=v.max_length,
                        batch_size=v.batch_size, num_images=v.val_images_use, progress=self.progress)
        scores = {}
        if v.language_eval:
            if self.references is None:
                self.references = load_references(self.cfg.data.references_json)
            scores = evaluate_predictions(preds, self.references, spice=False)
        return {"n_images": len(preds), **scores}

    def _validate_and_save(self):
        # rank 0 validates; the others wait here for its scores, then all take the same decisions
        scores = self.dist.broadcast(self.validate() if self.dist.main else None)
        it = self.state["iteration"]
        self.log({"event": "val", "iteration": it, "epoch": self.state["epoch"], **scores})
        score = scores.get("CIDEr")
        best = self.state["best_score"] is None or (score is not None and score > self.state["best_score"])
        if best and score is not None:
            self.state["best_score"] = score
        self.state["history"].append({"iteration": it, "epoch": self.state["epoch"], **scores})
        if self.stage == "scst" and self.cfg.scst.reduce_on_plateau and score is not None:
            self._plateau_step(score)
        self.save(best=best)
        return scores

    def _plateau_step(self, score: float):
        """ReduceLROnPlateau(mode=min, factor, patience, threshold=1e-4 rel) on -CIDEr, as in the reference."""
        p = self.state["plateau"]
        if p["best"] is None or -score < -p["best"] * (1 - 1e-4):
            p["best"], p["bad_epochs"] = score, 0
        else:
            p["bad_epochs"] += 1
        if p["bad_epochs"] > self.cfg.scst.reduce_on_plateau_patience:
            new_lr = float(self.optimizer.get_lr()) * self.cfg.scst.reduce_on_plateau_factor
            self.optimizer.set_lr(new_lr)
            self.state["lr"] = new_lr
            p["bad_epochs"] = 0

    # ----------------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train until max_epochs (or max_iters); however it ends, the loader's workers stop and the lock is
        released."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        from aoanet.data.loader import build_loader

        if self.stage == "scst" and self.scorer is None:
            from aoanet.metrics.cider import CiderD

            self.scorer = CiderD.from_file(self.cfg.data.cached_tokens)
        set_rng_state(self._rng_at_start)
        t, d = self.cfg.train, self.cfg.data
        step_fn = self.xe_step if self.stage == "xe" else self.scst_step
        loader = self._loader = build_loader(
            self.data, split="train", batch_size=t.batch_size, shuffle=True, seed=t.seed, num_workers=d.num_workers,
            epoch=self.state["epoch"], rank=self.dist.rank, world_size=self.dist.world_size)
        per_epoch = len(loader)
        total = t.max_epochs * per_epoch if t.max_iters < 0 else min(t.max_iters, t.max_epochs * per_epoch)
        bar = tqdm(total=total, initial=min(self.state["iteration"], total), desc=f"{self.stage}", unit="it",
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        running = None
        try:
            while self.state["epoch"] < t.max_epochs and not self._done():
                epoch = self.state["epoch"]
                lr, ss_prob = self.epoch_schedule(epoch)
                self.optimizer.set_lr(lr)
                if self.state["loader"] is not None:
                    loader.set_state_dict(self._loader_state())
                else:
                    loader.set_epoch(epoch)
                for batch in loader:
                    self.state["iteration"] += 1
                    it = self.state["iteration"]
                    with self.amp.autocast():
                        out = step_fn(batch, ss_prob)
                    # loss to back-propagate, and the token mean over all ranks' batches
                    loss, value = self.dist.global_token_mean(out["loss"], out["tokens"])
                    if not math.isfinite(value):
                        kept = (f"the last checkpoint in {self.dir} (iteration {self._saved_iteration}) is kept"
                                if self._saved_iteration is not None else
                                f"no checkpoint had been saved yet in {self.dir}")
                        raise TrainingDiverged(
                            f"{self.stage}: the loss became {value} at iteration {it} (epoch {epoch}); training "
                            f"stopped; {kept}")
                    self.amp.backward(loss)
                    self.dist.all_reduce_gradients(self.model.parameters())
                    self.amp.step(self.optimizer)
                    self.optimizer.clear_grad()
                    self.state["loader"] = loader.state_dict()
                    running = value if running is None else 0.9 * running + 0.1 * value
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.3f}", epoch=epoch, lr=f"{lr:.2e}")
                    if it % t.losses_log_every == 0 or it == 1:
                        extra = self.dist.mean({k: float(v) for k, v in out.items() if k not in ("loss", "tokens")})
                        self.log({"event": "train", "iteration": it, "epoch": epoch, "loss": value, "lr": lr,
                                  "ss_prob": ss_prob, **extra})
                    if t.save_checkpoint_every > 0 and it % t.save_checkpoint_every == 0:
                        self._validate_and_save()
                    if self._done():
                        break
                else:
                    self.state["epoch"] += 1
                    self.state["loader"] = None
                    if t.save_checkpoint_every <= 0:
                        self._validate_and_save()
                    continue
                break
            last_val = self.state["history"][-1]["iteration"] if self.state["history"] else None
            self.state["finished"] = True
            if last_val != self.state["iteration"]:
                self._validate_and_save()  # its save records the finished state
            else:
                self.save(best=False)
            if self.dist.main:
                self.plot_curves()
        finally:
            bar.close()
        return self.state

    def close(self) -> None:
        """Stop the loader's workers and release the directory's lock (run() does it when it ends, however)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self.lock.release()

    def _loader_state(self) -> dict:
        """The saved loader position, re-sharded when the world size or batch size changed since it was saved."""
        saved, t = self.state["loader"], self.cfg.train
        if (saved["batch_size"], saved["world_size"]) == (t.batch_size, self.dist.world_size):
            return saved
        state, repeated = reshard_loader_state(saved, t.batch_size, self.dist.world_size)
        if self.dist.main:
            warn_reshard(saved, t.batch_size, self.dist.world_size, repeated)
        return state

    def _done(self) -> bool:
        return 0 < self.cfg.train.max_iters <= self.state["iteration"]

    def plot_curves(self):
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [e for e in events if e["event"] == "train" and e["stage"] == self.stage]
        val = [e for e in events if e["event"] == "val" and e["stage"] == self.stage]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([e["iteration"] for e in train], [e["loss"] for e in train], label="loss")
        axes[0].set_title(f"{self.stage} training")
        axes[0].set_xlabel("iteration")
        # SCST's loss is a reward-weighted log-prob that hovers near 0; the samples' CIDEr-D shows the progress
        for key in ("sample_cider", "baseline_cider"):
            pts = [(e["iteration"], e[key]) for e in train if key in e]
            if pts:
                axes[0].plot(*zip(*pts), label=key)
        axes[0].legend()
        for key in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
            pts = [(e["iteration"], e[key]) for e in val if key in e]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=key)
        axes[1].set_title("validation")
        axes[1].set_xlabel("iteration")
        if axes[1].get_legend_handles_labels()[0]:  # validation may have produced no metric yet
            axes[1].legend()
        fig.tight_layout()
        tmp = self.dir / ".curves.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.dir / "curves.png")
