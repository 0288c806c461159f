"""The Paddle AoANet against an independent float64 numpy implementation of docs/model.md."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from aoanet.model import build_model

SMALL = dict(rnn_size=64, input_encoding_size=48, att_feat_size=40, num_heads=8, refine_layers=3)
V = 29  # words incl. UNK; V+1 classes


def small_model(seed=0, **over):
    paddle.seed(seed)
    model = build_model(V, **{**SMALL, **over})
    rng = np.random.default_rng(seed + 100)
    # Make every LayerNorm's gain and bias non-trivial so the test sees them.
    for name, p in model.named_parameters():
        if name.endswith(("a_2", "b_2")):
            p.set_value(rng.normal(1.0 if name.endswith("a_2") else 0.0, 0.3, p.shape).astype("float32"))
    model.eval()
    return model


def params64(model):
    return {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- numpy float64 reference
def ln(x, a, b, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    std = x.std(-1, ddof=1, keepdims=True)  # unbiased, eps on the std
    return a * (x - mean) / (std + eps) + b


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def glu(y):
    half = y.shape[-1] // 2
    return y[..., :half] * sigmoid(y[..., half:])


def heads(x, h):
    b, n, r = x.shape
    return x.reshape(b, n, h, r // h).transpose(0, 2, 1, 3)


def np_encode(P, feats, mask, layers, h):
    x = np.maximum(feats @ P["att_embed.0.weight"] + P["att_embed.0.bias"], 0) * mask[..., None]
    for i in range(layers):
        pre = f"refiner.layers.{i}."
        y = ln(x, P[pre + "sublayer.0.norm.a_2"], P[pre + "sublayer.0.norm.b_2"])
        q, k, v = (
            heads(y @ P[pre + f"self_attn.linears.{j}.weight"] + P[pre + f"self_attn.linears.{j}.bias"], h)
            for j in range(3)
        )
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(mask[:, None, None, :] == 0, -1e9, scores)  # masked_fill, as the reference
        att = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + glu(
            np.concatenate([att, y], -1) @ P[pre + "self_attn.aoa_layer.0.weight"]
            + P[pre + "self_attn.aoa_layer.0.bias"]
        )
    a = ln(x, P["refiner.norm.a_2"], P["refiner.norm.b_2"])
    mean = (a * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return mean, a @ P["ctx2att.weight"] + P["ctx2att.bias"]


def np_step(P, it, h, c, mean, p_att, mask, nh, with_weights=False):
    r = h.shape[-1]
    xt = np.maximum(P["embed.0.weight"][it], 0)
    inp = np.concatenate([xt, mean + h[1]], -1)
    gates = (
        inp @ P["core.att_lstm.weight_ih"].T
        + P["core.att_lstm.bias_ih"]
        + h[0] @ P["core.att_lstm.weight_hh"].T
        + P["core.att_lstm.bias_hh"]
    )
    i, f, g, o = np.split(gates, 4, -1)
    c_att = sigmoid(f) * c[0] + sigmoid(i) * np.tanh(g)
    h_att = sigmoid(o) * np.tanh(c_att)
    q = ln(h_att, P["core.attention.norm.a_2"], P["core.attention.norm.b_2"])
    q = q @ P["core.attention.linears.0.weight"] + P["core.attention.linears.0.bias"]
    b, n = p_att.shape[:2]
    qh = q.reshape(b, nh, r // nh)
    vh = p_att[..., :r].reshape(b, n, nh, r // nh)  # first half: values
    kh = p_att[..., r:].reshape(b, n, nh, r // nh)  # second half: keys
    scores = np.einsum("bhd,bnhd->bhn", qh, kh) / np.sqrt(r // nh)
    scores = np.where(mask[:, None, :] == 0, -1e9, scores)
    weights = softmax(scores)  # [b, heads, n]
    att = np.einsum("bhn,bnhd->bhd", weights, vh).reshape(b, r)
    ctx = glu(np.concatenate([att, h_att], -1) @ P["core.att2ctx.0.weight"] + P["core.att2ctx.0.bias"])
    logits = ctx @ P["logit.weight"] + P["logit.bias"]
    m = logits.max(-1, keepdims=True)
    logprobs = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    if with_weights:
        return logprobs, np.stack([h_att, ctx]), np.stack([c_att, c[1]]), weights
    return logprobs, np.stack([h_att, ctx]), np.stack([c_att, c[1]])


def rel_err(a, b):
    """max |a - b| relative to the scale of the float64 reference tensor."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def ragged_inputs(counts, width, n=None, seed=1):
    rng = np.random.default_rng(seed)
    n = n or max(counts)
    feats = np.abs(rng.normal(0, 1, (len(counts), n, width))).astype("float32")
    mask = np.zeros((len(counts), n), "float32")
    for b, k in enumerate(counts):
        mask[b, :k] = 1
    return feats, mask


