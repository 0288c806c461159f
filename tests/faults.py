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
