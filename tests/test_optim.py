"""The trainer's optimizer: in-place clipping by value takes the same steps as Paddle's ClipGradByValue."""

from __future__ import annotations

import numpy as np
import paddle

from aoanet.config import TrainConfig
from aoanet.train.optim import ClipGradByValueInPlace, build_optimizer


def test_in_place_value_clipping_takes_the_same_steps():
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(5, 7)).astype("float32"), rng.normal(size=(7,)).astype("float32")]
    grads = [[rng.normal(0, 0.3, size=p.shape).astype("float32") for p in start] for _ in range(3)]

    def run(clip):
        params = [paddle.create_parameter(list(p.shape), "float32") for p in start]
        for p, v in zip(params, start):
            p.set_value(v)
        opt = paddle.optimizer.Adam(learning_rate=0.05, parameters=params, grad_clip=clip)
        seen = []
        for step in grads:
            loss = sum((p * paddle.to_tensor(g)).sum() for p, g in zip(params, step))
            loss.backward()
            opt.step()
            seen.append([p.grad.numpy().copy() for p in params])
            opt.clear_grad()
        return [p.numpy() for p in params], seen

    ours, clipped = run(ClipGradByValueInPlace(0.1))
    ref, _ = run(paddle.nn.ClipGradByValue(0.1))
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)
    # the gradients themselves were clipped (in place), and some needed it
    assert all(np.abs(g).max() <= 0.1 for step in clipped for g in step)
    assert max(np.abs(g).max() for step in grads for g in step) > 0.1


def test_build_optimizer_follows_the_config():
    params = [paddle.create_parameter([3], "float32")]
    t = TrainConfig(learning_rate=3e-4, grad_clip=0.5)
    opt = build_optimizer(t, params)
    assert isinstance(opt._grad_clip, ClipGradByValueInPlace) and opt._grad_clip.max == 0.5
    assert abs(opt.get_lr() - 3e-4) < 1e-12
    norm = build_optimizer(TrainConfig(grad_clip_mode="norm", grad_clip=2.0), params)
    assert isinstance(norm._grad_clip, paddle.nn.ClipGradByGlobalNorm)
