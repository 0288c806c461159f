"""Import the authors' PyTorch AoANet checkpoints (``model.pth`` + ``infos_<id>.pkl``) into a Paddle AoAModel.

The authors' state dict (docs/model.md, "Parameters") uses the same parameter names as ``AoAModel``; the
only layout difference is that PyTorch stores Linear weights as [out, in] and Paddle as [in, out]. Embedding,
LSTMCell (gate order i, f, g, o in both) and the LayerNorm a_2/b_2 keep their layout. Sizes are inferred from
the shapes; ``num_heads`` cannot be (it only splits R into heads), so it comes from the caller (the CLI reads
it from the infos' ``opt``).

The infos pickle is read with a restricted unpickler: it builds only plain data (containers, strings, numbers,
``argparse.Namespace``, numpy scalars and arrays), so a tampered file cannot run code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from aoanet.safe_pickle import READ_ERRORS, RestrictedUnpickler, UnsafePickleError
from aoanet.safe_pickle import restricted_loads as _restricted_loads

__all__ = [
    "ConversionError",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "infer_reference_options",
    "load_reference_infos",
    "model_from_reference",
    "options_from_opt",
    "read_pytorch_state_dict",
    "reference_state_dict",
    "vocabulary_from_infos",
    "write_checkpoint_dir",
]


class ConversionError(ValueError):
    """The reference checkpoint cannot be converted (missing, unexpected, mis-shaped tensors, bad options)."""


# ---------------------------------------------------------------------------------------------- state dict
_PREFIX = "module."  # nn.DataParallel
# Sizes read off the tensors; an explicit option that disagrees with them is an error.
_INFERRED = (
    "rnn_size",
    "input_encoding_size",
    "att_feat_size",
    "refine",
    "refine_layers",
    "refine_aoa",
    "use_ff",
)
_LAYER_RE = re.compile(r"^refiner\.layers\.(\d+)\.")


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ConversionError(f"state dict keys must be strings, got {key!r}")
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if name in out:
            raise ConversionError(f"tensor {name!r} appears twice (with and without the {_PREFIX!r} prefix)")
        out[name] = value
    return out


def _shape(value) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def infer_reference_options(state_dict: Mapping[str, Any]) -> tuple[int, dict]:
    """(vocab_size V, the options the shapes determine) of a reference state dict (``module.`` prefix ok).

    V = rows of ``embed.0.weight`` - 1 (row 0 is BOS/EOS/pad); E its columns; R, F = the shape of
    ``att_embed.0.weight`` ([R, F]); the refiner depth is the number of ``refiner.layers.{i}`` present
    (highest i + 1); ``use_ff`` if a ``feed_forward`` is present, ``refine_aoa`` if an ``aoa_layer`` is,
    ``refine`` if any refiner tensor is.
    """
    sd = _strip_prefix(state_dict)
    anchors = {
        "embed.0.weight": "[V+1, input_encoding_size]",
        "att_embed.0.weight": "[rnn_size, att_feat_size]",
    }
    problems = [
        f"{name} {'is missing' if name not in sd else f'has shape {list(_shape(sd[name]))}'}"
        f" (expected {shape})"
        for name, shape in anchors.items()
        if name not in sd or len(_shape(sd[name])) != 2
    ]
    if problems:
        found = ", ".join(sorted(sd)[:20]) + (", ..." if len(sd) > 20 else "")
        raise ConversionError(
            "cannot infer the model sizes: "
            + "; ".join(problems)
            + f". Tensors present ({len(sd)}): {found or 'none'}"
        )
    v1, e = _shape(sd["embed.0.weight"])
    r, f = _shape(sd["att_embed.0.weight"])
    if v1 < 2:
        raise ConversionError(
            f"embed.0.weight has {v1} rows: expected V+1 >= 2 (BOS/EOS + at least one word)"
        )
    options = {"rnn_size": r, "input_encoding_size": e, "att_feat_size": f}
    refiner_keys = [k for k in sd if k.startswith("refiner.")]
    options["refine"] = int(bool(refiner_keys))
    if refiner_keys:
        indices = {int(m.group(1)) for k in refiner_keys if (m := _LAYER_RE.match(k))}
        options["refine_layers"] = max(indices) + 1 if indices else 0
        options["refine_aoa"] = int(any(".self_attn.aoa_layer." in k for k in refiner_keys))
        options["use_ff"] = int(any(".feed_forward." in k for k in refiner_keys))
    else:
        options["refine_layers"] = 0
    return v1 - 1, options


def _linear_weights(model) -> set[str]:
    import paddle.nn as nn

    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def model_from_reference(state_dict: Mapping[str, Any], num_heads: int = 8, **options):
    """An eval-mode ``AoAModel`` holding the weights of a reference (PyTorch) AoANet state dict.

    ``state_dict``: name -> array in the reference layout (numpy arrays, or what ``numpy.asarray`` accepts);
    a ``module.`` prefix (DataParallel) is stripped. Sizes are inferred (``infer_reference_options``);
    ``num_heads`` cannot be and defaults to the authors' 8. ``options``: further ``ModelOptions`` (dropouts,
    ``ctx_drop``, ``out_res``, ...); one that contradicts the shapes (e.g. ``rnn_size``) is an error.

    Raises ``ConversionError`` listing every missing, unexpected and mis-shaped tensor.
    """
    from aoanet.model import AoAModel, ModelOptions

    sd = _strip_prefix(state_dict)
    vocab_size, inferred = infer_reference_options(sd)
    if not inferred["refine"]:
        # Without a refiner its variants are not visible in the weights: the caller's values stand.
        inferred = {k: inferred[k] for k in ("rnn_size", "input_encoding_size", "att_feat_size", "refine")}
    conflicts = [
        f"{k}={options[k]!r} but the weights have {k}={v!r}"
        for k, v in inferred.items()
        if k in options and options[k] != v
    ]
    if conflicts:
        raise ConversionError("options contradict the weights: " + "; ".join(conflicts))
    merged = {**options, **inferred, "num_heads": num_heads}
    try:
        model_options = ModelOptions.from_dict(merged)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"unsupported model options: {e}") from e

    model = AoAModel(vocab_size, model_options)
    linear = _linear_weights(model)
    params = model.state_dict()
    expected = {k: tuple(p.shape)[::-1] if k in linear else tuple(p.shape) for k, p in params.items()}

    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    misshaped, bad_values = [], []
    for k, shape in expected.items():
        if k not in sd:
            continue
        got = _shape(sd[k])
        if got != shape:
            misshaped.append(f"{k}: {list(got)}, expected {list(shape)}")
            continue
        arr = np.asarray(sd[k])
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            bad_values.append(f"{k}: dtype {arr.dtype} is not numeric")
        elif not np.isfinite(arr).all():
            bad_values.append(f"{k}: has non-finite values")
    if missing or unexpected or misshaped or bad_values:
        sizes = ", ".join(f"{k}={getattr(model_options, k)}" for k in _INFERRED)
        lines = [
            f"the state dict does not match an AoANet with V={vocab_size}, {sizes} (reference layout, "
            "Linear weights [out, in]):"
        ]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("bad values", bad_values),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise ConversionError("\n".join(lines))

    for k, param in params.items():
        arr = np.asarray(sd[k])
        if k in linear:
            arr = arr.T
        param.set_value(np.ascontiguousarray(arr, dtype=np.float32))
    model.eval()
    return model


def reference_state_dict(model) -> dict[str, np.ndarray]:
    """The inverse of ``model_from_reference``: the model's weights with the reference names and layouts."""
    linear = _linear_weights(model)
    return {k: (v.numpy().T.copy() if k in linear else v.numpy()) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- infos pickle
def restricted_loads(data: bytes):
    """``pickle.loads`` limited to plain data (``aoanet.safe_pickle``), as the infos pickle needs."""
    return _restricted_loads(data, what="the infos pickle")


def load_reference_infos(path) -> dict:
    """Read the authors' ``infos_<id>.pkl`` safely -> dict (``opt``, ``vocab``, ``iter``, ``epoch``, ...)."""
    path = Path(path)
    try:
        infos = restricted_loads(path.read_bytes())
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except READ_ERRORS as e:
        raise ConversionError(f"{path} is not a readable infos pickle ({type(e).__name__}: {e})") from e
    if not isinstance(infos, dict):
        raise ConversionError(f"{path} holds a {type(infos).__name__}, expected the infos dict")
    return infos


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value


def options_from_opt(opt) -> dict:
    """The model options recorded in the infos' ``opt`` (argparse.Namespace or dict), as ModelOptions kwargs.

    ``num_layers`` is left out: the authors' AoAModel forces 2 whatever the option says. Options selecting an
    unsupported variant (``caption_model``, ``use_bn``...) are passed on, so building the model rejects them.
    """
    from aoanet.model import ModelOptions

    if opt is None:
        return {}
    values = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt)
    names = {f.name for f in fields(ModelOptions)} - {"num_layers", "refine_layers"}
    return {k: _plain(values[k]) for k in sorted(names) if k in values}


