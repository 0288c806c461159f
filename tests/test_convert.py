"""Importing the authors' PyTorch checkpoints (issue 8): aoanet.convert and aoanet-convert.

The state dicts here are built with the authors' names and layouts (docs/model.md, "Parameters"; PyTorch
Linear weights [out, in]); the expected outputs come from a float64 numpy implementation of the reference
equations written in this file, in that layout: neither the Paddle model nor the converter checks itself.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

import numpy as np
import paddle
import pytest
from typer.testing import CliRunner

from aoanet import convert
from aoanet.cli import convert as cli
from aoanet.config import config_from_text
from aoanet.convert import ConversionError, UnsafePickleError, model_from_reference
from aoanet.train.checkpoint import Checkpoint, load_model

V, R, E, F, LAYERS, HEADS = 25, 32, 40, 24, 2, 4  # V words incl. UNK (index V); V+1 classes
REL_TOL = 1e-5


# ---------------------------------------------------------------------------- reference state dicts
def reference_state_dict(seed=0, layers=LAYERS, use_ff=False, refine_aoa=True, refine=True):
    """Random weights under the reference names, in the reference layouts (float32, like torch's)."""
    rng = np.random.default_rng(seed)
    sd = {}

    def linear(name, n_out, n_in):
        bound = 1.0 / np.sqrt(n_in)
        sd[f"{name}.weight"] = rng.uniform(-bound, bound, (n_out, n_in))
        sd[f"{name}.bias"] = rng.uniform(-bound, bound, n_out)

    def norm(name):
        sd[f"{name}.a_2"] = rng.normal(1.0, 0.3, R)
        sd[f"{name}.b_2"] = rng.normal(0.0, 0.3, R)

    sd["embed.0.weight"] = rng.normal(0.0, 1.0, (V + 1, E))
    linear("att_embed.0", R, F)
    linear("logit", V + 1, R)
    linear("ctx2att", 2 * R, R)
    if refine:
        for i in range(layers):
            pre = f"refiner.layers.{i}."
            for j in range(3):
                linear(pre + f"self_attn.linears.{j}", R, R)
            if refine_aoa:
                linear(pre + "self_attn.aoa_layer.0", 2 * R, 2 * R)
            else:
                linear(pre + "self_attn.output_layer", R, R)
            if use_ff:
                linear(pre + "feed_forward.w_1", 2048, R)
                linear(pre + "feed_forward.w_2", R, 2048)
            norm(pre + "sublayer.0.norm")
            if use_ff:
                norm(pre + "sublayer.1.norm")
        norm("refiner.norm")
    bound = 1.0 / np.sqrt(R)
    sd["core.att_lstm.weight_ih"] = rng.uniform(-bound, bound, (4 * R, E + R))
    sd["core.att_lstm.weight_hh"] = rng.uniform(-bound, bound, (4 * R, R))
    sd["core.att_lstm.bias_ih"] = rng.uniform(-bound, bound, 4 * R)
    sd["core.att_lstm.bias_hh"] = rng.uniform(-bound, bound, 4 * R)
    linear("core.att2ctx.0", 2 * R, 2 * R)
    norm("core.attention.norm")
    linear("core.attention.linears.0", R, R)
    return {k: np.asarray(v, dtype=np.float32) for k, v in sd.items()}


def decoding_state_dict(
    seed, rate=0.06, rate_gain=0.5, eos_gain=12.0, eos_bias=-9.0, scale=5.0, unk_bias=1.5
):
    """Random weights made to decode like a trained model, for the beam-search test: confident word
    choices (scaled logits), UNK often the raw argmax (so its -1000 matters), and an EOS that grows likelier
    step after step at an image-dependent pace (so captions end at different lengths): LSTM unit 0 counts
    the steps (input/forget/output gates open, cell input ~rate), att2ctx passes h_att[0] into ctx[0], and
    only the EOS logit reads ctx[0]."""
    sd = reference_state_dict(seed)
    w_ih, w_hh = sd["core.att_lstm.weight_ih"], sd["core.att_lstm.weight_hh"]
    b_ih, b_hh = sd["core.att_lstm.bias_ih"], sd["core.att_lstm.bias_hh"]
    for gate in range(4):  # rows of unit 0 in the i, f, g, o blocks
        w_ih[gate * R], w_hh[gate * R], b_hh[gate * R] = 0.0, 0.0, 0.0
        b_ih[gate * R] = 10.0
    b_ih[2 * R] = np.arctanh(rate)
    w_ih[2 * R, E:] = rate_gain / np.sqrt(R)  # the pace depends on mean_feats (+ previous context)
    a2c_w, a2c_b = sd["core.att2ctx.0.weight"], sd["core.att2ctx.0.bias"]
    a2c_w[0], a2c_b[0] = 0.0, 0.0
    a2c_w[0, R] = 1.0  # info unit 0 <- h_att[0]
    a2c_w[R], a2c_b[R] = 0.0, 10.0  # its gate fully open
    logit_w, logit_b = sd["logit.weight"], sd["logit.bias"]
    logit_w *= scale
    logit_w[:, 0] = 0.0
    logit_w[0, 0], logit_b[0] = eos_gain, eos_bias
    logit_b[V] += unk_bias
    return sd


# ---------------------------------------------------------------------------- float64 numpy reference
def layer_norm(x, a, b):
    mean = x.mean(-1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1))  # unbiased, eps on the std
    return a * (x - mean) / (std + 1e-6) + b


