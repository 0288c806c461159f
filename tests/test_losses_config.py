"""Training losses against dense float64 numpy computations, and config validation errors."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from aoanet.config import ConfigError, load_config
from aoanet.train.losses import language_model_loss, reward_loss, reward_mask
from aoanet.train.scst import ids_until_eos, self_critical_rewards


def _logprobs(rng, b, t, c):
    x = rng.normal(0, 2, (b, t, c))
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_loss_equals_dense_kl(smoothing):
    rng = np.random.default_rng(0)
    b, t, c = 4, 6, 11
    lp = _logprobs(rng, b, t, c)
    target = rng.integers(0, c, (b, t + 2))
    mask = (rng.random((b, t + 2)) < 0.7).astype(np.float64)
    mask[:, 0] = 1
    # dense reference: q = 1 - s on gold, s / (C - 1) elsewhere; KL(q || p) = sum q (log q - log p)
    q = np.full((b, t, c), smoothing / (c - 1))
    np.put_along_axis(q, target[:, :t, None], 1 - smoothing, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * (np.log(q) - lp), 0.0).sum(-1)
    expected = (kl * mask[:, :t]).sum() / mask[:, :t].sum()
    got = float(
        language_model_loss(
            paddle.to_tensor(lp.astype("float32")),
            paddle.to_tensor(target),
            paddle.to_tensor(mask.astype("float32")),
            smoothing,
        )
    )
    assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected))


def test_reward_loss_masks_up_to_first_eos():
    seqs = np.array([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4]], "int64")
    np.testing.assert_array_equal(
        reward_mask(paddle.to_tensor(seqs)).numpy(), [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    )
    lp = np.random.default_rng(1).normal(-2, 0.5, (3, 4))
    r = np.array([0.5, -1.0, 2.0])
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], float)
    expected = -(lp * r[:, None] * m).sum() / m.sum()
    got = float(reward_loss(paddle.to_tensor(lp.astype("float32")), paddle.to_tensor(seqs), r))
    assert abs(got - expected) < 1e-5


class _LenScorer:
    """A stand-in scorer whose score is the caption length, to check the baseline arithmetic."""

    def __call__(self, cands, refs):
        return np.array([len(c) for c in cands], float)


def test_self_critical_baselines():
    samples = np.array([[3, 0, 0], [3, 4, 0], [3, 4, 5], [1, 0, 0]], "int64")  # 2 images x 2 samples
    greedy = np.array([[9, 9, 0], [0, 0, 0]], "int64")
    gts = [np.array([[1, 2, 0]]), np.array([[4, 0, 0]])]
    assert ids_until_eos([3, 4, 0, 0]) == (3, 4, 0) and ids_until_eos([3, 4, 5]) == (3, 4, 5)
    r, _ = self_critical_rewards(_LenScorer(), samples, greedy, gts, 2, "greedy")
    np.testing.assert_allclose(r, [2 - 3, 3 - 3, 3 - 1, 2 - 1])
    r, _ = self_critical_rewards(_LenScorer(), samples, None, gts, 2, "new_self_critical")
    np.testing.assert_allclose(r, [2 - 3, 3 - 2, 3 - 2, 2 - 3])


def test_config_errors_name_the_key(tmp_path):
    base = tmp_path / "c.yml"
    base.write_text("train:\n  batch_size: 4\nmodel:\n  rnn_size: 64\n")
    cfg = load_config(base, ["train.learning_rate=1e-3", "scst.baseline=new_self_critical"])
    assert cfg.train.batch_size == 4 and cfg.train.learning_rate == 1e-3 and cfg.model["rnn_size"] == 64
    for overrides, pattern in (
        (["train.bacth_size=3"], r"train\.bacth_size is not a known key"),
        (["train.batch_size=three"], r"train\.batch_size: expected an integer"),
        (["val.language_eval=7"], r"val\.language_eval: expected true/false"),
        (["model.rnn_sise=3"], r"unknown model option.*rnn_sise"),
        (["scst.baseline=mean"], r"scst\.baseline must be one of"),
        (["optim.lr=3"], r"unknown section"),
        (["train.batch_size=0"], r"train\.batch_size must be > 0"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            load_config(base, overrides)
    (tmp_path / "child.yml").write_text("_base_: c.yml\ntrain:\n  max_epochs: 2\n")
    child = load_config(tmp_path / "child.yml")
    assert child.train.batch_size == 4 and child.train.max_epochs == 2
