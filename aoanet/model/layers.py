"""Building blocks of AoANet with the reference's numerics and parameter names (docs/model.md).

Initialisation follows PyTorch's defaults (docs/model.md, "Parameters"), not Paddle's: Linear weight and bias
U(±1/sqrt(fan_in)), Embedding N(0, 1), LSTMCell U(±1/sqrt(hidden)). Linear weights are stored in Paddle's
[in, out] layout.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

# Masked attention scores get a large finite negative: -inf would turn a fully padded row into NaN.
MASK_FILL = -1e9
# LayerNorm's variance floor (see LayerNorm.forward)
VAR_FLOOR = 1e-12


def torch_linear(in_features: int, out_features: int) -> nn.Linear:
    bound = 1.0 / math.sqrt(in_features)
    init = nn.initializer.Uniform(-bound, bound)
    return Linear(
        in_features,
        out_features,
        weight_attr=paddle.ParamAttr(initializer=init),
        bias_attr=paddle.ParamAttr(initializer=init),
    )


# ---------------------------------------------------------------------------------------- fast gradients
# Paddle's CPU kernels reduce over leading axes (a broadcast parameter's gradient: a bias, a LayerNorm gain) many
# times slower than the same sum done as a product with a ones vector (docs/benchmarks.md, "Training speed"), and a
# Linear's bias gradient is such a reduction.
# In training (dynamic graph, gradients on, no autocast) these layers take hand-written backward passes that sum
# with products; the values are the same. Static graphs (export) and inference take the plain operations.
# docs/benchmarks.md ("Training speed") has the measurements.


def fast_backward(training: bool) -> bool:
    return (training and paddle.in_dynamic_mode() and paddle.is_grad_enabled()
            and not paddle.amp.is_autocast_enabled())


def column_sums(x):
    """Sum over every axis but the last, as a product: [..., n] -> [n]."""
    n = x.shape[-1]
    rows = x.reshape([-1, n])
    return paddle.matmul(paddle.ones([1, rows.shape[0]], dtype=x.dtype), rows).reshape([n])


class _BiasAdd(PyLayer):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.x_grad = not x.stop_gradient
        return x + bias

    @staticmethod
    def backward(ctx, dy):
        return (dy if ctx.x_grad else None), column_sums(dy)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) whose bias gradient is summed with a product in training."""

    def forward(self, x):
        if self.bias is None or not fast_backward(self.training) or self.bias.stop_gradient:
            return super().forward(x)
        return _BiasAdd.apply(paddle.matmul(x, self.weight), self.bias)


def torch_lstm_cell(input_size: int, hidden_size: int) -> nn.LSTMCell:
    bound = 1.0 / math.sqrt(hidden_size)

    def attr():
        return paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))

    return nn.LSTMCell(
        input_size,
        hidden_size,
        weight_ih_attr=attr(),
        weight_hh_attr=attr(),
        bias_ih_attr=attr(),
        bias_hh_attr=attr(),
    )


def log_softmax(x: paddle.Tensor) -> paddle.Tensor:
    # Paddle's CPU log_softmax kernel grows with vocabulary^2; this form gives the same values, much faster
    # (docs/benchmarks.md).
    return x - paddle.logsumexp(x, axis=-1, keepdim=True)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that hands its input back when it drops nothing (eval mode, p = 0): Paddle's kernel copies
    the tensor even then, ~100 copies per decode of 20 steps."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return super().forward(x)


class GLU(nn.Layer):
    """First half of the last axis is the information, the second half the gate: a * sigmoid(b)."""

    def forward(self, x):
        a, b = paddle.chunk(x, 2, axis=-1)
        return a * F.sigmoid(b)


class LayerNorm(nn.Layer):
    """The reference's LayerNorm: unbiased std, eps added to the std (not to the variance)."""

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.a_2 = self.create_parameter([features], default_initializer=nn.initializer.Constant(1.0))
        self.b_2 = self.create_parameter(
            [features], is_bias=True, default_initializer=nn.initializer.Constant(0.0)
        )
        self.eps = eps

    def forward(self, x):
        if fast_backward(self.training) and not (self.a_2.stop_gradient or self.b_2.stop_gradient):
            return _LayerNorm.apply(x, self.a_2, self.b_2, self.eps)
        return layer_norm_forward(x, self.a_2, self.b_2, self.eps, backward=False)[0]


def layer_norm_forward(x, a, b, eps, backward: bool = True):
    """LayerNorm.forward's values (the same operations in training and eval mode), and what a backward pass needs
    (when ``backward``): (y, (centered, 1 / (std + eps), std, variance above the floor))."""
    n = x.shape[-1]
    centered = x - x.mean(axis=-1, keepdim=True)
    var = (centered * centered).sum(axis=-1, keepdim=True) / (n - 1)
    # Padded regions are all-zero rows (std 0). The floor gives them a zero gradient instead of 0 * inf = NaN,
    # as PyTorch's std backward does; it changes no value for rows with variance above 1e-12.
    std = paddle.sqrt(paddle.clip(var, min=VAR_FLOOR))
    y = a * centered / (std + eps) + b
    if not backward:
        return y, None
    return y, (centered, 1.0 / (std + eps), std, (var > VAR_FLOOR).astype(x.dtype))