def lin(P, name, x):
    return x @ P[f"{name}.weight"].T + P[f"{name}.bias"]  # PyTorch layout [out, in]


def glu(y):
    half = y.shape[-1] // 2
    return y[..., :half] / (1.0 + np.exp(-y[..., half:]))


def attention(q, k, v, mask, heads):
    """q [B, M, R], k/v [B, N, R], mask [B, N] -> [B, M, R]: per-head scaled dot product, masked_fill -1e9."""
    b, m, r = q.shape
    d = r // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).transpose(0, 2, 1, 3)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    scores = np.where(mask[:, None, None, :] == 0, -1e9, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ split(v)).transpose(0, 2, 1, 3).reshape(b, m, r)


def ref_encode(P, feats, mask, heads=HEADS):
    """-> (mean_feats [B, R], p_att_feats [B, N, 2R]); P in the reference layout, float64."""
    x = np.maximum(lin(P, "att_embed.0", feats), 0.0) * mask[..., None]  # pack_wrapper: padded rows are zeros
    if "refiner.norm.a_2" in P:
        i = 0
        while f"refiner.layers.{i}.sublayer.0.norm.a_2" in P:
            pre = f"refiner.layers.{i}."
            y = layer_norm(x, P[pre + "sublayer.0.norm.a_2"], P[pre + "sublayer.0.norm.b_2"])
            q, k, v = (lin(P, pre + f"self_attn.linears.{j}", y) for j in range(3))
            att = attention(q, k, v, mask, heads)
            if pre + "self_attn.aoa_layer.0.weight" in P:
                x = x + glu(lin(P, pre + "self_attn.aoa_layer.0", np.concatenate([att, y], -1)))
            else:
                x = x + lin(P, pre + "self_attn.output_layer", att)
            if pre + "sublayer.1.norm.a_2" in P:
                y = layer_norm(x, P[pre + "sublayer.1.norm.a_2"], P[pre + "sublayer.1.norm.b_2"])
                x = x + lin(P, pre + "feed_forward.w_2", np.maximum(lin(P, pre + "feed_forward.w_1", y), 0.0))
            i += 1
        x = layer_norm(x, P["refiner.norm.a_2"], P["refiner.norm.b_2"])
    mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return mean, lin(P, "ctx2att", x)


