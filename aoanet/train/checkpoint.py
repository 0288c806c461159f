"""Checkpoint directories: everything needed to rebuild the model, resume training, or export.

Layout of a checkpoint directory (every file written atomically: temporary file, fsync, rename)::

    model.json          format tag, vocab_size, model options, ix_to_word   (enough to rebuild the model), and
                        ``extractor`` when the features came from an image extractor (aoanet.vision.extract)
    model.pdparams      weights of the last iteration saved
    model-best.pdparams weights with the best validation score so far
    optimizer.pdopt     optimizer state of the last save
    config.yml          the resolved training config
    state.json          training state: epoch, iteration, loader position, RNG states, best score, history
    metrics.jsonl       one JSON line per logged event (train losses, validation scores)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import paddle

from aoanet.model import AoAModel, ModelOptions
from aoanet_runtime import atomic

FORMAT = "aoanet-checkpoint/1"
WEIGHTS = {"last": "model.pdparams", "best": "model-best.pdparams"}


class CheckpointError(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def atomic_paddle_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    paddle.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_model_json(directory: Path, model: AoAModel, ix_to_word: dict, extractor: dict | None = None) -> None:
    """``extractor``: the record of the image extractor the training features came from (its spec, the sha256 of
    its files, where it was), which aoanet-export serves the model with."""
    meta = {
        "format": FORMAT,
        "vocab_size": model.vocab_size,
        "options": model.options.to_dict(),
        "ix_to_word": {str(k): v for k, v in ix_to_word.items()},
    }
    if extractor is not None:
        meta["extractor"] = extractor
    atomic_write_text(Path(directory) / "model.json", json.dumps(meta, indent=1))


def read_model_json(directory: Path) -> dict:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint directory: {path.name} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})"
        )
    for key in ("vocab_size", "options", "ix_to_word"):
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    if len(meta["ix_to_word"]) != meta["vocab_size"]:
        raise CheckpointError(
            f"{path}: ix_to_word has {len(meta['ix_to_word'])} words but vocab_size is {meta['vocab_size']}"
        )
    return meta


def load_state_dict_checked(model: AoAModel, state: dict, source: str) -> None:
    """Load weights, with an error listing missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state and list(state[k].shape) != list(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped: {'; '.join(misshaped)}")
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts))
    model.set_state_dict(state)


def load_model(directory, which: str = "best") -> tuple[AoAModel, dict]:
    """Rebuild the model of a checkpoint directory in eval mode -> (model, ix_to_word).

    ``which`` is 'best' (model-best.pdparams, falling back to the last weights when no validation ran) or 'last'.
    """
    directory = Path(directory)
    meta = read_model_json(directory)
    if which not in WEIGHTS:
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = directory / WEIGHTS[which]
    if which == "best" and not path.is_file():
        path = directory / WEIGHTS["last"]
    if not path.is_file():
        raise CheckpointError(f"{directory}: no weights file ({WEIGHTS[which]})")
    try:
        state = paddle.load(str(path))
    except Exception as e:  # paddle raises assorted errors on truncated or foreign files
        raise CheckpointError(f"{path} could not be read as Paddle weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    model = AoAModel(int(meta["vocab_size"]), ModelOptions.from_dict(meta["options"]))
    load_state_dict_checked(model, state, str(path))
    model.eval()
    return model, meta["ix_to_word"]


def portable_optimizer_state(model, optimizer) -> dict:
    """Optimizer state keyed by structured parameter names (``embed.0.weight_moment1_0``), not by Paddle's
    auto-generated ones (``embedding_2.w_0_…``), which differ between processes and model instances."""
    names = sorted(((p.name, n) for n, p in model.named_parameters()), key=lambda x: -len(x[0]))
    out = {}
    for key, value in optimizer.state_dict().items():
        for auto, structured in names:
            if key.startswith(auto + "_"):
                key = structured + key[len(auto) :]
                break
        out[key] = value
    return out


def load_portable_optimizer_state(model, optimizer, state: dict) -> None:
    names = sorted(((n, p.name) for n, p in model.named_parameters()), key=lambda x: -len(x[0]))
    out = {}
    for key, value in state.items():
        for structured, auto in names:
            if key.startswith(structured + "_"):
                key = auto + key[len(structured) :]
                break
        out[key] = value
    optimizer.set_state_dict(out)