# ---------------------------------------------------------------------------- tests
def test_encoder_and_steps_match_float64_numpy():
    model = small_model()
    P = params64(model)
    feats, mask = ragged_inputs([5, 9, 1], SMALL["att_feat_size"])
    mean, p_att = model.encode(paddle.to_tensor(feats), paddle.to_tensor(mask))
    ref_mean, ref_p = np_encode(P, feats.astype(np.float64), mask.astype(np.float64), 3, 8)
    assert rel_err(mean.numpy(), ref_mean) <= 1e-5
    assert rel_err(p_att.numpy(), ref_p) <= 1e-5

    # several chained decoder steps from the reference's own state, to check the state contract too
    r = SMALL["rnn_size"]
    h = np.zeros((2, 3, r))
    c = np.zeros((2, 3, r))
    state = model.init_state(3)
    tokens = [np.zeros(3, "int64"), np.array([3, 7, V], "int64"), np.array([1, 0, 12], "int64")]
    for it in tokens:
        logprobs, state = model.step(paddle.to_tensor(it), state, mean, p_att, paddle.to_tensor(mask))
        ref_lp, h, c = np_step(P, it, h, c, ref_mean, ref_p, mask.astype(np.float64), 8)
        assert logprobs.shape == [3, V + 1]
        assert rel_err(logprobs.numpy(), ref_lp) <= 1e-5
        assert rel_err(state[0].numpy(), h) <= 1e-5
        assert rel_err(state[1].numpy(), c) <= 1e-5


def test_folded_step_matches_float64_numpy():
    """The exported decoder's step (embedding folded into the LSTM's input weights) against the same float64
    reference as the model's own step, chained, with UNK and BOS among the tokens."""
    from aoanet.model import FoldedStep
    from aoanet.model.layers import mask_to_bias

    model = small_model()
    P = params64(model)
    folded = FoldedStep(model)
    feats, mask = ragged_inputs([5, 9, 1], SMALL["att_feat_size"])
    mean, p_att = model.encode(paddle.to_tensor(feats), paddle.to_tensor(mask))
    ref_mean, ref_p = np_encode(P, feats.astype(np.float64), mask.astype(np.float64), 3, 8)
    memory, bias = model.core.split_memory(p_att), mask_to_bias(paddle.to_tensor(mask))
    r = SMALL["rnn_size"]
    h, c = np.zeros((2, 3, r)), np.zeros((2, 3, r))
    state = model.init_state(3)
    for it in (np.zeros(3, "int64"), np.array([3, 7, V], "int64"), np.array([1, 0, 12], "int64")):
        logprobs, state = folded(paddle.to_tensor(it), state, mean, memory, bias)
        ref_lp, h, c = np_step(P, it, h, c, ref_mean, ref_p, mask.astype(np.float64), 8)
        assert rel_err(logprobs.numpy(), ref_lp) <= 1e-5
        assert rel_err(state[0].numpy(), h) <= 1e-5
        assert rel_err(state[1].numpy(), c) <= 1e-5
    # its table is a snapshot of weights that only hold in eval mode (no embedding dropout)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        FoldedStep(model)