def ref_step(P, it, h, c, mean, p_att, mask, heads=HEADS):
    """One decoder step -> (logprobs [B, V+1], h, c); h/c [2, B, R] (slot 1 of h = previous context)."""
    xt = np.maximum(P["embed.0.weight"][it], 0.0)
    x = np.concatenate([xt, mean + h[1]], -1)
    gates = x @ P["core.att_lstm.weight_ih"].T + P["core.att_lstm.bias_ih"]
    gates = gates + h[0] @ P["core.att_lstm.weight_hh"].T + P["core.att_lstm.bias_hh"]
    gi, gf, gg, go = np.split(gates, 4, axis=-1)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    c_att = sig(gf) * c[0] + sig(gi) * np.tanh(gg)
    h_att = sig(go) * np.tanh(c_att)
    r = h_att.shape[-1]
    q = lin(
        P,
        "core.attention.linears.0",
        layer_norm(h_att, P["core.attention.norm.a_2"], P["core.attention.norm.b_2"]),
    )
    att = attention(q[:, None], p_att[:, :, r:], p_att[:, :, :r], mask, heads)[
        :, 0
    ]  # keys 2nd half, values 1st
    ctx = glu(lin(P, "core.att2ctx.0", np.concatenate([att, h_att], -1)))
    logits = lin(P, "logit", ctx)
    logits = logits - logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logprobs, np.stack([h_att, ctx]), np.stack([c_att, c[1]])


def ref_beam_search(P, feats, mask, beam_size, max_length):
    """The authors' per-image beam search (docs/model.md, "Decoding") over ref_step -> (seq [max_length], score)."""
    k = beam_size
    mean, p_att = ref_encode(P, feats[None], mask[None])
    mean, p_att, mask = np.repeat(mean, k, 0), np.repeat(p_att, k, 0), np.repeat(mask[None], k, 0)
    h = np.zeros((2, k, R))
    c = np.zeros((2, k, R))
    logprobs, h, c = ref_step(P, np.zeros(k, np.int64), h, c, mean, p_att, mask)  # BOS step
    seqs = np.zeros((max_length, k), np.int64)
    sums = np.zeros(k)
    done = []
    for t in range(max_length):
        lp = logprobs.copy()
        lp[:, -1] -= 1000.0  # UNK, always
        order = np.argsort(-lp, axis=1, kind="stable")
        candidates = []
        for col in range(min(k, lp.shape[1])):
            for q in range(1 if t == 0 else k):
                w = order[q, col]
                candidates.append((sums[q] + lp[q, w], w, q))
        candidates.sort(key=lambda cand: -cand[0])
        new_seqs, parents = np.zeros_like(seqs), []
        for v in range(k):
            p, w, q = candidates[v]
            new_seqs[:t, v] = seqs[:t, q]
            new_seqs[t, v] = w
            sums[v] = p
            parents.append(q)
        seqs, h, c = new_seqs, h[:, parents], c[:, parents]
        for v in range(k):
            if seqs[t, v] == 0 or t == max_length - 1:
                done.append((sums[v], seqs[:, v].copy()))
                sums[v] = -1000.0
        logprobs, h, c = ref_step(P, seqs[t], h, c, mean, p_att, mask)
    done.sort(key=lambda d: -d[0])
    return done[0][1], done[0][0]


def ref_greedy(P, feats, mask, max_length):
    """The authors' greedy decoding (no UNK suppression): argmax until EOS."""
    mean, p_att = ref_encode(P, feats[None], mask[None])
    h, c = np.zeros((2, 1, R)), np.zeros((2, 1, R))
    it, seq = np.zeros(1, np.int64), np.zeros(max_length, np.int64)
    for t in range(max_length):
        logprobs, h, c = ref_step(P, it, h, c, mean, p_att, mask[None])
        it = logprobs.argmax(-1)
        seq[t] = it[0]
        if it[0] == 0:
            break
    return seq


# ---------------------------------------------------------------------------- helpers
def inputs(seed=1, batch=3, regions=6, valid=(6, 4, 5)):
    rng = np.random.default_rng(seed)
    feats = rng.normal(0.0, 1.0, (batch, regions, F)).astype(np.float32)
    mask = np.zeros((batch, regions), np.float32)
    for b, n in enumerate(valid[:batch]):
        mask[b, :n] = 1.0
        feats[b, n:] = 0.0
    return feats, mask


