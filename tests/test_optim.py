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


def test_merged_adam_takes_the_steps_of_per_parameter_adam():
    """build_optimizer's Adam updates all parameters with one merged kernel: the same steps (float rounding) and
    the same state dict entries as Paddle's default per-parameter Adam with its ClipGradByValue."""
    rng = np.random.default_rng(1)
    start = [rng.normal(size=s).astype("float32") for s in ((6, 4), (4,), (3, 3, 2))]
    grads = [[rng.normal(0, 0.2, size=p.shape).astype("float32") for p in start] for _ in range(4)]
    t = TrainConfig(learning_rate=0.01, grad_clip=0.1)

    def run(make):
        params = [paddle.create_parameter(list(p.shape), "float32") for p in start]
        for p, v in zip(params, start):
            p.set_value(v)
        opt = make(params)
        for step in grads:
            sum((p * paddle.to_tensor(g)).sum() for p, g in zip(params, step)).backward()
            opt.step()
            opt.clear_grad()
        names = {p.name: f"p{i}" for i, p in enumerate(params)}
        keys = sorted(next((k.replace(a, n) for a, n in names.items() if k.startswith(a + "_")), k)
                      for k in opt.state_dict())
        return [p.numpy() for p in params], keys

    merged, merged_keys = run(lambda ps: build_optimizer(t, ps))
    plain, plain_keys = run(lambda ps: paddle.optimizer.Adam(
        learning_rate=0.01, parameters=ps, grad_clip=paddle.nn.ClipGradByValue(0.1), epsilon=t.optim_epsilon))
    assert build_optimizer(t, [paddle.create_parameter([2], "float32")])._use_multi_tensor
    for a, b in zip(merged, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert merged_keys == plain_keys