def layer_norm_input_grad(dn, saved):
    """d x from d (centered / (std + eps)), through the unbiased variance and its floor (as paddle.clip's
    gradient: none below it)."""
    centered, inv, std, ok = saved
    n = centered.shape[-1]
    dinv = (dn * centered).sum(axis=-1, keepdim=True)
    dvar = dinv * (-0.5) * inv * inv / std * ok
    dc = dn * inv + dvar * (2.0 / (n - 1)) * centered
    return dc - dc.mean(axis=-1, keepdim=True)


class _LayerNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, a, b, eps):
        y, saved = layer_norm_forward(x, a, b, eps)
        ctx.saved, ctx.a, ctx.x_grad = saved, a, not x.stop_gradient
        return y

    @staticmethod
    def backward(ctx, dy):
        centered, inv = ctx.saved[0], ctx.saved[1]
        normed = centered * inv
        dx = layer_norm_input_grad(dy * ctx.a, ctx.saved) if ctx.x_grad else None
        return dx, column_sums(dy * normed), column_sums(dy)


def _split_heads(x, num_heads: int):
    # [B, N, R] -> [B, h, N, d_k]
    b, n, r = x.shape[0], x.shape[1], x.shape[2]
    return x.reshape([b, n, num_heads, r // num_heads]).transpose([0, 2, 1, 3])


def _merge_heads(x):
    # [B, h, N, d_k] -> [B, N, R]
    b, h, n, d = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.transpose([0, 2, 1, 3]).reshape([b, n, h * d])


def attend(query, key, value, mask_bias, dropout: nn.Layer, return_probs: bool = False):
    """Scaled dot-product attention over heads. mask_bias is [B, 1, 1, N] (0 valid, MASK_FILL padding) or None.
    ``return_probs``: also the attention weights [B, h, q, N] (before dropout)."""
    d_k = query.shape[-1]
    scores = paddle.matmul(query, key, transpose_y=True) * (1.0 / math.sqrt(d_k))
    if mask_bias is not None:
        scores = scores + mask_bias
    probs = F.softmax(scores, axis=-1)
    out = paddle.matmul(dropout(probs), value)
    return (out, probs) if return_probs else out


def mask_to_bias(att_masks):
    """[B, N] float mask (1 valid, 0 pad) -> additive bias [B, 1, 1, N]."""
    if att_masks is None:
        return None
    return ((1.0 - att_masks) * MASK_FILL).unsqueeze([1, 2])


class RefinerAttention(nn.Layer):
    """Multi-head self-attention of the refiner with the AoA gate and no output projection (docs/model.md,
    "Encoder")."""

    def __init__(
        self, d_model: int, num_heads: int, refine_aoa: bool, dropout_aoa: float, dropout: float = 0.1
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"rnn_size {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.linears = nn.LayerList([torch_linear(d_model, d_model) for _ in range(3)])
        self.refine_aoa = refine_aoa
        if refine_aoa:
            self.aoa_layer = nn.Sequential(torch_linear(2 * d_model, 2 * d_model), GLU())
            self.dropout_aoa = Dropout(dropout_aoa) if dropout_aoa > 0 else nn.Identity()
        else:
            self.output_layer = torch_linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x, mask_bias):
        q, k, v = (_split_heads(lin(x), self.num_heads) for lin in self.linears)
        attended = _merge_heads(attend(q, k, v, mask_bias, self.dropout))
        if self.refine_aoa:
            # AoA input order: [attended; query]
            return self.aoa_layer(self.dropout_aoa(paddle.concat([attended, x], axis=-1)))
        return self.output_layer(attended)


class SublayerConnection(nn.Layer):
    """Pre-LN residual: x + dropout(sublayer(LN(x)))."""

    def __init__(self, d_model: int, dropout: float = 0.1):
        super().__init__()
        self.norm = LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x, fn):
        return x + self.dropout(fn(self.norm(x)))


class PositionwiseFeedForward(nn.Layer):
    def __init__(self, d_model: int, d_ff: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.w_1 = torch_linear(d_model, d_ff)
        self.w_2 = torch_linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class RefinerLayer(nn.Layer):
    def __init__(self, d_model, num_heads, refine_aoa, dropout_aoa, use_ff, dropout: float = 0.1):
        super().__init__()
        self.self_attn = RefinerAttention(d_model, num_heads, refine_aoa, dropout_aoa, dropout)
        self.use_ff = use_ff
        if use_ff:
            self.feed_forward = PositionwiseFeedForward(d_model, dropout=dropout)
        self.sublayer = nn.LayerList([SublayerConnection(d_model, dropout) for _ in range(1 + int(use_ff))])

    def forward(self, x, mask_bias):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, mask_bias))
        if self.use_ff:
            x = self.sublayer[1](x, self.feed_forward)
        return x