def f64(sd):
    return {k: v.astype(np.float64) for k, v in sd.items()}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_outputs_match(model, sd, steps=4, heads=HEADS, seed=1):
    P = f64(sd)
    feats, mask = inputs(seed)
    mean_ref, p_att_ref = ref_encode(P, feats.astype(np.float64), mask.astype(np.float64), heads)
    with paddle.no_grad():
        mean, p_att = model.encode(paddle.to_tensor(feats), paddle.to_tensor(mask))
        assert rel_err(mean.numpy(), mean_ref) <= REL_TOL
        assert rel_err(p_att.numpy(), p_att_ref) <= REL_TOL
        # BOS first; later inputs include UNK (V) and EOS/pad (0)
        tokens = np.array([[0, 0, 0], [3, V, 7], [11, 1, 0], [24, 5, 2]])[:steps]
        h = c = np.zeros((2, feats.shape[0], R))
        state = model.init_state(feats.shape[0])
        errors = []
        for it in tokens:
            lp_ref, h, c = ref_step(P, it, h, c, mean_ref, p_att_ref, mask, heads)
            lp, state = model.step(paddle.to_tensor(it), state, mean, p_att, paddle.to_tensor(mask))
            errors += [
                rel_err(lp.numpy(), lp_ref),
                rel_err(state[0].numpy(), h),
                rel_err(state[1].numpy(), c),
            ]
    assert max(errors) <= REL_TOL, errors
    return max(errors)


# ---------------------------------------------------------------------------- conversion
def test_infers_sizes():
    v, options = convert.infer_reference_options(reference_state_dict())
    assert v == V
    assert options == dict(
        rnn_size=R,
        input_encoding_size=E,
        att_feat_size=F,
        refine=1,
        refine_layers=LAYERS,
        refine_aoa=1,
        use_ff=0,
    )
    _, options = convert.infer_reference_options(
        reference_state_dict(layers=1, use_ff=True, refine_aoa=False)
    )
    assert (options["refine_layers"], options["use_ff"], options["refine_aoa"]) == (1, 1, 0)
    _, options = convert.infer_reference_options(reference_state_dict(refine=False))
    assert options["refine"] == 0


def test_converted_model_matches_reference_equations():
    sd = reference_state_dict()
    model = model_from_reference(sd, num_heads=HEADS)
    assert not model.training
    o = model.options
    assert (
        model.vocab_size,
        o.rnn_size,
        o.input_encoding_size,
        o.att_feat_size,
        o.refine_layers,
        o.num_heads,
    ) == (V, R, E, F, LAYERS, HEADS)
    assert_outputs_match(model, sd)


@pytest.mark.parametrize(
    "variant", [dict(use_ff=True, layers=1), dict(refine_aoa=False, layers=1), dict(refine=False)], ids=str
)
def test_variants_match_reference_equations(variant):
    sd = reference_state_dict(seed=3, **variant)
    assert_outputs_match(model_from_reference(sd, num_heads=HEADS), sd, steps=2)


def test_dataparallel_prefix_and_options():
    sd = reference_state_dict()
    model = model_from_reference(
        {f"module.{k}": v for k, v in sd.items()}, num_heads=HEADS, ctx_drop=0, dropout_aoa=0.2, rnn_size=R
    )
    assert (model.options.ctx_drop, model.options.dropout_aoa) == (0, 0.2)
    assert_outputs_match(model, sd, steps=2)
    assert model_from_reference(sd).options.num_heads == 8  # the authors' default when not given


def test_round_trip_to_reference_layout():
    sd = reference_state_dict()
    back = convert.reference_state_dict(model_from_reference(sd, num_heads=HEADS))
    assert list(back) == list(sd)  # same names, in the reference's registration order
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("beam_size", [2, 3])
def test_beam_search_matches_reference(beam_size):
    sd = decoding_state_dict(seed=8)
    P = f64(sd)
    model = model_from_reference(sd, num_heads=HEADS)
    feats, mask = inputs(seed=6, batch=4, valid=(6, 4, 5, 2))
    max_length = 10
    result = model.decode(
        paddle.to_tensor(feats), paddle.to_tensor(mask), beam_size=beam_size, max_length=max_length
    )
    assert result.seqs.shape == (4, max_length) and result.seqs.dtype == np.int64
    expected = [
        ref_beam_search(P, feats[b].astype(np.float64), mask[b].astype(np.float64), beam_size, max_length)
        for b in range(4)
    ]
    np.testing.assert_array_equal(result.seqs, np.stack([seq for seq, _ in expected]))
    assert rel_err(result.scores, [score for _, score in expected]) <= REL_TOL

    greedy = model.decode(paddle.to_tensor(feats), paddle.to_tensor(mask), beam_size=1, max_length=max_length)
    expected_greedy = np.stack(
        [ref_greedy(P, feats[b].astype(np.float64), mask[b].astype(np.float64), max_length) for b in range(4)]
    )
    np.testing.assert_array_equal(greedy.seqs, expected_greedy)
    # The fixture exercises what matters: UNK suppression, early ends, beam != greedy.
    assert (expected_greedy == V).any() and not (result.seqs == V).any()
    lengths = (result.seqs != 0).sum(1)
    # some captions end by EOS, some by the length limit
    assert lengths.min() < max_length - 2 and lengths.max() == max_length
    assert not np.array_equal(result.seqs, expected_greedy)


