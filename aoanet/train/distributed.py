"""Data-parallel training with ``paddle.distributed``: several GPUs, several machines, or CPU processes (gloo).

Starting it. ``aoanet-train xe|scst`` runs unchanged under Paddle's launcher, one process per device::

    python -m paddle.distributed.launch --devices 0,1,2,3 $(which aoanet-train) xe -c configs/aoa.yml
    aoanet-train xe -c configs/aoa.yml --nproc 4            # the same, launched for you (launch_command)

On several machines run the launcher on each one with the same ``--ips ip1,ip2`` (or ``--master ip:port
--nnodes N``). Without GPUs the launcher selects the gloo backend itself (``PADDLE_DISTRI_BACKEND=gloo``) and
the ranks share the machine's cores (``train.num_threads: 0`` = cores / local ranks). A process that was not
started by the launcher (``PADDLE_TRAINERS_NUM`` unset or 1) is the ordinary single-process trainer.

What each rank does (rank r of W, per-rank batch b = ``train.batch_size``):

- Data: ``build_loader(rank=r, world_size=W)``. Global step g takes images ``[g*b*W, (g+1)*b*W)`` of the
  epoch's permutation (the same permutation whatever W) and rank r gets the r-th of W near-equal parts
  (``aoanet.data.sampler``): every training image is seen once per epoch across the ranks, and the images of a
  global step are exactly those of a one-process step with batch b*W. The epoch's last step is smaller.
- Gradients. The model is wrapped in ``paddle.DataParallel``, which broadcasts rank 0's parameters when it is
  built, but its automatic gradient sync is switched off (``grad_need_sync = False``, the wrapper's ``no_sync``
  state): DataParallel only synchronises gradients of tensors produced by its ``forward``, while the trainer
  also trains through other methods (the SCST loss comes from ``model.sample``). Instead, after every
  ``backward``, :meth:`Ranks.all_reduce_gradients` averages all gradients with Paddle's
  ``fused_allreduce_gradients`` (gradients / W, summed over the ranks in fused buckets) - the pattern Paddle
  documents for layers that cannot go through the reducer. It is correct whatever produced the loss; the cost is
  that communication no longer overlaps the backward pass: at full size one all-reduce of ~340 MB of float32
  gradients runs after each backward (not measured here: this was developed without GPUs).
- Loss normalisation. Both losses are token means (sum over tokens / number of tokens). Averaging per-rank means
  is not the global mean when ranks have different token counts, so one scalar all-reduce before ``backward``
  gives every rank the global token count T and each rank back-propagates ``loss_r * W * T_r / T``: after the
  average the gradient is exactly that of the token mean over the global batch, as one process with batch b*W
  would compute (up to float summation order), and the logged loss is that global mean.
- Randomness. The model is initialised from ``train.seed`` on every rank (and DataParallel broadcasts rank 0's
  weights anyway); then each rank reseeds Paddle, numpy and Python with ``seed + rank``, so dropout, scheduled
  sampling and SCST's samples differ across ranks.
- SCST: each rank samples, decodes its greedy baseline and computes CIDEr-D rewards for its own images (the
  document frequencies are the fixed training-split ones, so a reward does not depend on the sharding); the
  logged reward statistics are averaged over the ranks.
- Rank 0 alone writes checkpoints, ``metrics.jsonl``, VisualDL scalars and ``curves.png``, shows the progress
  bar, and validates (simplest: no sharded decoding, no gathering of captions). The other ranks wait for rank 0's
  scores (a broadcast), so every rank takes the same best-model and learning-rate (plateau) decisions. A long
  validation must finish within the process group's timeout (``PADDLE_PG_TIMEOUT``, default 30 min).
- Every rank reads the checkpoint directory when resuming or starting SCST, and the dataset: on several machines
  they must be on a shared filesystem (or copied to each machine).

Resume after a distributed run. ``state.json`` keeps the loader position as global steps consumed in the current
epoch together with the batch size and world size that produced it, and each rank's RNG state under its rank
(``"rng": {"0": …, "1": …}``). Resuming with the same world size and batch size is exact, as for one process.
With another world size (or batch size) the position is re-sharded: images consumed = steps * b * W, new
position = images // (b' * W'); when that division is not exact the images of the partial step are seen again
(a warning says how many). A rank without a saved RNG state derives one from (seed, rank, iteration). The run
then continues correctly but is not bit-identical to an uninterrupted one: dropout and sampling draw other
numbers, and float sums run in another order. With dropout, scheduled sampling and SCST off and the same global
batch b*W, the continuation matches to float rounding (``tests/test_distributed.py``).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import paddle


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 when not started by ``paddle.distributed.launch``)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)


class Ranks:
    """This process's place in the data-parallel group, and the few collectives the trainer needs.

    With one process every method is a cheap no-op, so the trainer has one code path.
    """

    def __init__(self):
        self.rank, self.world_size, self.wrapper = 0, 1, None
        if launched_world_size() > 1:
            import paddle.distributed as dist

            if not dist.is_initialized():
                dist.init_parallel_env()
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def threads_per_rank() -> int:
        """CPU threads for ``train.num_threads: 0``: the machine's cores shared by the ranks running on it."""
        local = int(os.environ.get("PADDLE_LOCAL_SIZE", "1") or 1)
        return max(1, (os.cpu_count() or 1) // max(1, local))

    def wrap(self, model: paddle.nn.Layer) -> None:
        """Wrap in DataParallel (broadcasting rank 0's parameters) with its automatic sync off; the trainer keeps
        calling the unwrapped model and :meth:`all_reduce_gradients` after backward."""
        if not self.active:
            return
        self.wrapper = paddle.DataParallel(model)
        self.wrapper.grad_need_sync = False  # a forward through the wrapper must not sync a second time

    def all_reduce_gradients(self, parameters) -> None:
        """Average the gradients over the ranks (fused buckets; every rank must hold gradients for the same
        parameters, which AoANet's XE and SCST losses do: every parameter takes part in both)."""
        if not self.active:
            return
        from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

        fused_allreduce_gradients(list(parameters), None)

    def global_token_mean(self, loss, tokens: float):
        """``loss`` = this rank's token mean over ``tokens`` tokens -> (the loss to back-propagate so that the
        averaged gradient is that of the global token mean, the global token mean as a float)."""
        if not self.active:
            return loss, float(loss)
        import paddle.distributed as dist

        totals = paddle.to_tensor([float(loss) * tokens, float(tokens)], dtype="float64")
        dist.all_reduce(totals)
        total, count = (float(x) for x in totals.numpy())
        if count <= 0:
            return loss * 0.0, total  # no tokens anywhere (cannot happen with real captions)
        return loss * (self.world_size * tokens / count), total / count

    def mean(self, values: dict) -> dict:
        """Average a dict of floats (the same keys on every rank) over the ranks."""
        if not self.active or not values:
            return values
        import paddle.distributed as dist

        keys = sorted(values)
        t = paddle.to_tensor([float(values[k]) for k in keys], dtype="float64")
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.numpy())}

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        import paddle.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import paddle.distributed as dist

        out: list = []
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import paddle.distributed as dist

            dist.barrier()


