"""Faults injected from outside the code under test (imported by the tests and by the distributed test's workers)."""

from __future__ import annotations


def crash_at(trainer, iteration: int):
    """Make ``trainer.run()`` stop as a kill would when it reaches ``iteration``: the step's work is not done and
    nothing after the last checkpoint is saved. Wraps the trainer's step functions; returns the trainer."""
    for name in ("xe_step", "scst_step"):
        real = getattr(trainer, name)

        def step(batch, ss_prob, real=real):
            if trainer.state["iteration"] == iteration:
                raise KeyboardInterrupt(f"simulated kill at iteration {iteration}")
            return real(batch, ss_prob)

        setattr(trainer, name, step)
    return trainer


# ----------------------------------------------------------------------------------------------- kills during a save
KILL_POINTS = ("before", "first_file", "between_files", "mid_file", "renamed", "manifest")


def kill_during_save(save_number: int, point: str) -> None:
    """SIGKILL this process at ``point`` of its ``save_number``-th checkpoint save (1-based):

    before         when the save starts, nothing of it written;
    first_file     after the first file of the save is written and flushed (in the temporary directory);
    between_files  after the third file;
    mid_file       half-way through writing the weights file;
    renamed        after the save directory is renamed into place, before the manifest;
    manifest       after checkpoint.json is replaced, before the previous save's files are deleted.

    Patches ``aoanet.train.checkpoint`` from outside; for a throwaway process (the tests start one per point)."""
    import builtins
    import os
    import signal

    from aoanet.train import checkpoint as ck

    if point not in KILL_POINTS:
        raise ValueError(f"unknown kill point {point!r}")
    real_save, real_write = ck.CheckpointWriter.save, ck.atomic_write_bytes
    real_fsync, real_rename = os.fsync, os.rename
    state = {"save": 0, "fsyncs": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def armed() -> bool:
        return state["save"] == save_number

    def save(self, files, *args, **kwargs):
        state["save"] += 1
        if armed() and point == "before":
            die()
        return real_save(self, files, *args, **kwargs)

    def fsync(fd):
        real_fsync(fd)
        if armed():
            state["fsyncs"] += 1
            if (point, state["fsyncs"]) in (("first_file", 1), ("between_files", 3)):
                die()

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            die()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def open_(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if armed() and point == "mid_file" and str(path).endswith("model.safetensors"):
            return HalfWriter(f)
        return f

    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if armed() and point == "renamed" and os.path.basename(str(dst)).startswith(ck.SAVE_PREFIX):
            die()

    def write(path, data):
        real_write(path, data)
        if armed() and point == "manifest" and os.path.basename(str(path)) == ck.MANIFEST:
            die()

    ck.CheckpointWriter.save = save
    os.fsync = fsync
    os.rename = rename
    ck.open = open_
    ck.atomic_write_bytes = write