def test_step_attention_weights_match_float64_numpy():
    """The decoder step's attention weights per head, from the model's step and from the exported decoder's
    (folded) step, against the float64 reference, chained over steps: within 1e-5, summing to 1 over each image's
    regions and exactly 0 on its padding; asking for them changes nothing else."""
    from aoanet.model import FoldedStep
    from aoanet.model.layers import mask_to_bias

    model = small_model()
    P = params64(model)
    counts = [5, 9, 1]
    feats, mask = ragged_inputs(counts, SMALL["att_feat_size"])
    mean, p_att = model.encode(paddle.to_tensor(feats), paddle.to_tensor(mask))
    ref_mean, ref_p = np_encode(P, feats.astype(np.float64), mask.astype(np.float64), 3, 8)
    memory, bias = model.core.split_memory(p_att), mask_to_bias(paddle.to_tensor(mask))
    folded = FoldedStep(model)
    r = SMALL["rnn_size"]
    h, c = np.zeros((2, 3, r)), np.zeros((2, 3, r))
    state = folded_state = model.init_state(3)
    for it in (np.zeros(3, "int64"), np.array([3, 7, V], "int64"), np.array([1, 0, 12], "int64")):
        plain_lp, plain_state = model.step(paddle.to_tensor(it), state, mean, p_att, paddle.to_tensor(mask))
        logprobs, state, weights = model.step(
            paddle.to_tensor(it), state, mean, p_att, paddle.to_tensor(mask), return_attention=True
        )
        _, folded_state, folded_weights = folded(paddle.to_tensor(it), folded_state, mean, memory, bias, True)
        ref_lp, h, c, ref_w = np_step(P, it, h, c, ref_mean, ref_p, mask.astype(np.float64), 8, with_weights=True)
        np.testing.assert_array_equal(logprobs.numpy(), plain_lp.numpy())
        np.testing.assert_array_equal(state[0].numpy(), plain_state[0].numpy())
        for w in (weights.numpy(), folded_weights.numpy()):
            assert w.shape == (3, 8, 9) and w.dtype == np.float32
            assert np.abs(w - ref_w).max() <= 1e-5
            for b, k in enumerate(counts):
                np.testing.assert_allclose(w[b, :, :k].sum(axis=-1), 1.0, atol=1e-5)
                assert not w[b, :, k:].any()  # exactly 0 on the padded regions


def test_teacher_forcing_equals_chained_steps():
    model = small_model(seed=3)
    P = params64(model)
    feats, mask = ragged_inputs([4, 7], SMALL["att_feat_size"], seed=5)
    seq = np.array([[0, 5, 6, 7, 0, 0], [0, 2, 3, 0, 0, 0], [0, 9, 9, 9, 9, 9], [0, 1, 0, 0, 0, 0]], "int64")
    out = model(paddle.to_tensor(feats), paddle.to_tensor(mask), paddle.to_tensor(seq), seq_per_img=2).numpy()
    assert out.shape == (4, 5, V + 1)
    ref_mean, ref_p = np_encode(P, feats.astype(np.float64), mask.astype(np.float64), 3, 8)
    ref_mean, ref_p, m = (np.repeat(x, 2, axis=0) for x in (ref_mean, ref_p, mask.astype(np.float64)))
    h = np.zeros((2, 4, SMALL["rnn_size"]))
    c = np.zeros_like(h)
    for t in range(5):
        lp, h, c = np_step(P, seq[:, t], h, c, ref_mean, ref_p, m, 8)
        assert rel_err(out[:, t], lp) <= 1e-5


