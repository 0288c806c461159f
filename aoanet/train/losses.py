"""Training losses of the authors' code (docs/model.md, "Training"). All are token-level means: sum / sum(mask)."""

from __future__ import annotations

import math

import paddle


def _gold(logprobs, target):
    return paddle.take_along_axis(logprobs, target.unsqueeze(-1).astype("int64"), axis=-1).squeeze(-1)


def language_model_loss(logprobs, target, mask, smoothing: float = 0.0):
    """Cross-entropy, or with ``smoothing`` > 0 the reference's LabelSmoothing: KL(q || p) per token where q puts
    1 - smoothing on the gold token and smoothing / (C - 1) on each of the other C - 1 classes (C = V + 1).

    logprobs [B, T, C]; target and mask [B, >= T] (cut to T, as the reference does).
    """
    steps = logprobs.shape[1]
    target = target[:, :steps]
    mask = mask[:, :steps].astype(logprobs.dtype)
    gold = _gold(logprobs, target)
    if smoothing <= 0.0:
        per_token = -gold
    else:
        classes = logprobs.shape[-1]
        conf, other = 1.0 - smoothing, smoothing / (classes - 1)
        # sum_c q_c log q_c is a constant; the dense target distribution is never materialised
        entropy = conf * math.log(conf) + smoothing * math.log(other)
        per_token = entropy - conf * gold - other * (logprobs.sum(axis=-1) - gold)
    return (per_token * mask).sum() / mask.sum()


def reward_mask(seqs):
    """1 at t = 0 and after every non-zero token: the tokens up to and including the first EOS."""
    after_word = (seqs[:, :-1] > 0).astype("float32")
    return paddle.concat([paddle.ones([seqs.shape[0], 1], dtype="float32"), after_word], axis=1)


def reward_loss(logprobs, seqs, rewards):
    """The reference's RewardCriterion: -sum_t log p(w_t) * r * m_t / sum_t m_t, r broadcast over time."""
    mask = reward_mask(seqs).astype(logprobs.dtype)
    rewards = paddle.to_tensor(rewards, dtype=logprobs.dtype).unsqueeze(1)
    return -(logprobs * rewards * mask).sum() / mask.sum()