def vocabulary_from_infos(infos: Mapping, vocab_size: int) -> dict[str, str]:
    """The infos' ``vocab`` (ix_to_word) checked against the weights: keys exactly 1..V -> {str(ix): word}."""
    vocab = infos.get("vocab")
    if not isinstance(vocab, Mapping) or not vocab:
        raise ConversionError("the infos pickle has no vocabulary ('vocab', ix_to_word)")
    try:
        ix_to_word = {str(int(k)): str(w) for k, w in vocab.items()}
    except (TypeError, ValueError) as e:
        raise ConversionError(f"the infos vocabulary has a non-integer index ({e})") from e
    expected = {str(i) for i in range(1, vocab_size + 1)}
    if set(ix_to_word) != expected:
        extra = sorted(set(ix_to_word) - expected, key=int)[:5]
        lacking = sorted(expected - set(ix_to_word), key=int)[:5]
        raise ConversionError(
            f"the infos vocabulary has {len(ix_to_word)} words but the weights have V={vocab_size} "
            f"(embed.0.weight has V+1 rows); indices outside 1..V: {extra}, missing: {lacking}"
        )
    return {str(i): ix_to_word[str(i)] for i in range(1, vocab_size + 1)}


# ---------------------------------------------------------------------------------------------- torch file
def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(m) for m in re.findall(r"\d+", version.split("+")[0])[:2])


