"""AoANet (Huang et al., ICCV 2019) in Paddle, faithful to the authors' code (docs/model.md).

Token 0 is BOS, EOS and padding; the vocabulary has V words (UNK last, index V), so the logits have V+1 classes.
Features are encoded once per image; captions or samples of the same image share that encoding (``expand``).
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from aoanet.model import recurrence
from aoanet.model.layers import (
    AoADecoderCore,
    Dropout,
    Refiner,
    log_softmax,
    mask_to_bias,
    torch_linear,
)
from aoanet.model.options import ModelOptions


class AoAModel(nn.Layer):
    def __init__(self, vocab_size: int, options: ModelOptions | None = None):
        super().__init__()
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1 (words including UNK), got {vocab_size!r}")
        o = options or ModelOptions()
        self.options = o
        self.vocab_size = int(vocab_size)
        self.unk_idx = self.vocab_size  # UNK is the last word
        r, e = o.rnn_size, o.input_encoding_size
        # Registration order follows the authors' state dict (docs/model.md, "Parameters").
        self.embed = nn.Sequential(
            nn.Embedding(
                self.vocab_size + 1,
                e,
                weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 1.0)),
            ),
            nn.ReLU(),
            Dropout(o.drop_prob_lm),
        )
        self.att_embed = nn.Sequential(
            torch_linear(o.att_feat_size, r), nn.ReLU(), Dropout(o.drop_prob_lm)
        )
        self.logit = torch_linear(r, self.vocab_size + 1)
        self.ctx2att = torch_linear(r, 2 * r)
        self.refiner = (
            Refiner(
                r,
                o.num_heads,
                o.refine_layers,
                bool(o.refine_aoa),
                o.dropout_aoa,
                bool(o.use_ff),
                o.attention_dropout,
            )
            if o.refine
            else None
        )
        self.core = AoADecoderCore(
            e, r, o.num_heads, o.ctx_drop, o.drop_prob_lm, o.out_res, o.attention_dropout
        )

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, att_feats, att_masks):
        shape = list(att_feats.shape)
        width = self.options.att_feat_size
        if len(shape) != 3 or (shape[-1] > 0 and shape[-1] != width):
            raise ValueError(
                f"att_feats must have shape [batch, regions, {width}] (att_feat_size), got {shape}"
            )
        if att_masks is not None:
            mshape = list(att_masks.shape)
            if len(mshape) != 2 or any(a > 0 and b > 0 and a != b for a, b in zip(mshape, shape[:2])):
                raise ValueError(f"att_masks must have shape [batch, regions] = {shape[:2]}, got {mshape}")

    # ------------------------------------------------------------------ encoder
    def encode(self, att_feats, att_masks=None):
        """Region features [B, N, F] and mask [B, N] -> (mean_feats [B, R], p_att_feats [B, N, 2R])."""
        self._check_inputs(att_feats, att_masks)
        if att_masks is not None:
            att_masks = att_masks.astype(att_feats.dtype)
        x = self.att_embed(att_feats)
        if att_masks is not None:
            # The reference packs valid rows only, so padded rows leave att_embed as exact zeros.
            x = x * att_masks.unsqueeze(-1)
        if self.refiner is not None:
            x = self.refiner(x, mask_to_bias(att_masks))
        if att_masks is None:
            mean_feats = x.mean(axis=1)
        else:
            mean_feats = (x * att_masks.unsqueeze(-1)).sum(axis=1) / att_masks.sum(axis=1, keepdim=True)
        return mean_feats, self.ctx2att(x)

    # ------------------------------------------------------------------ decoder
    def init_state(self, batch_size: int, dtype="float32"):
        shape = [2, batch_size, self.options.rnn_size]
        return paddle.zeros(shape, dtype=dtype), paddle.zeros(shape, dtype=dtype)

    def step(self, it, state, mean_feats, p_att_feats, att_masks=None, return_attention: bool = False):
        """One decoder step: tokens [B] and state (h, c), each [2, B, R] -> (logprobs [B, V+1], state), and with
        ``return_attention`` a third result: each row's attention weights over the regions, per head, [B, h, N]
        (0 on padded regions; docs/model.md, "Decoder step").

        mean_feats has a row per decoder row. p_att_feats and att_masks have one too, or one row per image when
        the decoder rows are image-major with the same number per image (beam search: the beams of an image
        share its memory). Loops over many steps (and the exported decoder) use ``_step``, with keys/values split
        into heads once."""
        return self._step(
            it, state, mean_feats, self.core.split_memory(p_att_feats), mask_to_bias(att_masks), return_attention
        )

    def _step(self, it, state, mean_feats, memory, mask_bias, return_attention: bool = False):
        # The loops below split keys/values and build the mask bias once per sequence, not once per step: the
        # slicing's gradients would otherwise take a large share of a training step (docs/benchmarks.md).
        xt = self.embed(it)
        out, h, c, *weights = self.core(xt, mean_feats, memory, mask_bias, state[0], state[1], return_attention)
        return (log_softmax(self.logit(out)), (h, c), *weights)

    @staticmethod
    def expand(n: int, *tensors):
        """Repeat each image's rows n times (image-major), after the encoder."""
        if n == 1:
            return tensors
        return tuple(None if t is None else paddle.repeat_interleave(t, n, axis=0) for t in tensors)

    def forward(self, att_feats, att_masks, seq, seq_per_img: int = 1, ss_prob: float = 0.0):
        """Teacher forcing. seq [B*seq_per_img, T+1] with column 0 = BOS -> logprobs [B*seq_per_img, T, V+1].

        ``ss_prob`` is the scheduled-sampling hook: for t >= 1 each row's input token is replaced, with that
        probability, by a sample from the model's previous-step distribution. Like the reference, the loop stops
        once every row's ground-truth input is 0; later positions get zero log-probs (they are masked anyway).

        The loop over time runs in ``aoanet.model.recurrence`` (one autograd node with a hand-written backward);
        under mixed-precision autocast it takes the per-step path, ``forward_stepwise`` (the same function).
        """
        if not recurrence.available(att_feats):
            return self.forward_stepwise(att_feats, att_masks, seq, seq_per_img, ss_prob)
        mean_feats, p_att_feats = self.encode(att_feats, att_masks)
        rows, steps = self._check_rows(att_feats, mean_feats, seq, seq_per_img)
        run = self._steps_to_run(seq)
        values, keys = self.core.split_memory(p_att_feats)
        out, _ = recurrence.teacher_forcing(
            self, mean_feats, values, keys, mask_to_bias(att_masks), seq[:, :run], ss_prob
        )
        if run < steps:
            pad = paddle.zeros([rows, steps - run, out.shape[2]], dtype=out.dtype)
            out = paddle.concat([out, pad], axis=1)
        return out

    @staticmethod
    def _check_rows(att_feats, mean_feats, seq, seq_per_img):
        rows, steps = seq.shape[0], seq.shape[1] - 1
        if mean_feats.shape[0] * seq_per_img != rows:
            raise ValueError(
                f"seq has {rows} rows but the batch has {att_feats.shape[0]} images x seq_per_img={seq_per_img}"
            )
        return rows, steps

    @staticmethod
    def _steps_to_run(seq) -> int:
        """Time steps until every row's ground-truth input is 0 (t >= 1), as the reference's loop breaks."""
        inputs = seq.numpy()[:, : seq.shape[1] - 1]
        ended = ~(inputs[:, 1:] != 0).any(axis=0)
        return int(np.argmax(ended)) + 1 if ended.any() else inputs.shape[1]

    def forward_stepwise(self, att_feats, att_masks, seq, seq_per_img: int = 1, ss_prob: float = 0.0):
        """``forward`` with autograd through ``_step`` at every time step (mixed precision; tests' reference)."""
        mean_feats, p_att_feats = self.encode(att_feats, att_masks)
        rows, steps = self._check_rows(att_feats, mean_feats, seq, seq_per_img)
        mean_feats, p_att_feats, att_masks = self.expand(seq_per_img, mean_feats, p_att_feats, att_masks)
        state = self.init_state(rows, mean_feats.dtype)
        memory, mask_bias = self.core.split_memory(p_att_feats), mask_to_bias(att_masks)
        outputs = []
        for t in range(steps):
            it = seq[:, t]
            if t >= 1 and ss_prob > 0.0:
                use_sample = paddle.rand([rows]) < ss_prob
                if bool(use_sample.any()):
                    sampled = paddle.multinomial(paddle.exp(outputs[-1].detach()), 1).squeeze(1)
                    it = paddle.where(use_sample, sampled.astype(it.dtype), it)
            if t >= 1 and not bool((seq[:, t] != 0).any()):
                break
            logprobs, state = self._step(it, state, mean_feats, memory, mask_bias)
            outputs.append(logprobs)
        out = paddle.stack(outputs, axis=1)
        if len(outputs) < steps:
            pad = paddle.zeros([rows, steps - len(outputs), out.shape[2]], dtype=out.dtype)
            out = paddle.concat([out, pad], axis=1)
        return out

    # ------------------------------------------------------------------ decoding
    def sample(
        self, att_feats, att_masks=None, sample_n: int = 1, max_length: int = 20, temperature: float = 1.0
    ):
        """Multinomial sampling, batched, differentiable log-probs (used by SCST with dropout on).

        Returns (seqs int64 [B*sample_n, max_length], logprobs [B*sample_n, max_length]) as Paddle tensors; tokens
        after a row's first EOS are 0 (the log-probs there are masked by the loss). The loop over time runs in
        ``aoanet.model.recurrence``; under autocast, ``sample_stepwise``.
        """
        if not recurrence.available(att_feats):
            return self.sample_stepwise(att_feats, att_masks, sample_n, max_length, temperature)
        mean_feats, p_att_feats = self.encode(att_feats, att_masks)
        values, keys = self.core.split_memory(p_att_feats)
        seqs, logps = recurrence.sample(
            self, mean_feats, values, keys, mask_to_bias(att_masks), sample_n, max_length, temperature
        )
        return self._pad_samples(seqs, logps, max_length)

    @staticmethod
    def _pad_samples(seqs, logps, max_length):
        if seqs.shape[1] < max_length:
            rows, pad = seqs.shape[0], max_length - seqs.shape[1]
            seqs = paddle.concat([seqs, paddle.zeros([rows, pad], dtype="int64")], axis=1)
            logps = paddle.concat([logps, paddle.zeros([rows, pad], dtype=logps.dtype)], axis=1)
        return seqs, logps

    def sample_stepwise(
        self, att_feats, att_masks=None, sample_n: int = 1, max_length: int = 20, temperature: float = 1.0
    ):
        """``sample`` with autograd through ``_step`` at every time step."""
        mean_feats, p_att_feats = self.encode(att_feats, att_masks)
        mean_feats, p_att_feats, att_masks = self.expand(sample_n, mean_feats, p_att_feats, att_masks)
        rows = mean_feats.shape[0]
        state = self.init_state(rows, mean_feats.dtype)
        it = paddle.zeros([rows], dtype="int64")
        unfinished = paddle.ones([rows], dtype="bool")
        memory, mask_bias = self.core.split_memory(p_att_feats), mask_to_bias(att_masks)
        seqs, logps = [], []
        for _ in range(max_length):
            logprobs, state = self._step(it, state, mean_feats, memory, mask_bias)
            scaled = logprobs.detach() if temperature == 1.0 else logprobs.detach() / temperature
            it = paddle.multinomial(paddle.exp(scaled), 1).squeeze(1)
            logps.append(paddle.take_along_axis(logprobs, it.unsqueeze(1), axis=1).squeeze(1))
            unfinished = paddle.logical_and(unfinished, it > 0)
            it = it * unfinished.astype("int64")
            seqs.append(it)
            if not bool(unfinished.any()):
                break
        return self._pad_samples(paddle.stack(seqs, axis=1), paddle.stack(logps, axis=1), max_length)

    @paddle.no_grad()
    def decode(
        self,
        att_feats,
        att_masks=None,
        beam_size: int = 1,
        max_length: int = 20,
        greedy_unk: bool = True,
        return_attention: bool = False,
        **options,
    ) -> aoanet_runtime.beam.DecodeResult:  # noqa: F821
        """Greedy (beam_size=1 with ``greedy_unk``) or beam search through the runtime's numpy search
        (``aoanet_runtime.beam``).

        The search semantics are the authors' (docs/model.md, "Decoding"); the same code drives the onnxruntime
        backend, so both give the same captions. ``options``: length_penalty, block_trigrams, bad_ending_ids,
        early_stop. ``return_attention``: the result's ``attention`` holds each chosen token's attention weights
        over the regions, per head (``aoanet_runtime.beam.DecodeResult``).
        """
        from aoanet_runtime.beam import is_greedy, search

        mean_feats, p_att_feats = self.encode(att_feats, att_masks)
        batch = mean_feats.shape[0]
        if att_masks is None:
            att_masks = paddle.ones(p_att_feats.shape[:2], dtype=p_att_feats.dtype)
        k = 1 if is_greedy(beam_size, greedy_unk) else beam_size
        h, c = self.init_state(batch * k, mean_feats.dtype)
        # Keys/values in head layout and the mask bias are made once, a row per image shared by its k beams
        # (as the exported decoder takes them); the rows are image-major.
        values, keys = self.core.split_memory(p_att_feats)
        ctx = {
            "h": h,
            "c": c,
            "mean_feats": self.expand(k, mean_feats)[0],
            "values": values,
            "keys": keys,
            "mask_bias": mask_to_bias(att_masks),
        }
        per_image = ("values", "keys", "mask_bias")
        fast = not self.training and recurrence.available(mean_feats)
        inference_step = InferenceStep(self) if fast else self._step

        def step(it, ctx):
            logprobs, (h, c), *weights = inference_step(
                paddle.to_tensor(it, dtype="int64"),
                (ctx["h"], ctx["c"]),
                ctx["mean_feats"],
                (ctx["values"], ctx["keys"]),
                ctx["mask_bias"],
                return_attention,
            )
            if return_attention:
                return logprobs.numpy(), dict(ctx, h=h, c=c), weights[0].numpy()
            return logprobs.numpy(), dict(ctx, h=h, c=c)

        def reorder(ctx, index):
            index = paddle.to_tensor(index, dtype="int64")
            return dict(ctx, h=paddle.gather(ctx["h"], index, axis=1), c=paddle.gather(ctx["c"], index, axis=1))

        def keep(ctx, index):
            # whole images are kept (k consecutive rows each)
            images = paddle.to_tensor(index[::k] // k, dtype="int64")
            index = paddle.to_tensor(index, dtype="int64")
            out = {name: paddle.gather(ctx[name], images, axis=0) for name in per_image}
            return dict(
                out,
                mean_feats=paddle.gather(ctx["mean_feats"], index, axis=0),
                h=paddle.gather(ctx["h"], index, axis=1),
                c=paddle.gather(ctx["c"], index, axis=1),
            )

        return search(
            step,
            reorder,
            keep,
            ctx,
            batch,
            beam_size,
            max_length=max_length,
            greedy_unk=greedy_unk,
            unk_idx=self.unk_idx,
            return_attention=return_attention,
            **options,
        )

    def generate(
        self,
        att_feats,
        att_masks=None,
        beam_size: int = 1,
        max_length: int = 20,
        sample: bool = False,
        temperature: float = 1.0,
        sample_n: int = 1,
        **options,
    ):
        """(seqs [B', max_length] int64, logprobs [B', max_length]) as Paddle tensors.

        sample=True: multinomial sampling (B' = B*sample_n); otherwise greedy (beam_size=1) or beam search.
        """
        if sample:
            return self.sample(
                att_feats, att_masks, sample_n=sample_n, max_length=max_length, temperature=temperature
            )
        result = self.decode(att_feats, att_masks, beam_size=beam_size, max_length=max_length, **options)
        return paddle.to_tensor(result.seqs), paddle.to_tensor(result.logprobs)


class InferenceStep:
    """``AoAModel._step`` for decoding without gradients (eval mode).

    A decoding step runs each weight matrix on a few rows (the images, or k per image in beam search): it reads
    all the decoder's weights for little arithmetic, where MKL runs far below its rate. It streams a weight matrix
    faster as the left operand of ``W @ x^T`` than as the right operand of ``x @ W^T`` (docs/benchmarks.md,
    "Measurements behind design choices"). The LSTM's weights are stored [4R, in], so its two input products take
    that form as they are (``nn.LSTMCell`` computes ``x @ W^T``); the other weights stay as they are too (a
    transposed copy per decode costs about what it saves).
    The same arithmetic as ``_step`` up to float rounding (tests/test_recurrence.py); eval mode only (no
    dropout).
    """

    def __init__(self, model: AoAModel):
        if model.training:
            raise ValueError("InferenceStep needs the model in eval mode (model.eval())")
        self.model = model
        lstm = model.core.att_lstm
        self.b_lstm = lstm.bias_ih + lstm.bias_hh

    def __call__(self, it, state, mean_feats, memory, mask_bias, return_attention: bool = False):
        model, core = self.model, self.model.core
        lstm = core.att_lstm
        state_h, state_c = state
        xt = F.relu(F.embedding(it, model.embed[0].weight))
        inputs = paddle.concat([xt, mean_feats + state_h[1]], axis=1)
        gates = (paddle.matmul(lstm.weight_ih, inputs, transpose_y=True)
                 + paddle.matmul(lstm.weight_hh, state_h[0], transpose_y=True)).t() + self.b_lstm
        i, f, g, o = paddle.split(gates, 4, axis=-1)  # Paddle's (and PyTorch's) LSTMCell gate order
        c_att = F.sigmoid(f) * state_c[0] + F.sigmoid(i) * paddle.tanh(g)
        h_att = F.sigmoid(o) * paddle.tanh(c_att)
        out, h, c, *weights = core.after_lstm(h_att, c_att, memory, mask_bias, state_c, return_attention)
        return (recurrence.log_softmax(model.logit(out)), (h, c), *weights)


class FoldedStep(nn.Layer):
    """``AoAModel._step`` for inference with the word embedding folded into the attention LSTM's input weights.

    The LSTM's gates are ``W_ih [x_t; m + c] + b_ih + W_hh h + b_hh`` with ``x_t = relu(E[w])``: the word's share
    ``relu(E) W_ih[:, :e]^T + b_ih + b_hh`` depends on the word only, so it is one table [V+1, 4R] (computed in
    float64) looked up per row, and the rest is one product ``[m + c; h] [W_ih[:, e:]; W_hh]^T``. That removes the
    e x 4R product per decoder row (15% of a full-size step's FLOPs) for a table of (V+1) x 4R floats. Equal to
    ``_step`` up to float rounding, in eval mode only (embedding dropout does not commute with the product); a
    snapshot of the weights when it is built. The exported decoder uses it (aoanet_export.static.DecoderGraph).
    """

    def __init__(self, model: AoAModel):
        super().__init__()
        if model.training:
            raise ValueError("FoldedStep needs the model in eval mode (model.eval())")
        self.model = model
        lstm, e = model.core.att_lstm, model.options.input_encoding_size
        emb = np.maximum(model.embed[0].weight.numpy().astype(np.float64), 0.0)  # [V+1, e]
        w_ih = lstm.weight_ih.numpy().astype(np.float64)  # [4R, e + R]
        word = emb @ w_ih[:, :e].T + lstm.bias_ih.numpy() + lstm.bias_hh.numpy()
        recurrent = np.concatenate([w_ih[:, e:], lstm.weight_hh.numpy().astype(np.float64)], axis=1).T
        self.word_gates = self._constant(word)  # [V+1, 4R]
        self.recurrent = self._constant(recurrent)  # [2R, 4R]

    def _constant(self, value: np.ndarray):
        p = self.create_parameter(list(value.shape), dtype="float32")
        p.set_value(value.astype(np.float32))
        p.stop_gradient = True
        return p

    def forward(self, it, state, mean_feats, memory, mask_bias, return_attention: bool = False):
        state_h, state_c = state
        core = self.model.core
        gates = paddle.gather(self.word_gates, it) + paddle.matmul(
            paddle.concat([mean_feats + state_h[1], state_h[0]], axis=1), self.recurrent
        )
        i, f, g, o = paddle.split(gates, 4, axis=-1)  # Paddle's (and PyTorch's) LSTMCell gate order
        c_att = F.sigmoid(f) * state_c[0] + F.sigmoid(i) * paddle.tanh(g)
        h_att = F.sigmoid(o) * paddle.tanh(c_att)
        out, h, c, *weights = core.after_lstm(h_att, c_att, memory, mask_bias, state_c, return_attention)
        return (log_softmax(self.model.logit(out)), (h, c), *weights)


def build_model(vocab_size: int, **options) -> AoAModel:
    """AoAModel with the reference option names; unspecified options take the authors' recipe (docs/model.md,
    "Options")."""
    return AoAModel(vocab_size, ModelOptions.from_dict(options))