class Refiner(nn.Layer):
    """The AoA refining module: N pre-LN layers, then a final LayerNorm (docs/model.md, "Encoder")."""

    def __init__(self, d_model, num_heads, num_layers, refine_aoa, dropout_aoa, use_ff, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.LayerList(
            [
                RefinerLayer(d_model, num_heads, refine_aoa, dropout_aoa, use_ff, dropout)
                for _ in range(num_layers)
            ]
        )
        self.norm = LayerNorm(d_model)

    def forward(self, x, mask_bias):
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.norm(x)


class DecoderAttention(nn.Layer):
    """Decoder attention: query from LN(h_att), keys/values precomputed (no projection, no output layer)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = LayerNorm(d_model)
        self.linears = nn.LayerList([torch_linear(d_model, d_model)])
        self.dropout = Dropout(dropout)

    def forward(self, h, value_heads, key_heads, mask_bias, return_weights: bool = False):
        """h [I*k, R]: decoder rows, image-major, k per image; value_heads/key_heads [I, h, N, d_k] (split once
        per sequence, not per step); mask_bias [I, 1, 1, N]. k = 1 in the training loops; in beam search the k
        beams of an image share its keys/values, so a step reads each image's memory once, as [k, d_k] x
        [d_k, N] products per head, instead of k expanded copies of it.

        ``return_weights``: also each row's attention weights over the regions, per head, [I*k, h, N]."""
        i, r = value_heads.shape[0], h.shape[-1]
        q = self.linears[0](self.norm(h)).reshape([i, -1, self.num_heads, r // self.num_heads])
        out, probs = attend(
            q.transpose([0, 2, 1, 3]), key_heads, value_heads, mask_bias, self.dropout, return_probs=True
        )  # [I, h, k, d_k], [I, h, k, N]
        # flatten, not reshape([-1, R]): paddle.inference 3.3 rejects that reshape (a PIR pass mistypes it)
        out = out.transpose([0, 2, 1, 3]).flatten(2).flatten(0, 1)  # [I*k, R]
        if not return_weights:
            return out
        if mask_bias is not None:
            # Paddle's CPU softmax leaves ~1e-28 on the padded regions (its exponential does not underflow to 0):
            # the weights handed out are exactly 0 there
            probs = probs * (mask_bias > MASK_FILL / 2).astype(probs.dtype)
        return out, probs.transpose([0, 2, 1, 3]).flatten(0, 1)  # [I*k, h, N]


class AoADecoderCore(nn.Layer):
    """One decoder step (docs/model.md, "Decoder step"): LSTM on [word; mean + ctx_drop(c_{t-1})], attention, AoA
    (att2ctx)."""

    def __init__(
        self,
        input_encoding_size,
        rnn_size,
        num_heads,
        ctx_drop,
        drop_prob_lm,
        out_res,
        attention_dropout: float = 0.1,
    ):
        super().__init__()
        self.rnn_size = rnn_size
        self.att_lstm = torch_lstm_cell(input_encoding_size + rnn_size, rnn_size)
        self.att2ctx = nn.Sequential(torch_linear(2 * rnn_size, 2 * rnn_size), GLU())
        self.attention = DecoderAttention(rnn_size, num_heads, attention_dropout)
        self.ctx_drop = Dropout(drop_prob_lm) if ctx_drop else nn.Identity()
        self.out_drop = Dropout(drop_prob_lm)
        self.out_res = out_res

    def split_memory(self, p_att_feats):
        """ctx2att output -> (value heads, key heads), each [B, h, N, d_k]: first half values, second half keys."""
        r, h = self.rnn_size, self.attention.num_heads
        return _split_heads(p_att_feats[:, :, :r], h), _split_heads(p_att_feats[:, :, r:], h)

    def forward(self, xt, mean_feats, memory, mask_bias, state_h, state_c, return_attention: bool = False):
        """memory = split_memory(p_att_feats), computed once per sequence, a row per image or per decoder row
        (see DecoderAttention.forward); mask_bias = mask_to_bias(att_masks), likewise."""
        lstm_in = paddle.concat([xt, mean_feats + self.ctx_drop(state_h[1])], axis=1)
        h_att, c_att = self.att_lstm(lstm_in, (state_h[0], state_c[0]))[1]
        return self.after_lstm(h_att, c_att, memory, mask_bias, state_c, return_attention)

    def after_lstm(self, h_att, c_att, memory, mask_bias, state_c, return_attention: bool = False):
        """The step from the attention LSTM's new (h, c) on: attention, AoA -> (output, next_h, next_c), and with
        ``return_attention`` the attention weights over the regions per head [rows, h, N] as a fourth result."""
        att = self.attention(h_att, memory[0], memory[1], mask_bias, return_weights=return_attention)
        if return_attention:
            att, weights = att
        ctx = self.att2ctx(paddle.concat([att, h_att], axis=1))
        next_h = paddle.stack([h_att, ctx])
        next_c = paddle.stack([c_att, state_c[1]])
        out = ctx + h_att if self.out_res else ctx
        if return_attention:
            return self.out_drop(out), next_h, next_c, weights
        return self.out_drop(out), next_h, next_c
