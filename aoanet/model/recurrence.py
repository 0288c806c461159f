"""The decoder's loop over time for training, as one autograd node with a hand-written backward pass.

Autograd through ``AoAModel._step`` (the per-step path, kept as ``AoAModel.forward_stepwise`` and
``sample_stepwise``) is correct but runs a training step far below the CPU's matrix-multiply rate: every time
step does its own small products, builds a dense word-embedding gradient, and every weight gradient is a small
product summed into a buffer step by step. Here (docs/benchmarks.md, "Training speed"):

- forward: what does not depend on the previous step runs once over all time steps: the word embeddings of the
  fed tokens and their share of the LSTM gates, and (teacher forcing) the output layer with its log-softmax.
  A time step does only the sequential part: the recurrent product of [mean + ctx; h], the LSTM cell,
  LayerNorm, the query, attention over the regions and the AoA product;
- backward: back-propagation through time keeps per step only the products on the chain from step t + 1 to t
  (input gradients); every weight gradient is one product over all time steps at the end, the keys' and
  values' gradients one batched product, the embedding's gradient one scatter-add.

The arithmetic is that of ``AoAModel._step``, in the inputs' dtype (float32, or float64 in the tests):
tests/test_recurrence.py checks values and every gradient against autograd through the per-step path. Dropout
masks are drawn once per call for all steps, with ``F.dropout`` (the same distributions as the per-step
``nn.Dropout`` layers, drawn in another order from the random stream).

Scheduled sampling keeps the reference's semantics: at each step t >= 1 each row independently (probability
``ss_prob``) takes a word sampled from its own step t - 1 distribution instead of the ground truth. Whether a
row samples does not depend on the model, so those draws are made up front; only the sampled rows' output
layer runs inside the loop (the log-probabilities of all rows are still computed once, batched, at the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from aoanet.model.layers import column_sums, layer_norm_forward, layer_norm_input_grad

# Order of the parameters handed to the PyLayer (and of their gradients).
PARAMS = ("embed", "w_ih", "w_hh", "b_ih", "b_hh", "ln_a", "ln_b", "wq", "bq", "wa", "ba", "w_logit", "b_logit")


def parameters(model) -> list:
    core = model.core
    return [
        model.embed[0].weight,
        core.att_lstm.weight_ih,
        core.att_lstm.weight_hh,
        core.att_lstm.bias_ih,
        core.att_lstm.bias_hh,
        core.attention.norm.a_2,
        core.attention.norm.b_2,
        core.attention.linears[0].weight,
        core.attention.linears[0].bias,
        core.att2ctx[0].weight,
        core.att2ctx[0].bias,
        model.logit.weight,
        model.logit.bias,
    ]


def available(*tensors) -> bool:
    """The loop runs in float32/float64 without autocast (mixed precision keeps the per-step path)."""
    if paddle.amp.is_autocast_enabled():
        return False
    return all(t is None or t.dtype in (paddle.float32, paddle.float64) for t in tensors)


@dataclass
class Plan:
    """What one call computes (the PyLayer's non-tensor argument)."""

    mode: str  # "teacher" (log-probs of fed tokens) or "sample" (multinomial sampling, SCST)
    steps: int  # teacher: time steps to run; sample: max_length
    num_heads: int
    out_res: bool
    p_embed: float = 0.0  # dropout probabilities (0 in eval mode)
    p_ctx: float = 0.0
    p_att: float = 0.0
    p_out: float = 0.0
    tokens: paddle.Tensor | None = None  # teacher: int64 [B, steps], the ground-truth inputs
    ss_prob: float = 0.0
    temperature: float = 1.0
    ln_eps: float = 1e-6  # the decoder attention's LayerNorm
    rows_per_image: int = 1  # sample: samples per image
    fed: paddle.Tensor | None = field(default=None, repr=False)  # set by forward: the tokens fed, [B, steps]


def _mask(shape, p, dtype):
    # {0, 1/(1-p)}: F.dropout's upscale_in_train mask, drawn for all steps at once
    if p <= 0.0:
        return None
    return F.dropout(paddle.ones(shape, dtype=dtype), p=p, training=True)


def _row_sums(x):
    # [..., n] -> [..., 1] as a product: Paddle's CPU sum over the last axis is several times slower
    # (docs/benchmarks.md, "Training speed")
    return paddle.matmul(x, paddle.ones([x.shape[-1], 1], dtype=x.dtype))


def log_softmax(x):
    """x - logsumexp(x) over the last axis, with the sum of exponentials as a product (Paddle's CPU logsumexp is
    slow at the vocabulary's width); for the dynamic graph (the exported graphs keep aoanet.model.layers.log_softmax).
    """
    shifted = x - x.max(axis=-1, keepdim=True)
    return shifted - paddle.log(_row_sums(paddle.exp(shifted)))


class _Recurrence(PyLayer):
    @staticmethod
    def forward(ctx, mean_feats, values, keys, mask_bias, plan: Plan, *params):
        w = dict(zip(PARAMS, params))
        images, heads, regions, d_k = values.shape
        r = mean_feats.shape[1]
        e = w["embed"].shape[1]
        dtype = mean_feats.dtype
        steps = plan.steps
        rows = plan.tokens.shape[0] if plan.mode == "teacher" else images * plan.rows_per_image
        k = rows // images
        mean_rows = paddle.repeat_interleave(mean_feats, k, axis=0) if k > 1 else mean_feats

        w_e = w["w_ih"][:, :e]  # the word's share of the LSTM input weights [4R, E]
        w_r = paddle.concat([w["w_ih"][:, e:], w["w_hh"]], axis=1)  # [4R, 2R] for [mean + ctx; h]
        gate_bias = w["b_ih"] + w["b_hh"]
        drop_e = _mask([steps, rows, e], plan.p_embed, dtype)
        drop_c = _mask([steps, rows, r], plan.p_ctx, dtype)
        drop_a = _mask([steps, images, heads, k, regions], plan.p_att, dtype)
        drop_o = _mask([steps, rows, r], plan.p_out, dtype)
        scale = 1.0 / math.sqrt(d_k)

        def word_gates(x):
            return paddle.matmul(x, w_e, transpose_y=True) + gate_bias

        def logprobs(out):
            return log_softmax(paddle.matmul(out, w["w_logit"]) + w["b_logit"])

        # ---------------------------------------------------------------- inputs of every step
        resampled = False
        if plan.mode == "teacher":
            tokens_tm = plan.tokens.transpose([1, 0])  # [T, B]
            x_all = F.relu(F.embedding(tokens_tm, w["embed"]))  # [T, B, E]
            if drop_e is not None:
                x_all = x_all * drop_e
            g_all = word_gates(x_all.reshape([steps * rows, e])).reshape([steps, rows, -1])
            xs = [x_all[t] for t in range(steps)]
            gs = [g_all[t] for t in range(steps)]
            fed = [tokens_tm[t] for t in range(steps)]
            sampled_rows = None
            if plan.ss_prob > 0.0 and steps > 1:
                # row-wise draws of the reference (t >= 1), made up front: they do not depend on the model
                sampled_rows = (paddle.rand([steps - 1, rows]) < plan.ss_prob).numpy()
        else:
            it = paddle.zeros([rows], dtype="int64")
            xs, gs, fed = [], [], []
            unfinished = paddle.ones([rows], dtype="bool")
            chosen, lps = [], []

        # ---------------------------------------------------------------- the sequential part
        zeros = paddle.zeros([rows, r], dtype=dtype)
        h_prev, c_prev, ctx_prev = zeros, zeros, None
        keep = {name: [] for name in ("xr", "c_prev", "si", "sf", "tg", "so", "tc", "ln", "y", "qh", "p", "pd",
                                      "ain", "av", "sg", "out")}
        t = 0
        for t in range(steps):
            if plan.mode == "sample":
                x = F.relu(F.embedding(it, w["embed"]))
                if drop_e is not None:
                    x = x * drop_e[t]
                xs.append(x)
                gs.append(word_gates(x))
                fed.append(it)
            elif sampled_rows is not None and t >= 1 and sampled_rows[t - 1].any():
                sel = paddle.to_tensor(np.flatnonzero(sampled_rows[t - 1]))
                probs = paddle.exp(logprobs(paddle.gather(keep["out"][-1], sel)))
                words = paddle.multinomial(probs, 1).squeeze(1)
                x = F.relu(F.embedding(words, w["embed"]))
                if drop_e is not None:
                    x = x * paddle.gather(drop_e[t], sel)
                xs[t] = paddle.scatter(xs[t], sel, x)
                gs[t] = paddle.scatter(gs[t], sel, word_gates(x))
                fed[t] = paddle.scatter(fed[t], sel, words)
                resampled = True
            u = mean_rows
            if ctx_prev is not None:
                u = u + (ctx_prev * drop_c[t] if drop_c is not None else ctx_prev)
            xr = paddle.concat([u, h_prev], axis=1)
            z = gs[t] + paddle.matmul(xr, w_r, transpose_y=True)
            zi, zf, zg, zo = paddle.split(z, 4, axis=1)
            si, sf, so, tg = F.sigmoid(zi), F.sigmoid(zf), F.sigmoid(zo), paddle.tanh(zg)
            c = sf * c_prev + si * tg
            tc = paddle.tanh(c)
            h = so * tc
            y, ln = layer_norm_forward(h, w["ln_a"], w["ln_b"], plan.ln_eps)
            q = paddle.matmul(y, w["wq"]) + w["bq"]
            qh = q.reshape([images, k, heads, d_k]).transpose([0, 2, 1, 3])  # [I, h, k, d]
            scores = paddle.matmul(qh, keys, transpose_y=True) * scale
            if mask_bias is not None:
                scores = scores + mask_bias
            p = F.softmax(scores, axis=-1)
            pd = p * drop_a[t] if drop_a is not None else p
            att = paddle.matmul(pd, values).transpose([0, 2, 1, 3]).reshape([rows, r])
            ain = paddle.concat([att, h], axis=1)
            a2 = paddle.matmul(ain, w["wa"]) + w["ba"]
            av, ag = paddle.split(a2, 2, axis=1)
            sg = F.sigmoid(ag)
            ctx_t = av * sg
            o = ctx_t + h if plan.out_res else ctx_t
            out = o * drop_o[t] if drop_o is not None else o
            for name, value in (("xr", xr), ("c_prev", c_prev), ("si", si), ("sf", sf), ("tg", tg), ("so", so),
                                ("tc", tc), ("ln", ln), ("y", y), ("qh", qh), ("p", p), ("pd", pd),
                                ("ain", ain), ("av", av), ("sg", sg), ("out", out)):
                keep[name].append(value)
            h_prev, c_prev, ctx_prev = h, c, ctx_t
            if plan.mode == "sample":
                lp = logprobs(out)
                scaled = lp if plan.temperature == 1.0 else lp / plan.temperature
                it = paddle.multinomial(paddle.exp(scaled), 1).squeeze(1)
                chosen.append(it)
                lps.append(lp)
                unfinished = paddle.logical_and(unfinished, it > 0)
                it = it * unfinished.astype("int64")
                if not bool(unfinished.any()):
                    break
        n_steps = t + 1 if steps > 0 else 0

        # ---------------------------------------------------------------- outputs
        out_bm = paddle.stack(keep["out"], axis=1)  # [B, T, R]
        ctx.plan, ctx.w, ctx.shape = plan, w, (images, heads, regions, d_k, rows, k, r, e, n_steps)
        ctx.inputs = (mean_feats, values, keys, mask_bias)
        ctx.masks = (drop_e, drop_c, drop_a, drop_o)
        ctx.keep, ctx.w_e, ctx.w_r = keep, w_e, w_r
        if plan.mode == "sample" or resampled:
            x_all = paddle.stack(xs[:n_steps], axis=0)  # [T, B, E]
        ctx.x_all = x_all
        ctx.fed = paddle.stack(fed[:n_steps], axis=0)  # [T, B]
        ctx.out_bm = out_bm
        if plan.mode == "teacher":
            plan.fed = ctx.fed.transpose([1, 0])
            lp = log_softmax(paddle.matmul(out_bm, w["w_logit"]) + w["b_logit"])  # [B, T, V+1]
            ctx.lp = lp
            return lp
        lp_all = paddle.stack(lps, axis=1)  # [B, T, V+1]
        chosen_bm = paddle.stack(chosen, axis=1)  # [B, T]
        ctx.lp, ctx.chosen = lp_all, chosen_bm
        seqs = paddle.stack(fed[1:] + [it], axis=1)  # the words after each step, 0 after a row's EOS
        logps = paddle.take_along_axis(lp_all, chosen_bm.unsqueeze(-1), axis=-1).squeeze(-1)
        ctx.mark_non_differentiable(seqs)
        return seqs, logps

    @staticmethod
    def backward(ctx, *grads):
        plan, w, keep = ctx.plan, ctx.w, ctx.keep
        images, heads, regions, d_k, rows, k, r, e, steps = ctx.shape
        mean_feats, values, keys, mask_bias = ctx.inputs
        drop_e, drop_c, drop_a, drop_o = ctx.masks
        dtype = mean_feats.dtype
        scale = 1.0 / math.sqrt(d_k)

        # ---------------------------------------------------------------- output layer, all steps at once
        if plan.mode == "teacher":
            dlp = grads[0]
            dlogits = dlp - paddle.exp(ctx.lp) * _row_sums(dlp)
        else:
            dlogp = grads[-1]  # [B, T]; seqs take no gradient
            dlogits = paddle.exp(ctx.lp) * (-dlogp.unsqueeze(-1))
            dlogits = paddle.put_along_axis(dlogits, ctx.chosen.unsqueeze(-1), dlogp.unsqueeze(-1), axis=-1,
                                            reduce="add")
        classes = dlogits.shape[-1]
        dlogits2 = dlogits.reshape([rows * steps, classes])
        out2 = ctx.out_bm.reshape([rows * steps, r])
        d_w_logit = paddle.matmul(out2, dlogits2, transpose_x=True)
        d_b_logit = column_sums(dlogits2)
        d_out = paddle.matmul(dlogits2, w["w_logit"], transpose_y=True).reshape([rows, steps, r])
        del dlogits, dlogits2

        # ---------------------------------------------------------------- back through time
        dh_c = dctx_c = dc_c = None
        d_mean = None
        dz_l, da2_l, datt_l, ds_l, dq_l, dy_l = [], [], [], [], [], []
        for t in reversed(range(steps)):
            dpre = d_out[:, t]
            if drop_o is not None:
                dpre = dpre * drop_o[t]
            dctx = dpre if dctx_c is None else dpre + dctx_c
            sg, av = keep["sg"][t], keep["av"][t]
            da_v = dctx * sg
            da_g = dctx * av * sg * (1.0 - sg)
            da2 = paddle.concat([da_v, da_g], axis=1)
            dain = paddle.matmul(da2, w["wa"], transpose_y=True)
            datt, dh = paddle.split(dain, 2, axis=1)
            if plan.out_res:
                dh = dh + dpre
            if dh_c is not None:
                dh = dh + dh_c
            # attention
            datt_h = datt.reshape([images, k, heads, d_k]).transpose([0, 2, 1, 3])
            dpd = paddle.matmul(datt_h, values, transpose_y=True)  # [I, h, k, N]
            dp = dpd * drop_a[t] if drop_a is not None else dpd
            p = keep["p"][t]
            ds = p * (dp - _row_sums(dp * p)) * scale
            dqh = paddle.matmul(ds, keys)
            dq = dqh.transpose([0, 2, 1, 3]).reshape([rows, r])
            dy = paddle.matmul(dq, w["wq"], transpose_y=True)
            dh = dh + layer_norm_input_grad(dy * w["ln_a"], keep["ln"][t])
            # LSTM cell
            si, sf, tg, so, tc = (keep[n][t] for n in ("si", "sf", "tg", "so", "tc"))
            dc = dh * so * (1.0 - tc * tc)
            if dc_c is not None:
                dc = dc + dc_c
            dz = paddle.concat(
                [
                    dc * tg * si * (1.0 - si),
                    dc * keep["c_prev"][t] * sf * (1.0 - sf),
                    dc * si * (1.0 - tg * tg),
                    dh * tc * so * (1.0 - so),
                ],
                axis=1,
            )
            dc_c = dc * sf
            dxr = paddle.matmul(dz, ctx.w_r)
            du, dh_c = paddle.split(dxr, 2, axis=1)
            d_mean = du if d_mean is None else d_mean + du
            dctx_c = du * drop_c[t] if drop_c is not None else du
            for lst, value in ((dz_l, dz), (da2_l, da2), (datt_l, datt_h), (ds_l, ds), (dq_l, dq), (dy_l, dy)):
                lst.append(value)
        for lst in (dz_l, da2_l, datt_l, ds_l, dq_l, dy_l):
            lst.reverse()

        # ---------------------------------------------------------------- weight gradients, all steps at once
        n = steps * rows
        dz2 = paddle.stack(dz_l).reshape([n, -1])
        x2 = ctx.x_all.reshape([n, e])
        d_w_e = paddle.matmul(dz2, x2, transpose_x=True)  # [4R, E]
        d_w_r = paddle.matmul(dz2, paddle.stack(keep["xr"]).reshape([n, 2 * r]), transpose_x=True)  # [4R, 2R]
        d_w_ih = paddle.concat([d_w_e, d_w_r[:, :r]], axis=1)
        d_w_hh = d_w_r[:, r:].contiguous()  # a parameter's gradient must not be a strided view: Adam and the
        # data-parallel all-reduce read its memory as laid out
        d_b = column_sums(dz2)
        dq2 = paddle.stack(dq_l).reshape([n, r])
        d_wq = paddle.matmul(paddle.stack(keep["y"]).reshape([n, r]), dq2, transpose_x=True)
        d_bq = column_sums(dq2)
        da22 = paddle.stack(da2_l).reshape([n, 2 * r])
        d_wa = paddle.matmul(paddle.stack(keep["ain"]).reshape([n, 2 * r]), da22, transpose_x=True)
        d_ba = column_sums(da22)
        dy2 = paddle.stack(dy_l).reshape([n, r])
        normed = paddle.stack([c * inv for c, inv, _, _ in keep["ln"]]).reshape([n, r])
        d_ln_a = column_sums(dy2 * normed)
        d_ln_b = column_sums(dy2)

        def over_time(tensors, last):  # T x [I, h, k, X] -> [I, h, T*k, X]
            return paddle.stack(tensors, axis=2).reshape([images, heads, steps * k, last])

        d_values = paddle.matmul(over_time(keep["pd"], regions), over_time(datt_l, d_k), transpose_x=True)
        d_keys = paddle.matmul(over_time(ds_l, regions), over_time(keep["qh"], d_k), transpose_x=True)
        # word embeddings: through the gates' product, the dropout and the ReLU, scattered into the table
        dx = paddle.matmul(dz2, ctx.w_e)  # [T*B, E]
        if drop_e is not None:
            dx = dx * drop_e[:steps].reshape([n, e])
        dx = dx * (x2 > 0).astype(dtype)
        d_embed = paddle.index_add(paddle.zeros_like(w["embed"]), ctx.fed.reshape([n]), 0, dx)
        if k > 1:
            d_mean = d_mean.reshape([images, k, r]).sum(axis=1)

        grads_out = {
            "embed": d_embed, "w_ih": d_w_ih, "w_hh": d_w_hh, "b_ih": d_b, "b_hh": d_b.clone(),
            "ln_a": d_ln_a, "ln_b": d_ln_b, "wq": d_wq, "bq": d_bq, "wa": d_wa, "ba": d_ba,
            "w_logit": d_w_logit, "b_logit": d_b_logit,
        }
        result = []
        for tensor, grad in zip((mean_feats, values, keys, mask_bias), (d_mean, d_values, d_keys, None)):
            if tensor is not None:
                result.append(None if tensor.stop_gradient else grad)
        for name in PARAMS:
            result.append(None if w[name].stop_gradient else grads_out[name])
        return tuple(result)


def teacher_forcing(model, mean_feats, values, keys, mask_bias, tokens, ss_prob: float = 0.0):
    """Log-probs [B, T, V+1] of feeding ``tokens`` [B, T] (column 0 = BOS), a row per caption, image-major with
    the same number per image; mean_feats [I, R], values/keys [I, h, N, d_k], mask_bias [I, 1, 1, N] or None.
    Returns (log-probs, the tokens fed [B, T] after scheduled sampling)."""
    plan = _plan(model, "teacher", tokens.shape[1], tokens=tokens, ss_prob=ss_prob)
    lp = _Recurrence.apply(mean_feats, values, keys, mask_bias, plan, *parameters(model))
    return lp, plan.fed


def sample(model, mean_feats, values, keys, mask_bias, sample_n: int, max_length: int, temperature: float = 1.0):
    """Multinomial sampling of ``sample_n`` rows per image (image-major): (seqs int64 [B', T], logps [B', T]),
    T <= max_length (the loop stops when every row has ended)."""
    plan = _plan(model, "sample", max_length, temperature=temperature, rows_per_image=sample_n)
    seqs, logps = _Recurrence.apply(mean_feats, values, keys, mask_bias, plan, *parameters(model))
    return seqs, logps


def _plan(model, mode, steps, **kwargs) -> Plan:
    if steps < 1:
        raise ValueError(f"the decoder needs at least one time step, got {steps}")
    o, train = model.options, model.training
    return Plan(
        mode=mode,
        steps=steps,
        num_heads=o.num_heads,
        out_res=bool(o.out_res),
        p_embed=o.drop_prob_lm if train else 0.0,
        p_ctx=o.drop_prob_lm if train and o.ctx_drop else 0.0,
        p_att=o.attention_dropout if train else 0.0,
        p_out=o.drop_prob_lm if train else 0.0,
        ln_eps=model.core.attention.norm.eps,
        **kwargs,
    )