def test_padding_invariance():
    model = small_model(seed=7)
    counts = [3, 6, 2]
    feats, mask = ragged_inputs(counts, SMALL["att_feat_size"], seed=2)
    rng = np.random.default_rng(9)
    # extra padded regions holding garbage (they must be ignored completely)
    extra = np.abs(rng.normal(0, 5, (3, 8, feats.shape[2]))).astype("float32")
    feats2 = np.concatenate([feats, extra], 1)
    mask2 = np.concatenate([mask, np.zeros((3, 8), "float32")], 1)
    outs = []
    for f, m in ((feats, mask), (feats2, mask2)):
        mean, p_att = model.encode(paddle.to_tensor(f), paddle.to_tensor(m))
        state = model.init_state(3)
        lps = []
        for it in ([0, 0, 0], [4, 5, 6], [7, 8, 9]):
            lp, state = model.step(
                paddle.to_tensor(np.array(it, "int64")), state, mean, p_att, paddle.to_tensor(m)
            )
            lps.append(lp.numpy())
        valid = p_att.numpy()[:, : mask.shape[1]] * mask[..., None]
        outs.append((mean.numpy(), valid, np.stack(lps), state[0].numpy()))
    for a, b in zip(*outs):
        assert np.abs(a - b).max() <= 1e-6


def test_state_dict_contract_full_size():
    model = build_model(9487)
    sd = model.state_dict()
    assert len(sd) == 79
    assert sum(int(np.prod(v.shape)) for v in sd.values()) == 85_562_640
    R, E, F, V1 = 1024, 1024, 2048, 9488
    expected = {
        "embed.0.weight": [V1, E],
        "att_embed.0.weight": [F, R],
        "att_embed.0.bias": [R],
        "logit.weight": [R, V1],
        "logit.bias": [V1],
        "ctx2att.weight": [R, 2 * R],
        "ctx2att.bias": [2 * R],
        "refiner.norm.a_2": [R],
        "refiner.norm.b_2": [R],
        "core.att_lstm.weight_ih": [4 * R, E + R],
        "core.att_lstm.weight_hh": [4 * R, R],
        "core.att_lstm.bias_ih": [4 * R],
        "core.att_lstm.bias_hh": [4 * R],
        "core.att2ctx.0.weight": [2 * R, 2 * R],
        "core.att2ctx.0.bias": [2 * R],
        "core.attention.norm.a_2": [R],
        "core.attention.norm.b_2": [R],
        "core.attention.linears.0.weight": [R, R],
        "core.attention.linears.0.bias": [R],
    }
    for i in range(6):
        pre = f"refiner.layers.{i}."
        for j in range(3):
            expected[pre + f"self_attn.linears.{j}.weight"] = [R, R]
            expected[pre + f"self_attn.linears.{j}.bias"] = [R]
        expected[pre + "self_attn.aoa_layer.0.weight"] = [2 * R, 2 * R]
        expected[pre + "self_attn.aoa_layer.0.bias"] = [2 * R]
        expected[pre + "sublayer.0.norm.a_2"] = [R]
        expected[pre + "sublayer.0.norm.b_2"] = [R]
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    # PyTorch-default initialisation: Linear U(+-1/sqrt(fan_in)), Embedding N(0, 1)
    w = sd["att_embed.0.weight"].numpy()
    assert np.abs(w).max() <= 1 / np.sqrt(F) + 1e-7 and np.abs(w).max() > 0.9 / np.sqrt(F)
    assert abs(float(sd["embed.0.weight"].numpy().std()) - 1.0) < 0.01
    assert abs(float(sd["logit.bias"].numpy().std()) - 1 / np.sqrt(R) / np.sqrt(3)) < 2e-3


def test_seed_variant_has_four_layers():
    sd = build_model(9487, refine_layers=4).state_dict()
    assert sum(int(np.prod(v.shape)) for v in sd.values()) == 70_868_240


def test_bad_inputs_are_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(0, **SMALL)
    with pytest.raises(ValueError, match=r"\[batch, regions, 40\]"):
        model.encode(paddle.zeros([2, 3, 41]), paddle.ones([2, 3]))
    with pytest.raises(ValueError, match="att_masks must have shape"):
        model.encode(paddle.zeros([2, 3, 40]), paddle.ones([2, 4]))
    with pytest.raises(ValueError, match="unknown model option"):
        build_model(10, rnn_sise=10)
    with pytest.raises(ValueError, match="divisible"):
        build_model(10, rnn_size=30, num_heads=8)