def _error(sd, **kwargs):
    with pytest.raises(ConversionError) as info:
        model_from_reference(sd, num_heads=HEADS, **kwargs)
    return str(info.value)


def test_missing_unexpected_misshaped_are_listed():
    sd = reference_state_dict()
    del sd["refiner.layers.1.self_attn.linears.2.bias"]
    del sd["core.attention.norm.b_2"]
    sd["refiner.layers.0.self_attn.output_layer.weight"] = np.zeros((R, R), np.float32)
    sd["fc_embed.0.weight"] = np.zeros((R, F), np.float32)
    sd["logit.weight"] = sd["logit.weight"].T.copy()  # a Paddle-layout weight
    sd["core.att_lstm.weight_ih"] = sd["core.att_lstm.weight_ih"][:, :-1]
    msg = _error(sd)
    assert "missing (2)" in msg and "refiner.layers.1.self_attn.linears.2.bias" in msg
    assert "core.attention.norm.b_2" in msg
    assert "unexpected (2)" in msg and "fc_embed.0.weight" in msg and "self_attn.output_layer.weight" in msg
    assert "mis-shaped (2)" in msg
    assert f"logit.weight: [{R}, {V + 1}], expected [{V + 1}, {R}]" in msg
    assert f"core.att_lstm.weight_ih: [{4 * R}, {E + R - 1}], expected [{4 * R}, {E + R}]" in msg


def test_other_errors():
    sd = reference_state_dict()
    assert "embed.0.weight is missing" in _error({k: v for k, v in sd.items() if k != "embed.0.weight"})
    # the depth comes from the highest layer index: a gap is listed as missing
    gap = _error({k: v for k, v in sd.items() if not k.startswith("refiner.layers.0.")})
    assert "missing (10)" in gap and "refiner.layers.0.self_attn.aoa_layer.0.weight" in gap
    without_last = {k: v for k, v in sd.items() if not k.startswith("refiner.layers.1.")}
    assert "refine_layers=2 but the weights have refine_layers=1" in _error(without_last, refine_layers=2)
    assert "rnn_size=64 but the weights have rnn_size=32" in _error(sd, rnn_size=64)
    assert "use_ff=1 but the weights have use_ff=0" in _error(sd, use_ff=1)
    with pytest.raises(ConversionError, match="divisible by num_heads"):
        model_from_reference(sd, num_heads=5)
    with pytest.raises(ConversionError, match="caption_model"):
        model_from_reference(sd, num_heads=HEADS, caption_model="transformer")
    bad = dict(sd, **{"ctx2att.bias": np.full(2 * R, np.nan, np.float32)})
    assert "ctx2att.bias: has non-finite values" in _error(bad)
    both = dict(sd, **{"module.logit.bias": sd["logit.bias"]})
    assert "appears twice" in _error(both)


# ---------------------------------------------------------------------------- infos pickle
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    pass


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"vocab": {"1": "a"}, "opt": _RunsCode(marker)}, protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        convert.restricted_loads(data)
    assert not marker.exists()
    path = tmp_path / "infos.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="infos.pkl"):
        convert.load_reference_infos(path)
    assert not marker.exists()


