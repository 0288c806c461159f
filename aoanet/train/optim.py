"""The optimizer of both stages: Adam with the reference's gradient clipping.

Two choices for speed with the same arithmetic (docs/benchmarks.md, "Training speed"): clipping by value runs in
place on the gradients, as the reference's ``clip_gradient`` does (Paddle's ``ClipGradByValue`` makes a clipped
copy of every gradient at every step), and Adam updates all parameters with one merged kernel
(``use_multi_tensor``; its state dict has the same entries, so checkpoints are unchanged).
"""

from __future__ import annotations

import paddle


class ClipGradByValueInPlace(paddle.nn.ClipGradByValue):
    """``ClipGradByValue`` without the copies: each gradient is clipped where it is."""

    @paddle.no_grad()
    def _dygraph_clip(self, params_grads):
        out = []
        for p, g in params_grads:
            if g is None:
                continue
            if getattr(p, "need_clip", True) is not False:
                g.clip_(min=self.min, max=self.max)
            out.append((p, g))
        return out


def build_optimizer(train_cfg, parameters) -> paddle.optimizer.Adam:
    """Adam as the reference builds it, with ``grad_clip_mode`` value (in place) or global norm clipping."""
    t = train_cfg
    clip = (ClipGradByValueInPlace(t.grad_clip) if t.grad_clip_mode == "value"
            else paddle.nn.ClipGradByGlobalNorm(t.grad_clip))
    return paddle.optimizer.Adam(
        learning_rate=t.learning_rate, beta1=t.optim_alpha, beta2=t.optim_beta, epsilon=t.optim_epsilon,
        parameters=parameters, grad_clip=clip, weight_decay=t.weight_decay or None, use_multi_tensor=True,
    )