# ----------------------------------------------------------------------------------------- resume
def rank_rng_state(saved, rank: int) -> dict | None:
    """This rank's RNG state from ``state.json``'s ``"rng"``: ``{"0": state, "1": state, …}``, or one state
    (states written by one process before ranks existed, taken as rank 0's). None when the rank has none."""
    if not saved:
        return None
    if "paddle" in saved:  # a single state
        return saved if rank == 0 else None
    return saved.get(str(rank))


def derived_seed(seed: int, rank: int, iteration: int) -> int:
    """A seed for a rank that has no saved RNG state (resuming with more ranks than were saved)."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1)[0])


def reshard_loader_state(saved: dict, batch_size: int, world_size: int) -> tuple[dict, int]:
    """Convert a loader ``state_dict()`` saved with another batch size or world size -> (state for this loader,
    number of images that will be seen a second time this epoch because the position fell inside a step).

    The position counts global steps; what is preserved is the number of images of the epoch's (world-size
    independent) order that were consumed.
    """
    old_step = int(saved["batch_size"]) * int(saved["world_size"])
    new_step = batch_size * world_size
    n = int(saved["num_images"])
    state = dict(saved, batch_size=batch_size, world_size=world_size)
    if old_step == new_step:
        return state, 0
    position = int(saved["position"])
    if position >= math.ceil(n / old_step):  # the epoch was finished
        state["position"] = math.ceil(n / new_step)
        return state, 0
    consumed = position * old_step
    state["position"] = consumed // new_step
    return state, consumed - state["position"] * new_step


def warn_reshard(saved: dict, batch_size: int, world_size: int, repeated: int) -> None:
    msg = (f"resuming with {world_size} rank(s) x batch {batch_size} where the checkpoint was written with "
           f"{saved['world_size']} x {saved['batch_size']}: the loader position was re-sharded; the run is no longer "
           f"bit-identical to an uninterrupted one (RNG streams and summation order change)")
    if repeated:
        msg += f"; {repeated} image(s) of the interrupted step will be seen again this epoch"
    warnings.warn(msg, stacklevel=2)


# ----------------------------------------------------------------------------------------- the --nproc shortcut
def trainer_script() -> str:
    """The ``aoanet-train`` console script of this environment (what the launcher starts on every rank)."""
    beside = Path(sys.executable).with_name("aoanet-train")
    if beside.is_file():
        return str(beside)
    found = shutil.which("aoanet-train")
    if found:
        return found
    raise FileNotFoundError("the aoanet-train command is not installed in this environment (pip install -e .); "
                            "--nproc starts it on every rank")


def launch_command(nproc: int, args: list[str], log_dir: str, devices: str | None = None) -> list[str]:
    """``python -m paddle.distributed.launch --nproc_per_node K [--devices …] --log_dir … aoanet-train ARGS``.

    On a CPU-only machine the launcher selects the gloo backend; with GPUs it takes the first K visible devices
    unless ``devices`` lists them. Rank r's output goes to ``log_dir/workerlog.r``; rank 0's is also echoed.
    """
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--log_dir", log_dir]
    if devices:
        cmd += ["--devices", devices]
    return cmd + [trainer_script(), *args]
