"""Model options, with the reference's option names and the authors' AoA recipe as defaults (docs/model.md,
"Options")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelOptions:
    rnn_size: int = 1024
    input_encoding_size: int = 1024
    att_feat_size: int = 2048
    num_heads: int = 8
    refine: int = 1
    refine_aoa: int = 1
    use_ff: int = 0
    ctx_drop: int = 1
    dropout_aoa: float = 0.3
    drop_prob_lm: float = 0.5
    out_res: int = 0
    # The attention-probability, refiner residual and feed-forward dropouts, hard-coded to 0.1 in the authors'
    # code (not one of their options). A dropout has no parameters: this changes no weight name or shape.
    attention_dropout: float = 0.1
    # The authors hard-code 6 refiner layers; the seed's Paddle reproduction used 4.
    refine_layers: int = 6
    # Accepted for compatibility with the reference's option files; only the values of the AoA model are supported.
    caption_model: str = "aoa"
    decoder_type: str = "AoA"
    use_multi_head: int = 2
    multi_head_scale: int = 1
    mean_feats: int = 1
    num_layers: int = 2
    use_bn: int = 0
    logit_layers: int = 1

    def __post_init__(self):
        _check_options(self)

    @classmethod
    def from_dict(cls, options: dict) -> ModelOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown model option(s): {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)


_FIXED = {
    "caption_model": "aoa",
    "decoder_type": "AoA",
    "use_multi_head": 2,
    "multi_head_scale": 1,
    "mean_feats": 1,
    "num_layers": 2,
    "use_bn": 0,
    "logit_layers": 1,
}


def _check_options(o: ModelOptions) -> None:
    for f in fields(o):
        value = getattr(o, f.name)
        expected = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            raise TypeError(f"model option {f.name} must be {expected.__name__}, got {value!r}")
    for name, value in _FIXED.items():
        if getattr(o, name) != value:
            raise ValueError(
                f"model option {name}={getattr(o, name)!r} is not supported; only {value!r} (the AoA model)"
            )
    for name in ("rnn_size", "input_encoding_size", "att_feat_size", "num_heads"):
        if getattr(o, name) < 1:
            raise ValueError(f"model option {name} must be >= 1, got {getattr(o, name)}")
    if o.rnn_size % o.num_heads:
        raise ValueError(f"rnn_size {o.rnn_size} must be divisible by num_heads {o.num_heads}")
    if o.refine_layers < 0:
        raise ValueError(f"refine_layers must be >= 0, got {o.refine_layers}")
    for name in ("dropout_aoa", "drop_prob_lm", "attention_dropout"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ValueError(f"model option {name} must be in [0, 1), got {getattr(o, name)}")
    for name in ("refine", "refine_aoa", "use_ff", "ctx_drop", "out_res"):
        if getattr(o, name) not in (0, 1):
            raise ValueError(f"model option {name} must be 0 or 1, got {getattr(o, name)}")