# ---------------------------------------------------------------------------- decoding on the Paddle model
def test_beam_one_equals_greedy_and_unk_never_emitted():
    model = small_model(seed=11)
    feats, mask = ragged_inputs([5, 3, 8, 2], SMALL["att_feat_size"], seed=4)
    f, m = paddle.to_tensor(feats), paddle.to_tensor(mask)
    # keep greedy away from UNK so that beam 1 (which suppresses UNK) and greedy agree
    logit_b = model.logit.bias.numpy().copy()
    logit_b[V] = -50
    model.logit.bias.set_value(logit_b)
    g = model.decode(f, m, beam_size=1)
    b1 = model.decode(f, m, beam_size=1, greedy_unk=False)
    np.testing.assert_array_equal(g.seqs, b1.seqs)
    np.testing.assert_allclose(g.scores, b1.scores, atol=1e-5)
    # now make UNK the model's favourite word: beam search must still never emit it
    logit_b[V] = 50
    model.logit.bias.set_value(logit_b)
    for k in (1, 2, 3):
        res = model.decode(f, m, beam_size=k, greedy_unk=False)
        assert not (res.seqs == V).any()
    assert (model.decode(f, m, beam_size=1).seqs == V).any()  # greedy does not suppress UNK (reference)


def test_beam_batch_composition_does_not_change_captions():
    model = small_model(seed=13)
    feats, mask = ragged_inputs([5, 3, 8, 2, 6], SMALL["att_feat_size"], seed=8)
    batch = model.decode(paddle.to_tensor(feats), paddle.to_tensor(mask), beam_size=3)
    for i in (0, 2, 4):
        k = int(mask[i].sum())
        alone = model.decode(
            paddle.to_tensor(feats[i : i + 1, :k]), paddle.to_tensor(mask[i : i + 1, :k]), beam_size=3
        )
        np.testing.assert_array_equal(alone.seqs[0], batch.seqs[i])
        assert abs(alone.scores[0] - batch.scores[i]) < 1e-4
    # the caption's score is the summed log-prob of its tokens (+ EOS), recomputed by teacher forcing
    seq = np.concatenate([np.zeros((5, 1), "int64"), batch.seqs, np.zeros((5, 1), "int64")], 1)
    lp = model(paddle.to_tensor(feats), paddle.to_tensor(mask), paddle.to_tensor(seq)).numpy()
    for i in range(5):
        n = int((batch.seqs[i] > 0).sum())
        tokens = seq[i, 1 : n + 2]
        total = lp[i, np.arange(n + 1), tokens].sum() if n < 20 else lp[i, np.arange(n), tokens[:n]].sum()
        assert abs(total - batch.scores[i]) < 1e-4


def test_sampling_shapes_and_termination():
    model = small_model(seed=17)
    model.train()
    feats, mask = ragged_inputs([5, 3], SMALL["att_feat_size"], seed=3)
    paddle.seed(0)
    seqs, logps = model.sample(paddle.to_tensor(feats), paddle.to_tensor(mask), sample_n=5, max_length=12)
    assert seqs.shape == [10, 12] and logps.shape == [10, 12]
    s = seqs.numpy()
    for row in s:  # nothing but zeros after the first EOS
        zero = np.flatnonzero(row == 0)
        if zero.size:
            assert (row[zero[0] :] == 0).all()
    assert (logps.numpy() <= 1e-6).all()
    logps.sum().backward()  # differentiable (SCST)
    assert model.logit.weight.grad is not None


def test_gradients_are_finite_with_padded_regions():
    # Padded regions are all-zero rows inside the refiner (std 0): their LayerNorm must not send NaN backwards.
    model = small_model(seed=19)
    model.train()
    feats, mask = ragged_inputs([2, 7, 4], SMALL["att_feat_size"], seed=6)
    seq = paddle.to_tensor(np.array([[0, 3, 4, 0], [0, 5, 0, 0], [0, 6, 7, 8]], "int64"))
    out = model(paddle.to_tensor(feats), paddle.to_tensor(mask), seq)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and np.isfinite(p.grad.numpy()).all(), name
