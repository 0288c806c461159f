"""The training/evaluation data loader: per-image items, numpy batches, exact resume.

Usage (the trainer's contract)::

    data = CaptionData(input_json, input_label_h5, input_att_dir, att_feat_size=2048, seq_per_img=5)
    loader = build_loader(data, split="train", batch_size=10, shuffle=True, seed=123, num_workers=2)
    for batch in loader: ...

Batches are dicts of **numpy arrays** (the trainer converts to paddle tensors): ``att_feats`` float32 [b, N,
F] zero-padded to the largest region count of the batch, ``att_masks`` float32 [b, N] (always present),
``labels`` int64 [b*seq_per_img, seq_length+2] image-major with BOS in column 0, ``masks`` float32 (BOS +
words + one EOS), ``gts`` (all label rows of each image, int64), ``image_ids`` and ``ix``. Features are not
repeated per caption.

Iteration semantics: ``for batch in loader`` yields the remaining batches of the current epoch, then moves the
loader to the start of the next epoch. ``set_epoch(e)`` moves to the start of epoch ``e`` unless the loader is
already in epoch ``e``, so a position restored with ``set_state_dict`` survives the usual ``for epoch in ...:
loader.set_epoch(epoch); for batch in loader: ...`` loop. ``rewind()`` restarts the current epoch (e.g. after
breaking out of an evaluation pass early). The state after each yielded batch is exact: a loader restored from
``state_dict()`` yields the same remaining batches, with the same caption windows, as the original.

Workers: with ``num_workers > 0`` whole batches are read and collated in a process pool (fork where available,
as paddle.io.DataLoader does); features are read lazily there. A bad feature file raises a DataError naming
the file and image id in the trainer's process; a worker that dies or stalls raises a DataError instead of
hanging. Workers end with the trainer however it ends (``aoanet.procs.die_with_parent``; ``close()`` stops them at
once) and ignore Ctrl-C, which the trainer handles.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from pathlib import Path

import paddle

from aoanet.data.collate import collate
from aoanet.data.errors import DataError
from aoanet.data.features import att_path, read_att
from aoanet.data.karpathy import in_split
from aoanet.data.labels import load_labels
from aoanet.data.sampler import CaptionBatchSampler


class CaptionData(paddle.io.Dataset):
    """Images of a prepared dataset: item ``ix`` is ``{"ix", "image_id", "att_feats" (K, F) float32,
    "labels" (n_i, seq_length) uint32}`` with ALL label rows of the image.

    The json/h5 agreement is checked here, eagerly; each feature file is read and checked when its item is
    loaded.
    """

    def __init__(
        self,
        input_json,
        input_label_h5,
        input_att_dir,
        att_feat_size: int = 2048,
        seq_per_img: int = 5,
        train_only: bool = False,
    ):
        super().__init__()
        if seq_per_img < 1:
            raise ValueError(f"seq_per_img must be >= 1, got {seq_per_img}")
        self.labelset = load_labels(input_json, input_label_h5)
        self.att_dir = Path(input_att_dir)
        if not self.att_dir.is_dir():
            raise DataError(f"{self.att_dir}: feature directory (input_att_dir) not found")
        self.att_feat_size, self.seq_per_img, self.train_only = att_feat_size, seq_per_img, train_only
        self.vocab: dict[str, str] = self.labelset.vocab
        self.vocab_size = len(self.vocab)
        self.seq_length = int(self.labelset.labels.shape[1])
        self.image_ids = [int(img["id"]) for img in self.labelset.images]

    def split_ix(self, split: str) -> list[int]:
        """Image indices of a split in file order; "train" includes restval unless ``train_only``."""
        if split not in ("train", "val", "test", "restval", "all"):
            raise ValueError(f"unknown split {split!r} (train, val, test, restval, all)")
        if split == "train" and self.train_only:
            return [i for i, img in enumerate(self.labelset.images) if img["split"] == "train"]
        return [i for i, img in enumerate(self.labelset.images) if in_split(img["split"], split)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, ix: int) -> dict:
        image_id = self.image_ids[ix]
        return {
            "ix": ix,
            "image_id": image_id,
            "att_feats": read_att(att_path(self.att_dir, image_id), image_id, self.att_feat_size),
            "labels": self.labelset.rows(ix),
        }

    def batch(self, ixs: list[int], seed: int, epoch: int) -> dict:
        return collate([self[ix] for ix in ixs], self.seq_per_img, seed, epoch)


# The dataset of a worker process, set once by the pool initializer (inherited, not pickled, under fork).
_WORKER_DATA: CaptionData | None = None
# How long close() lets a worker finish the batch it is reading before killing it.
WORKER_GRACE_S = 5.0


def _init_worker(data: CaptionData, parent_pid: int) -> None:
    from aoanet.procs import die_with_parent

    die_with_parent(parent_pid)  # SIGKILL when the trainer exits, even when it is killed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle (it then stops the workers)
    global _WORKER_DATA
    _WORKER_DATA = data


def _worker_batch(ixs: list[int], seed: int, epoch: int) -> dict:
    try:
        return _WORKER_DATA.batch(ixs, seed, epoch)
    except DataError:
        raise
    except Exception as e:  # anything else still names the images, and pickles back as a plain DataError
        ids = [_WORKER_DATA.image_ids[i] for i in ixs]
        raise DataError(f"loading the batch of image ids {ids}: {type(e).__name__}: {e}") from None


class CaptionLoader:
    """Iterates the batches of one split; see the module docstring for the epoch and resume semantics."""

    def __init__(
        self,
        data: CaptionData,
        sampler: CaptionBatchSampler,
        split: str,
        num_workers: int = 0,
        prefetch: int = 2,
        timeout: float = 300.0,
    ):
        self.data, self.sampler, self.split = data, sampler, split
        self.num_workers, self.prefetch, self.timeout = num_workers, max(1, prefetch), timeout
        self.position = 0  # index (within this rank's epoch) of the next batch to yield
        self._pool: cf.ProcessPoolExecutor | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler.batches())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.set_epoch(epoch)
            self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "split": self.split,
            "epoch": s.epoch,
            "position": self.position,
            "seed": s.seed,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "shuffle": s.shuffle,
            "num_images": len(s.indices),
        }

    def set_state_dict(self, state: dict) -> None:
        s = self.sampler
        expected = {
            "split": self.split,
            "batch_size": s.batch_size,
            "world_size": s.world_size,
            "shuffle": s.shuffle,
            "num_images": len(s.indices),
        }
        bad = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if bad:
            raise ValueError(
                "loader state does not match this loader (saved vs now): "
                + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in bad.items())
            )
        s.set_seed(int(state["seed"]))
        s.set_epoch(int(state["epoch"]))
        self.position = int(state["position"])

    # ------------------------------------------------------------------ iteration
    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = cf.ProcessPoolExecutor(
                self.num_workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(self.data, os.getpid()),
            )
        return self._pool

    def _result(self, future: cf.Future, ixs: list[int]) -> dict:
        try:
            return future.result(timeout=self.timeout)
        except cf.TimeoutError:
            raise DataError(
                f"a loader worker gave no batch within {self.timeout:.0f} s (image ids "
                f"{[self.data.image_ids[i] for i in ixs]})"
            ) from None
        except cf.BrokenExecutor as e:
            self.close()
            raise DataError(
                f"a loader worker process died while loading image ids "
                f"{[self.data.image_ids[i] for i in ixs]} (killed, or out of memory?): {e}"
            ) from None

    def __iter__(self):
        batches, epoch, seed = self.sampler.batches(), self.sampler.epoch, self.sampler.seed
        todo = range(self.position, len(batches))
        if self.num_workers <= 0:
            for k in todo:
                batch = self.data.batch(batches[k], seed, epoch)
                self.position = k + 1
                yield batch
        else:
            pool, pending = self._get_pool(), deque()
            ahead = iter(todo)
            try:
                for k in ahead:  # fill the pipeline
                    pending.append((k, pool.submit(_worker_batch, batches[k], seed, epoch)))
                    if len(pending) >= self.num_workers * self.prefetch:
                        break
                while pending:
                    k, future = pending.popleft()
                    batch = self._result(future, batches[k])
                    nxt = next(ahead, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(_worker_batch, batches[nxt], seed, epoch)))
                    self.position = k + 1
                    yield batch
            finally:
                for _, future in pending:  # loop left early: drop the prefetched batches
                    future.cancel()
        self.sampler.set_epoch(epoch + 1)
        self.position = 0

    def close(self) -> None:
        """Stop the workers: each ends after the batch it is reading; one still busy after ``WORKER_GRACE_S`` (a
        read that hangs) is killed."""
        if self._pool is not None:
            workers = list((getattr(self._pool, "_processes", None) or {}).values())
            # Not killed at once: a worker killed while it sends a batch back leaves the pool's result thread
            # waiting for the rest of the message, and the interpreter waits for that thread at exit (a run
            # stopped by SIGTERM then never ended). Workers ignore Ctrl-C, so they are between or inside reads.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            deadline = time.monotonic() + WORKER_GRACE_S
            for worker in workers:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_loader(
    data: CaptionData,
    split: str = "train",
    batch_size: int = 10,
    shuffle: bool | None = None,
    seed: int = 123,
    num_workers: int = 2,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    prefetch: int = 2,
    timeout: float = 300.0,
) -> CaptionLoader:
    """A loader over ``split``; ``shuffle`` defaults to True for "train" only. Training batches are topped up
    so every rank gets the same number of non-empty batches (see :mod:`aoanet.data.sampler`)."""
    if shuffle is None:
        shuffle = split == "train"
    indices = data.split_ix(split)
    if not indices:
        raise DataError(f"split {split!r} has no images")
    sampler = CaptionBatchSampler(
        indices,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        top_up=split == "train",
    )
    return CaptionLoader(data, sampler, split, num_workers=num_workers, prefetch=prefetch, timeout=timeout)


__all__ = ["CaptionData", "CaptionLoader", "build_loader"]