def read_pytorch_state_dict(path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``model.pth`` (a state dict) with ``torch.load(weights_only=True)`` -> name -> array."""
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading a PyTorch .pth needs torch, which is not installed: pip install 'aoanet[convert]' "
            "(or pip install torch)"
        ) from None
    if _version_tuple(torch.__version__) < (2, 6):
        raise ConversionError(
            f"torch {torch.__version__} is installed, but reading a .pth safely needs torch >= 2.6 (the restricted "
            "loader of earlier versions, torch.load(weights_only=True), can be made to run code: CVE-2025-32434): "
            "pip install 'torch>=2.6'"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted errors for foreign or unsafe files
        raise ConversionError(
            f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        out[k] = (v.float() if v.is_floating_point() else v).numpy()
    return out


# ---------------------------------------------------------------------------------------------- output dir
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_checkpoint_dir(
    model, ix_to_word: Mapping, out, force: bool = False, extra: Mapping | None = None
) -> Path:
    """Write a checkpoint dir (``aoanet.train.checkpoint.save_model_dir``: model.json, the weights as best and last,
    config.yml, extra JSON files, bound by checkpoint.json).

    config.yml is the default (COCO, authors' recipe) config with the model's options: ``aoanet-eval`` reads
    its data paths from it (override them on its command line).

    Everything is written into a temporary directory next to ``out`` and renamed into place. An existing
    ``out`` is refused unless ``force``; even then only a directory that is empty or holds a checkpoint is
    replaced.
    """
    from aoanet.config import Config, dump_config
    from aoanet.train.checkpoint import MANIFEST, save_model_dir

    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out} already exists (pass --force to replace it)")
        if out.is_symlink() or not out.is_dir():
            raise ConversionError(f"{out} exists and is not a directory: not replacing it")
        if any(out.iterdir()) and not ((out / MANIFEST).is_file() or (out / "model.json").is_file()):
            raise ConversionError(
                f"{out} is not empty and holds no checkpoint ({MANIFEST} or model.json): not replacing it, even "
                "with --force"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        files = {
            name: json.dumps(content, indent=1, default=str).encode("utf-8")
            for name, content in (extra or {}).items()
        }
        save_model_dir(tmp, model, ix_to_word, dump_config(Config(model=model.options.to_dict())), files)
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rename(out, old / "replaced")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "replaced").exists() and not out.exists():
            os.rename(old / "replaced", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