def test_unpickler_refuses_unknown_globals():
    with pytest.raises(UnsafePickleError, match=r"test_convert\._Custom"):
        convert.restricted_loads(pickle.dumps({"x": _Custom()}))
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        convert.restricted_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"subprocess\.Popen"):
        convert.restricted_loads(b"\x80\x02csubprocess\nPopen\n]\x85R.")
    with pytest.raises(UnsafePickleError, match="latin1"):  # an allowed global with other arguments
        convert.restricted_loads(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unpickler_reads_plain_infos(protocol):
    infos = {
        "opt": argparse.Namespace(caption_model="aoa", rnn_size=1024, num_heads=8, dropout_aoa=0.3, use_ff=0),
        "vocab": {"1": "a", "2": "UNK"},
        "iter": 12,
        "epoch": 2,
        "best_val_score": np.float64(1.25),
        "flag": None,
        "ok": True,
        "iterators": {"train": 3},
        "split_ix": {"train": [0, 1], "val": (2,)},
        "arr": np.arange(6.0).reshape(2, 3),
        "bytes": b"\x00\xff",
        "set": {1, 2},
    }
    out = convert.restricted_loads(pickle.dumps(infos, protocol=protocol))
    assert vars(out.pop("opt")) == vars(infos.pop("opt"))
    np.testing.assert_array_equal(out.pop("arr"), infos.pop("arr"))
    assert out == infos and type(out["best_val_score"]) is np.float64


# numpy 1.26, pickle protocol 2 (what the authors' code wrote): {'opt': Namespace(num_heads=4, rnn_size=32),
# 'best_val_score': numpy.float64(1.25), 'arr': numpy.arange(3)}: globals under numpy.core, bytes via _codecs.
NUMPY1_PROTOCOL2 = bytes.fromhex(
    "80027d71002858030000006f707471016361726770617273650a4e616d6573706163650a7102298171037d71042858090000006e756d5f"
    "686561647371054b045808000000726e6e5f73697a6571064b207562580e000000626573745f76616c5f73636f72657107636e756d7079"
    "2e636f72652e6d756c746961727261790a7363616c61720a7108636e756d70790a64747970650a710958020000006638710a898887710b"
    "52710c284b0358010000003c710d4e4e4e4affffffff4affffffff4b0074710e62635f636f646563730a656e636f64650a710f58090000"
    "00000000000000c3b43f711058060000006c6174696e31711186711252711386711452711558030000006172727116636e756d70792e63"
    "6f72652e6d756c746961727261790a5f7265636f6e7374727563740a7117636e756d70790a6e6461727261790a71184b00857119680f58"
    "0100000062711a681186711b52711c87711d52711e284b014b0385711f68095802000000693871208988877121527122284b03680d4e4e"
    "4e4affffffff4affffffff4b007471236289680f58180000000000000000000000010000000000000002000000000000007124681186"
    "712552712674712762752e"
)


def test_unpickler_reads_numpy1_pickle():
    out = convert.restricted_loads(NUMPY1_PROTOCOL2)
    assert vars(out["opt"]) == {"num_heads": 4, "rnn_size": 32}
    assert out["best_val_score"] == 1.25 and isinstance(out["best_val_score"], np.float64)
    np.testing.assert_array_equal(out["arr"], [0, 1, 2])


# ---------------------------------------------------------------------------- command line
def write_infos(path, vocab_size=V, **opt):
    opt = {
        "caption_model": "aoa",
        "rnn_size": R,
        "input_encoding_size": E,
        "att_feat_size": F,
        "num_heads": HEADS,
        "refine": 1,
        "refine_aoa": 1,
        "use_ff": 0,
        "ctx_drop": 1,
        "dropout_aoa": 0.3,
        "drop_prob_lm": 0.5,
        "num_layers": 2,
        "decoder_type": "AoA",
        "use_multi_head": 2,
        "batch_size": 10,
        **opt,
    }
    vocab = {str(i): f"w{i}" for i in range(1, vocab_size)}
    vocab[str(vocab_size)] = "UNK"
    infos = {
        "opt": argparse.Namespace(**opt),
        "vocab": vocab,
        "iter": 100,
        "epoch": 3,
        "best_val_score": np.float64(1.2),
        "split_ix": {"train": [0, 1]},
    }
    path.write_bytes(pickle.dumps(infos, protocol=2))
    return vocab


@pytest.fixture
def fake_pth(tmp_path, monkeypatch):
    """A .pth whose reading is stood in for (torch is not needed by the tests)."""
    sd = {f"module.{k}": v for k, v in reference_state_dict().items()}
    path = tmp_path / "model.pth"
    path.write_bytes(b"not really a torch file")
    monkeypatch.setattr(cli, "_load_torch_state_dict", lambda p: dict(sd))
    return path


def run_cli(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def test_cli_round_trip(tmp_path, fake_pth):
    vocab = write_infos(tmp_path / "infos_aoanet.pkl")
    out = tmp_path / "ckpt"
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos_aoanet.pkl", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"V={V} words" in result.output and f"num_heads={HEADS}" in result.output
    ck = Checkpoint.open(out)
    assert {"model", "weights_last", "weights_best", "config", "converted_from.json"} <= set(ck.manifest["files"])
    assert ck.path("weights_best") == ck.path("weights_last")  # one weights file, both roles
    assert json.loads(ck.read("converted_from.json"))["infos_sha256"]
    assert (
        config_from_text(ck.config_text(), "config").model_options() == load_model(out)[0].options
    )  # read by aoanet-eval
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ckpt")]  # no temporary dir left
    sd = reference_state_dict()
    for which in ("best", "last"):
        model, ix_to_word = load_model(out, which)
        assert ix_to_word == vocab
        assert model.options.num_heads == HEADS and model.options.dropout_aoa == 0.3
        assert_outputs_match(model, sd, steps=2)

    # An existing directory is refused without --force, replaced with it.
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos_aoanet.pkl", "--out", out)
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    write_infos(tmp_path / "infos_aoanet.pkl", num_heads=8)
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos_aoanet.pkl", "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert load_model(out)[0].options.num_heads == 8
    result = run_cli(
        "--pytorch",
        fake_pth,
        "--infos",
        tmp_path / "infos_aoanet.pkl",
        "--out",
        out,
        "--force",
        "--num-heads",
        2,
    )
    assert result.exit_code == 0, result.output
    assert load_model(out)[0].options.num_heads == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".ckpt")]


