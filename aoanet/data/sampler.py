"""Which images go in which batch, epoch by epoch: deterministic, shardable, resumable.

The whole batch list of an epoch is a pure function of (indices, batch_size, shuffle, seed, epoch, rank,
world_size), so a loader can resume mid-epoch by skipping batches, and every rank computes the same global
order without talking to the others.

- Training order is a permutation drawn from ``numpy.random.default_rng([seed, epoch])``: reshuffled every
  epoch, including epoch 0 (the authors' loader ran the first epoch in file order). Evaluation splits keep
  file order.
- Sharding: each global step takes ``batch_size * world_size`` consecutive images of the epoch's order and
  rank r gets the r-th of ``world_size`` near-equal parts, so every image is seen once per epoch across the
  ranks and all ranks run the same number of steps. The last step is smaller; for training (``top_up``), if it
  has fewer images than ranks, it is topped up with the epoch's first images so that no rank gets an empty
  batch (at most world_size - 1 images are then seen twice). For evaluation nothing is duplicated and a rank
  may get one batch fewer. With world_size = 1 this is plain chunking, the last partial batch kept.
"""

from __future__ import annotations

import math

import numpy as np
import paddle


def epoch_batches(
    indices,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    top_up: bool = False,
) -> list[list[int]]:
    """The batches (lists of image indices) of one epoch for one rank."""
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
    step = batch_size * world_size
    n_steps = math.ceil(len(order) / step)
    last = len(order) - (n_steps - 1) * step
    if top_up and 0 < last < world_size:
        order = np.concatenate([order, order[: world_size - last]])
    batches = []
    for g in range(n_steps):
        part = np.array_split(order[g * step : (g + 1) * step], world_size)[rank]
        if len(part):
            batches.append(part.tolist())
    return batches


class CaptionBatchSampler(paddle.io.BatchSampler):
    """A ``paddle.io.BatchSampler`` over a list of image indices; iterating yields the batches of the current
    epoch (``set_epoch``). ``paddle.io.DataLoader(data, batch_sampler=..., collate_fn=...)`` accepts it
    (returning paddle tensors); :class:`aoanet.data.loader.CaptionLoader` uses :meth:`batches` to resume
    mid-epoch."""

    def __init__(
        self,
        indices,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        top_up: bool | None = None,
    ):
        # paddle's BatchSampler.__init__ wants a dataset or sampler; like paddle's DistributedBatchSampler,
        # this class keeps its own state instead of calling it.
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
        self.indices = list(indices)
        if not self.indices:
            raise ValueError("no images to sample from (empty split)")
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.top_up = shuffle if top_up is None else top_up
        self.drop_last, self.sampler = False, None
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_seed(self, seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed, self._cache = seed, None

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:  # len() and iteration share one computation
            self._cache = (
                epoch,
                epoch_batches(
                    self.indices,
                    self.batch_size,
                    shuffle=self.shuffle,
                    seed=self.seed,
                    epoch=epoch,
                    rank=self.rank,
                    world_size=self.world_size,
                    top_up=self.top_up,
                ),
            )
        return self._cache[1]

    def __iter__(self):
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())
