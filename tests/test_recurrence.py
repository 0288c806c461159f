"""The decoder's time loop with a hand-written backward (aoanet.model.recurrence) against autograd through the
per-step path (AoAModel.forward_stepwise / sample_stepwise), in float64: values, every parameter's gradient,
dropout, padded regions, the early stop, sampling, and scheduled sampling's semantics."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from aoanet.model import build_model, recurrence

V = 23  # words incl. UNK; V+1 classes
SMALL = dict(rnn_size=32, input_encoding_size=24, att_feat_size=20, num_heads=4, refine_layers=2)


def model64(seed=0, **over):
    paddle.seed(seed)
    model = build_model(V, **{**SMALL, **over})
    model.to(dtype="float64")
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():  # non-trivial LayerNorm gains and biases
        if name.endswith(("a_2", "b_2")):
            p.set_value(rng.normal(1.0 if name.endswith("a_2") else 0.0, 0.3, p.shape))
    return model


def inputs(counts, seed=1, width=SMALL["att_feat_size"]):
    rng = np.random.default_rng(seed)
    n = max(counts)
    feats = np.abs(rng.normal(0, 1, (len(counts), n, width)))
    mask = np.zeros((len(counts), n))
    for b, c in enumerate(counts):
        mask[b, :c] = 1
    return paddle.to_tensor(feats), paddle.to_tensor(mask)


def grads(model):
    for n, p in model.named_parameters():  # Adam and the data-parallel all-reduce read gradients as laid out
        assert p.grad is None or p.grad.is_contiguous(), f"{n}: the gradient is a strided view"
    out = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return out


def assert_same_grads(a, b, tol=1e-9, floor=1e-6):
    """Each gradient within ``tol`` of the reference, relative to the largest of that tensor or, for gradients
    that are zero in exact arithmetic (the attention keys' biases: a softmax ignores a shift shared by all
    regions), to the largest gradient of all."""
    assert a.keys() == b.keys()
    overall = max(np.abs(g).max() for g in b.values())
    for name in a:
        scale = max(np.abs(b[name]).max(), floor * overall)
        err = np.abs(a[name] - b[name]).max() / scale
        assert err <= tol, f"{name}: relative error {err:.2e}"


class Replay(paddle.nn.Layer):
    """Stands in for an nn.Dropout of the per-step path: multiplies by the recorded mask of each call."""

    def __init__(self, masks):
        super().__init__()
        self.masks, self.calls = masks, 0

    def forward(self, x):
        m = self.masks[self.calls]
        self.calls += 1
        return x * paddle.to_tensor(m.reshape(x.shape))


def fixed_masks(monkeypatch, model, rows, images):
    """Give both paths the same decoder dropout masks, drawn here with numpy (the random streams then only
    serve the encoder's dropout and the sampling, in the same order on both paths). Returns the function that
    puts them into the per-step path's dropout layers, to call after the fused path ran."""
    rng = np.random.default_rng(3)
    masks, order = {}, ["e", "c", "a", "o"]  # the order in which recurrence draws them

    def fake_mask(shape, p, dtype):
        name = order.pop(0)
        if p <= 0:
            return None
        masks[name] = (rng.random(tuple(shape)) >= p) / (1.0 - p)
        return paddle.to_tensor(masks[name])

    monkeypatch.setattr(recurrence, "_mask", fake_mask)

    def install():
        a = masks["a"]  # [T, I, h, k, N] -> per step [I*k, h, 1, N] (the per-step path expands the memory)
        steps, _, h, k, n = a.shape
        model.embed[2] = Replay(list(masks["e"]))
        model.core.ctx_drop = Replay(list(masks["c"]))
        model.core.attention.dropout = Replay([a[t].transpose(0, 2, 1, 3).reshape(rows, h, 1, n)
                                               for t in range(steps)])
        model.core.out_drop = Replay(list(masks["o"]))

    return install


SEQ = np.array(
    [[0, 5, 6, 7, 0, 0, 0], [0, 2, 3, 0, 0, 0, 0], [0, 9, 9, 9, 9, 0, 0], [0, 1, 0, 0, 0, 0, 0],
     [0, 4, V, 8, 0, 0, 0], [0, 3, 3, 0, 0, 0, 0]],
    "int64",
)  # 3 images x 2 captions; every row ends by column 5, so the loop stops early


@pytest.mark.parametrize("out_res", [0, 1])
def test_teacher_forcing_values_and_all_gradients_equal_autograd(out_res):
    model = model64(seed=2, out_res=out_res)
    model.eval()  # no dropout: the two paths draw nothing
    feats, mask = inputs([4, 7, 2])
    seq = paddle.to_tensor(SEQ)
    w = paddle.to_tensor(np.random.default_rng(5).normal(size=(6, 6, V + 1)))
    fused = model(feats, mask, seq, seq_per_img=2)
    (fused * w).sum().backward()
    g_fused = grads(model)
    ref = model.forward_stepwise(feats, mask, seq, seq_per_img=2)
    (ref * w).sum().backward()
    g_ref = grads(model)
    assert np.abs(fused.numpy() - ref.numpy()).max() <= 1e-12
    assert (fused.numpy()[:, 5:] == 0).all()  # the early stop's zero log-probs
    assert len(g_ref) == len(list(model.parameters()))  # every parameter takes part
    assert_same_grads(g_fused, g_ref)


def test_teacher_forcing_with_dropout_and_padded_regions(monkeypatch):
    model = model64(seed=4)
    model.train()
    feats, mask = inputs([4, 7, 1], seed=8)
    seq = paddle.to_tensor(SEQ)
    install = fixed_masks(monkeypatch, model, rows=6, images=3)
    w = paddle.to_tensor(np.random.default_rng(6).normal(size=(6, 6, V + 1)))
    paddle.seed(11)
    fused = model(feats, mask, seq, seq_per_img=2)
    (fused * w).sum().backward()
    g_fused = grads(model)
    install()
    paddle.seed(11)  # the encoder's dropout draws the same masks
    ref = model.forward_stepwise(feats, mask, seq, seq_per_img=2)
    (ref * w).sum().backward()
    g_ref = grads(model)
    assert np.abs(fused.numpy() - ref.numpy()).max() <= 1e-12
    assert_same_grads(g_fused, g_ref)


def test_label_smoothed_loss_gradients_float32():
    """The training loss in float32, as trained: the same gradients up to float32 rounding."""
    from aoanet.train.losses import language_model_loss

    paddle.seed(0)
    model = build_model(V, **SMALL)
    model.eval()
    feats, mask = (t.astype("float32") for t in inputs([3, 5, 6], seed=9))
    seq = paddle.to_tensor(SEQ)
    labels, lmask = seq[:, 1:], paddle.to_tensor((SEQ[:, 1:] > 0).astype("float32"))
    out = []
    for fn in (model, model.forward_stepwise):
        loss = language_model_loss(fn(feats, mask, seq, seq_per_img=2), labels, lmask, 0.2)
        loss.backward()
        out.append((float(loss), grads(model)))
    assert abs(out[0][0] - out[1][0]) <= 1e-6
    assert_same_grads(out[0][1], out[1][1], tol=1e-4, floor=1e-3)


@pytest.mark.parametrize("train", [False, True])
def test_sampling_equals_the_per_step_path(monkeypatch, train):
    model = model64(seed=6)
    feats, mask = inputs([5, 2], seed=3)
    if train:
        model.train()
        install = fixed_masks(monkeypatch, model, rows=6, images=2)
    else:
        model.eval()
    paddle.seed(21)
    seqs, logps = model.sample(feats, mask, sample_n=3, max_length=9)
    w = paddle.to_tensor(np.random.default_rng(2).normal(size=(6, 9)))
    (logps * w).sum().backward()
    g_fused = grads(model)
    if train:
        install()
    paddle.seed(21)  # same encoder dropout, same multinomial draws
    seqs_ref, logps_ref = model.sample_stepwise(feats, mask, sample_n=3, max_length=9)
    (logps_ref * w).sum().backward()
    g_ref = grads(model)
    np.testing.assert_array_equal(seqs.numpy(), seqs_ref.numpy())
    assert np.abs(logps.numpy() - logps_ref.numpy()).max() <= 1e-12
    assert_same_grads(g_fused, g_ref)
    # nothing but zeros after a row's first EOS, and log-probs of real draws
    for row in seqs.numpy():
        zero = np.flatnonzero(row == 0)
        if zero.size:
            assert (row[zero[0]:] == 0).all()


def test_sampling_stops_when_every_row_ended():
    model = model64(seed=8)
    model.eval()
    b = model.logit.bias.numpy().copy()
    b[0] = 60.0  # EOS is nearly certain at once
    model.logit.bias.set_value(b)
    feats, mask = inputs([3, 4])
    seqs, logps = model.sample(feats, mask, sample_n=2, max_length=7)
    assert seqs.shape == [4, 7] and logps.shape == [4, 7]
    assert (seqs.numpy() == 0).all() and (logps.numpy()[:, 1:] == 0).all()


def test_scheduled_sampling_semantics():
    """ss_prob = p: at t >= 1 each row feeds, with probability p, a word drawn from its own previous-step
    distribution; the log-probs are those of teacher forcing on the tokens actually fed; t = 0 is never sampled;
    gradients flow through the fed words' embeddings as in the per-step path."""
    from aoanet.model.layers import mask_to_bias

    model = model64(seed=10)
    model.eval()
    # the previous-step distribution puts (almost) all mass on word 7: a sampled row feeds 7
    b = model.logit.bias.numpy().copy()
    b[7] = 80.0
    model.logit.bias.set_value(b)
    images, per = 40, 5
    feats, mask = inputs([3] * images, seed=4)
    rng = np.random.default_rng(0)
    seq = np.zeros((images * per, 8), "int64")
    seq[:, 1:7] = rng.integers(8, V + 1, (images * per, 6))  # gold words never 7
    seq_t = paddle.to_tensor(seq)
    paddle.seed(3)
    mean, p_att = model.encode(feats, mask)
    values, keys = model.core.split_memory(p_att)
    lp, fed = recurrence.teacher_forcing(model, mean, values, keys, mask_to_bias(mask), seq_t[:, :7], 0.3)
    fed = fed.numpy()
    assert (fed[:, 0] == 0).all()  # BOS is never replaced
    swapped = fed[:, 1:] != seq[:, 1:7]
    assert set(np.unique(fed[:, 1:][swapped])) == {7}
    rate = swapped.mean()
    n = swapped.size
    assert abs(rate - 0.3) <= 4 * np.sqrt(0.3 * 0.7 / n), rate
    # the log-probs are teacher forcing on the fed tokens, gradients included
    w = paddle.to_tensor(rng.normal(size=lp.shape))
    (lp * w).sum().backward()
    g_ss = grads(model)
    fed_seq = paddle.to_tensor(np.concatenate([fed, np.zeros((images * per, 1), "int64")], axis=1))
    ref = model.forward_stepwise(feats, mask, fed_seq, seq_per_img=per)
    (ref * w).sum().backward()
    g_ref = grads(model)
    assert np.abs(lp.numpy() - ref.numpy()).max() <= 1e-12
    assert_same_grads(g_ss, g_ref)


def test_scheduled_sampling_draws_from_each_rows_own_distribution(monkeypatch):
    """The distribution a sampled row draws from at step t is that row's own output at step t - 1."""
    from aoanet.model.layers import mask_to_bias

    model = model64(seed=12)
    model.train()
    feats, mask = inputs([2, 5, 3, 4], seed=6)
    seq = np.zeros((12, 6), "int64")
    seq[:, 1:5] = np.random.default_rng(1).integers(1, V + 1, (12, 4))
    uniform = np.random.default_rng(4).random((4, 12))  # the row-wise draws of steps 1..4
    draws = []
    real = paddle.multinomial

    def recording(probs, num_samples=1):
        out = real(probs, num_samples)
        draws.append((probs.numpy(), out.numpy()[:, 0]))
        return out

    monkeypatch.setattr(recurrence.paddle, "rand", lambda shape: paddle.to_tensor(uniform[: shape[0]]))
    monkeypatch.setattr(recurrence.paddle, "multinomial", recording)
    paddle.seed(9)
    mean, p_att = model.encode(feats, mask)
    values, keys = model.core.split_memory(p_att)
    lp, fed = recurrence.teacher_forcing(model, mean, values, keys, mask_to_bias(mask), paddle.to_tensor(seq[:, :5]),
                                         0.5)
    lp, fed = lp.numpy(), fed.numpy()
    sampled = uniform < 0.5
    assert len(draws) == sampled.any(axis=1).sum() >= 3
    draw = iter(draws)
    for t in range(1, 5):
        sel = np.flatnonzero(sampled[t - 1])
        np.testing.assert_array_equal(fed[~sampled[t - 1], t], seq[~sampled[t - 1], t])  # the others: gold
        if sel.size:
            probs, words = next(draw)
            np.testing.assert_allclose(probs, np.exp(lp[sel, t - 1]), rtol=1e-10, atol=1e-14)
            np.testing.assert_array_equal(fed[sel, t], words)


def test_autocast_keeps_the_per_step_path(monkeypatch):
    model = model64(seed=1)
    feats, mask = inputs([2, 3])
    assert recurrence.available(feats)
    monkeypatch.setattr(paddle.amp, "is_autocast_enabled", lambda: True)
    assert not recurrence.available(feats)
    calls = []
    monkeypatch.setattr(type(model), "forward_stepwise", lambda self, *a: calls.append(a) or "stepwise")
    assert model(feats, mask, paddle.to_tensor(SEQ[:2])) == "stepwise"


def test_fast_layer_gradients_equal_autograd(monkeypatch):
    """The encoder's Linear and LayerNorm take hand-written gradients in training (aoanet.model.layers): without
    dropout, training mode (fast) and eval mode (plain autograd) give the same values and gradients."""
    from aoanet.model import layers

    calls = {"bias": 0, "norm": 0}
    for name, key in (("_BiasAdd", "bias"), ("_LayerNorm", "norm")):
        cls = getattr(layers, name)
        real = cls.apply

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(cls, "apply", counted)
    model = model64(seed=14, dropout_aoa=0.0, drop_prob_lm=0.0, attention_dropout=0.0)
    feats, mask = inputs([4, 7, 1], seed=2)  # a 1-region image: its padded rows have zero variance
    rng = np.random.default_rng(3)
    w_mean = paddle.to_tensor(rng.normal(size=(3, SMALL["rnn_size"])))
    w_att = paddle.to_tensor(rng.normal(size=(3, 7, 2 * SMALL["rnn_size"])))
    out = {}
    for train in (True, False):
        model.train() if train else model.eval()
        mean, p_att = model.encode(feats, mask)
        ((mean * w_mean).sum() + (p_att * w_att).sum()).backward()
        out[train] = (mean.numpy(), p_att.numpy(), grads(model))
        if train:  # 2 refiner layers: 1 + 2 * 4 + 1 Linear layers, 2 + 1 LayerNorms
            assert calls == {"bias": 10, "norm": 3}
    assert calls == {"bias": 10, "norm": 3}  # eval mode: the plain operations
    assert np.abs(out[True][0] - out[False][0]).max() <= 1e-12
    assert np.abs(out[True][1] - out[False][1]).max() <= 1e-12
    assert any("norm.a_2" in k for k in out[True][2]) and "att_embed.0.bias" in out[True][2]
    assert_same_grads(out[True][2], out[False][2])
    for g in out[True][2].values():
        assert np.isfinite(g).all()


def test_inference_step_equals_the_model_step():
    """AoAModel.decode's step (weights laid out for few rows: aoanet.model.aoa.InferenceStep) against _step, in
    float64, chained, with beams sharing their image's memory, UNK and BOS among the tokens."""
    from aoanet.model.aoa import InferenceStep
    from aoanet.model.layers import mask_to_bias

    model = model64(seed=16)
    model.eval()
    feats, mask = inputs([3, 6, 1], seed=7)
    mean, p_att = model.encode(feats, mask)
    memory, bias = model.core.split_memory(p_att), mask_to_bias(mask)
    mean_rows = paddle.repeat_interleave(mean, 2, axis=0)  # 2 beams per image
    fast = InferenceStep(model)
    state_a = state_b = model.init_state(6, "float64")
    for tokens in ([0] * 6, [3, 7, V, 1, 2, 5], [1, 0, 12, 4, V, 9]):
        it = paddle.to_tensor(np.array(tokens, "int64"))
        lp_a, state_a = fast(it, state_a, mean_rows, memory, bias)
        lp_b, state_b = model._step(it, state_b, mean_rows, memory, bias)
        assert np.abs(lp_a.numpy() - lp_b.numpy()).max() <= 1e-10
        for a, b in zip(state_a, state_b):
            assert np.abs(a.numpy() - b.numpy()).max() <= 1e-12
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        InferenceStep(model)
