"""The model's ``encode`` and ``step`` as two static graphs (``paddle.jit.to_static`` + ``InputSpec``), and a
``paddle.inference`` predictor to run them.

Batch and region count are dynamic (``None`` in the specs). ``paddle.jit.save`` writes ``<prefix>.json``
(PIR, Paddle 3.x) or ``<prefix>.pdmodel`` (Paddle 2.6) next to ``<prefix>.pdiparams``; the names are read
back from disk.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
from paddle.static import InputSpec

from aoanet.model import AoAModel, FoldedStep
from aoanet.model.layers import mask_to_bias
from aoanet_export.errors import ExportError

MODEL_SUFFIXES = (".json", ".pdmodel")  # PIR (Paddle 3.x), legacy ProgramDesc (Paddle 2.x)
PARAMS_SUFFIX = ".pdiparams"


class EncoderGraph(paddle.nn.Layer):
    """encode(att_feats, att_masks) -> (mean_feats, p_att_feats, att_values, att_keys).

    att_values / att_keys [B, heads, N, d_k] are p_att_feats split into the decoder attention's heads
    (``split_memory``), done once per image here rather than at every decoder step.
    """

    def __init__(self, model: AoAModel):
        super().__init__()
        self.model = model

    def forward(self, att_feats, att_masks):
        mean_feats, p_att_feats = self.model.encode(att_feats, att_masks)
        values, keys = self.model.core.split_memory(p_att_feats)
        return mean_feats, p_att_feats, values, keys


class DecoderGraph(paddle.nn.Layer):
    """One decoder step, ``_step(it, (state_h, state_c), mean_feats, (att_values, att_keys), mask_bias)`` ->
    (logprobs, next_h, next_c, attention). The rows are image-major; att_values, att_keys and att_masks have a
    row per image (or per row), see DecoderAttention.forward. ``attention`` [rows, heads, N] is each row's
    attention weights over the regions (format 6; a caller that does not fetch it gets no copy of it).

    ``fold_embedding`` (the default): the step is ``FoldedStep``, with the word embedding folded into the LSTM's
    input weights (a [V+1, 4R] table instead of an e x 4R product per row: -15% FLOPs per full-size step, about
    +100 MB of decoder file); False traces ``AoAModel._step`` as it is."""

    def __init__(self, model: AoAModel, fold_embedding: bool = True):
        super().__init__()
        self.model = model
        self.folded = FoldedStep(model) if fold_embedding else None

    def forward(self, it, state_h, state_c, mean_feats, att_values, att_keys, att_masks):
        step = self.model._step if self.folded is None else self.folded
        logprobs, (next_h, next_c), attention = step(
            it, (state_h, state_c), mean_feats, (att_values, att_keys), mask_to_bias(att_masks), True
        )
        return logprobs, next_h, next_c, attention


def encoder_spec(model: AoAModel) -> list[InputSpec]:
    f = model.options.att_feat_size
    return [
        InputSpec([None, None, f], "float32", "att_feats"),
        InputSpec([None, None], "float32", "att_masks"),
    ]


def decoder_spec(model: AoAModel) -> list[InputSpec]:
    r, h = model.options.rnn_size, model.options.num_heads
    return [
        InputSpec([None], "int64", "it"),
        InputSpec([2, None, r], "float32", "state_h"),
        InputSpec([2, None, r], "float32", "state_c"),
        InputSpec([None, r], "float32", "mean_feats"),
        InputSpec([None, h, None, r // h], "float32", "att_values"),
        InputSpec([None, h, None, r // h], "float32", "att_keys"),
        InputSpec([None, None], "float32", "att_masks"),
    ]


@dataclass(frozen=True)
class StaticFiles:
    model_file: Path
    params_file: Path

    @property
    def format(self) -> str:
        return "pir" if self.model_file.suffix == ".json" else "pdmodel"


@contextlib.contextmanager
def _shape_checks_untraced(model: AoAModel):
    """Run ``AoAModel._check_inputs`` as plain Python while tracing.

    Under dy2static, ``tensor.shape`` yields tensors for the dynamic dimensions, so the check's
    ``a > 0 and ...`` would become ``bool(Tensor)``, which static mode rejects. Untraced, the check sees -1
    for the dynamic dimensions, which it already accepts, and still validates the static ones (feature
    width).
    """
    cls_check = type(model)._check_inputs

    def check(att_feats, att_masks=None):
        return cls_check(model, att_feats, att_masks)

    model.__dict__["_check_inputs"] = paddle.jit.not_to_static(check)
    try:
        yield
    finally:
        model.__dict__.pop("_check_inputs", None)


def _saved_files(prefix: Path) -> StaticFiles:
    """The model and parameter files that ``paddle.jit.save(…, prefix)`` wrote."""
    models = [prefix.with_name(prefix.name + s) for s in MODEL_SUFFIXES]
    models = [p for p in models if p.is_file()]
    params = prefix.with_name(prefix.name + PARAMS_SUFFIX)
    if len(models) != 1 or not params.is_file():
        found = sorted(p.name for p in prefix.parent.glob(prefix.name + ".*"))
        raise ExportError(
            f"paddle.jit.save({prefix}) wrote {found or 'nothing'}; expected one of "
            f"{[prefix.name + s for s in MODEL_SUFFIXES]} and {prefix.name + PARAMS_SUFFIX}"
        )
    return StaticFiles(models[0], params)


def _to_static(layer: paddle.nn.Layer, spec: list[InputSpec]):
    try:
        return paddle.jit.to_static(layer, input_spec=spec, full_graph=True)
    except TypeError:  # a Paddle without the full_graph switch: AST conversion is its only mode
        return paddle.jit.to_static(layer, input_spec=spec)


def save_static(model: AoAModel, directory: Path, fold_embedding: bool = True) -> dict[str, StaticFiles]:
    """Trace ``encode`` and ``step`` of the model (in eval mode) as ``directory/{encoder,decoder}.*``;
    ``fold_embedding``: see DecoderGraph."""
    model.eval()
    training = [name for name, layer in model.named_sublayers(include_self=True) if layer.training]
    if training:
        raise ExportError(f"the model must be in eval mode; still training: {training[:5]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    with _shape_checks_untraced(model):
        for name, wrapper, spec in (
            ("encoder", EncoderGraph(model), encoder_spec(model)),
            ("decoder", DecoderGraph(model, fold_embedding), decoder_spec(model)),
        ):
            wrapper.eval()
            prefix = directory / name
            try:
                paddle.jit.save(_to_static(wrapper, spec), str(prefix))
            except Exception as e:
                raise ExportError(f"could not trace the model's {name} into a static graph: {e}") from e
            out[name] = _saved_files(prefix)
    return out


class StaticPredictor:
    """A saved static graph run through ``paddle.inference`` (the deployment path of Paddle itself)."""

    def __init__(self, files: StaticFiles, threads: int = 1):
        from paddle import inference

        config = inference.Config(str(files.model_file), str(files.params_file))
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(threads)
        self.predictor = inference.create_predictor(config)
        self.input_names = list(self.predictor.get_input_names())
        names = list(self.predictor.get_output_names())
        # PIR names the results fetch_name_<position>; keep the predictor's order otherwise (Paddle 2.x).
        if all(re.fullmatch(r"fetch_name_\d+", n) for n in names):
            names.sort(key=lambda n: int(n.rsplit("_", 1)[1]))
        self.output_names = names

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name in self.input_names:
            self.predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(feeds[name]))
        self.predictor.run()
        return [self.predictor.get_output_handle(name).copy_to_cpu() for name in self.output_names]