def test_cli_refuses_to_replace_a_foreign_dir(tmp_path, fake_pth):
    write_infos(tmp_path / "infos.pkl")
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos.pkl", "--out", out, "--force")
    assert result.exit_code == 1 and "holds no checkpoint" in result.output
    assert (out / "keep.txt").read_text() == "precious"


def test_cli_errors(tmp_path, fake_pth):
    out = tmp_path / "ckpt"
    write_infos(tmp_path / "infos.pkl", vocab_size=V - 1)
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos.pkl", "--out", out)
    assert result.exit_code == 1 and f"the weights have V={V}" in result.output
    write_infos(tmp_path / "infos.pkl", rnn_size=1024)
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos.pkl", "--out", out)
    assert result.exit_code == 1 and "rnn_size=1024 but the weights have rnn_size=32" in result.output
    write_infos(tmp_path / "infos.pkl", use_bn=1)
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "infos.pkl", "--out", out)
    assert result.exit_code == 1 and "use_bn" in result.output
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"opt": _RunsCode(tmp_path / "pwned")}, protocol=2))
    result = run_cli("--pytorch", fake_pth, "--infos", tmp_path / "evil.pkl", "--out", out)
    assert result.exit_code == 1 and "refusing to load global" in result.output
    assert not (tmp_path / "pwned").exists() and not out.exists()


def test_cli_missing_tensors_are_listed(tmp_path, monkeypatch):
    sd = reference_state_dict()
    del sd["core.att2ctx.0.bias"]
    monkeypatch.setattr(cli, "_load_torch_state_dict", lambda p: sd)
    (tmp_path / "model.pth").write_bytes(b"x")
    write_infos(tmp_path / "infos.pkl")
    result = run_cli(
        "--pytorch", tmp_path / "model.pth", "--infos", tmp_path / "infos.pkl", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1 and "missing (1)" in result.output and "core.att2ctx.0.bias" in result.output
    assert not (tmp_path / "o").exists()


def test_reading_a_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "torch", None
    )  # import torch -> ImportError, even where torch is installed
    (tmp_path / "model.pth").write_bytes(b"x")
    write_infos(tmp_path / "infos.pkl")
    result = run_cli(
        "--pytorch", tmp_path / "model.pth", "--infos", tmp_path / "infos.pkl", "--out", tmp_path / "o"
    )
    assert result.exit_code == 1 and "aoanet[convert]" in result.output
