"""Mixed-precision training (``train.amp: none | bf16 | fp16``, ``aoanet-train … --amp``) with ``paddle.amp``.

- ``bf16``: ``paddle.amp.auto_cast(level="O1", dtype="bfloat16")`` around the forward pass and the loss. Paddle's
  O1 lists run matmuls in bf16 and keep reductions, softmax and the losses in float32; the weights, gradients and
  Adam moments stay float32. bf16 has float32's exponent range, so no loss scaling is needed. Needs a GPU with
  bf16 support (NVIDIA compute capability >= 8.0: A100, RTX 30xx and later).
- ``fp16``: the same autocast with float16, plus ``paddle.amp.GradScaler`` dynamic loss scaling: the loss is
  scaled before ``backward``, the gradients are unscaled before clipping and the step, and a step whose gradients
  overflowed is skipped (the scale then halves). The scaler's state is saved in ``state.json`` so that ``--resume``
  continues with the same scale.
- Validation and the SCST greedy baseline decode in float32 (their numpy beam search wants float32 log-probs).

Paddle 3.3's dynamic-graph AMP runs on GPU, XPU and custom devices only: on the CPU ``auto_cast`` and
``GradScaler`` merely warn and compute in float32, so ``bf16``/``fp16`` on the CPU are refused with an error
instead of silently training in float32. Under data parallelism the all-reduce sits between ``backward`` and
the (scaled) step; every rank has the same scale and the same averaged gradients, so all ranks skip or take a
step together.
"""

from __future__ import annotations

import contextlib

import numpy as np
import paddle

from aoanet.config import ConfigError
from aoanet.procs import signals_held

MODES = ("none", "bf16", "fp16")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def check_supported(mode: str, device: str) -> None:
    """Raise a ConfigError naming the reason when ``mode`` cannot run on ``device`` (e.g. 'cpu', 'gpu:0')."""
    if mode not in MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    kind = device.split(":")[0]
    if kind == "cpu":
        raise ConfigError(
            f"train.amp={mode}: Paddle {paddle.__version__} runs dynamic-graph mixed precision only on GPU, XPU "
            f"and custom devices; on the CPU paddle.amp.auto_cast does nothing (float32 throughout), so {mode} "
            f"training is refused here. Use train.amp=none (the default) on the CPU.")
    if kind == "gpu":
        supported = paddle.amp.is_bfloat16_supported() if mode == "bf16" else paddle.amp.is_float16_supported()
        if not supported:
            hint = " (bf16 needs compute capability >= 8.0; try fp16)" if mode == "bf16" else ""
            raise ConfigError(f"train.amp={mode}: this GPU ({device}) does not support {DTYPES[mode]}{hint}")


class Precision:
    """Autocast, loss scaling and the scaler's resumable state for one training run."""

    def __init__(self, mode: str = "none", device: str | None = None):
        check_supported(mode, device or paddle.device.get_device())
        self.mode = mode
        self.dtype = DTYPES.get(mode)
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level="O1", dtype=self.dtype)

    def float32(self):
        """Turn autocast off inside an autocast region (code that hands log-probs to numpy)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=False)

    def backward(self, loss) -> None:
        with signals_held():  # the decoder's backward is Python code called from Paddle (aoanet.model.recurrence)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # unscale, then clip and step unless the gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict:
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        if "scale" in state:
            state["scale"] = float(np.asarray(state["scale"]).reshape(-1)[0])
        return state

    def set_state_dict(self, state: dict | None) -> None:
        if self.scaler is None or not state:
            return
        state = dict(state)
        state["scale"] = np.asarray([state["scale"]], dtype=np.float32)
        self.scaler.load_state_dict(state)
