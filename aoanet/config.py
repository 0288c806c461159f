"""Training configuration: YAML files validated when loaded.

A config has the sections ``data``, ``model``, ``train``, ``val`` and ``scst``. Keys use the reference's option
names where it has one (``learning_rate_decay_every``, ``scheduled_sampling_max_prob``, ``label_smoothing``, …).
Unknown keys and wrong types are errors naming the key, and so are values out of range (NaN and infinite numbers
included); ``--set section.key=value`` overrides are parsed as YAML scalars and checked the same way.
``_base_: other.yml`` inherits another file (paths relative to the file); a cycle of ``_base_`` files is an error
naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aoanet.model.options import ModelOptions


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    input_json: str = "data/cocotalk.json"
    input_label_h5: str = "data/cocotalk_label.h5"
    input_att_dir: str = "data/cocobu_att"
    input_fc_dir: str = ""  # accepted for compatibility; AoANet does not use fc features
    input_box_dir: str = ""  # accepted for compatibility; AoANet does not use boxes
    # Raw references for the language metrics: Karpathy's dataset_coco.json or a COCO captions annotation file.
    references_json: str = "data/dataset_coco.json"
    # Training-split n-gram document frequencies for the CIDEr-D reward (aoanet-data ngrams).
    cached_tokens: str = "data/coco-train-ngrams.json.gz"
    train_only: bool = False  # False: restval joins train (113,287 images on COCO)
    seq_per_img: int = 5
    num_workers: int = 2


@dataclass
class TrainConfig:
    checkpoint_path: str = "log/aoanet"
    seed: int = 123
    batch_size: int = 10  # images per iteration (x seq_per_img captions)
    max_epochs: int = 25
    max_iters: int = -1  # stop after this many iterations in total (-1: no limit)
    learning_rate: float = 2e-4
    learning_rate_decay_start: int = 0  # -1: no decay
    learning_rate_decay_every: int = 3
    learning_rate_decay_rate: float = 0.8
    optim_alpha: float = 0.9
    optim_beta: float = 0.999
    optim_epsilon: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_mode: str = "value"  # value (the reference) | norm
    grad_clip: float = 0.1
    label_smoothing: float = 0.2
    scheduled_sampling_start: int = 0  # -1: off
    scheduled_sampling_increase_every: int = 5
    scheduled_sampling_increase_prob: float = 0.05
    scheduled_sampling_max_prob: float = 0.5
    save_checkpoint_every: int = 6000  # iterations; -1: at the end of every epoch
    losses_log_every: int = 25
    num_threads: int = 0  # CPU threads for Paddle; 0: all cores (shared among the ranks of a machine)
    amp: str = "none"  # mixed precision: none | bf16 | fp16 (GPU only; see aoanet.train.amp)


@dataclass
class ValConfig:
    val_images_use: int = -1  # -1: the whole split
    beam_size: int = 1  # the reference validates with greedy decoding
    max_length: int = 20
    batch_size: int = 50
    language_eval: bool = True


@dataclass
class ScstConfig:
    train_sample_n: int = 5
    baseline: str = "greedy"  # greedy (the authors' SCST) | new_self_critical (mean of the other samples)
    max_length: int = 20
    temperature: float = 1.0
    reduce_on_plateau: bool = True
    reduce_on_plateau_factor: float = 0.5
    reduce_on_plateau_patience: int = 3
    cider_weight: float = 1.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # ModelOptions fields; validated by ModelOptions.from_dict
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)

    def model_options(self) -> ModelOptions:
        return ModelOptions.from_dict(self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "val": ValConfig, "scst": ScstConfig}
CHOICES = {
    ("train", "grad_clip_mode"): ("value", "norm"),
    ("train", "amp"): ("none", "bf16", "fp16"),
    ("scst", "baseline"): ("greedy", "new_self_critical"),
}


def _coerce(where: str, value, typ):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def from_dict(raw: dict, source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    allowed = set(SECTIONS) | {"model"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(unknown)}; sections are {', '.join(sorted(allowed))}"
        )
    cfg = Config()
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name} must be a mapping")
        hints = typing.get_type_hints(cls)
        section = getattr(cfg, name)
        for key, value in values.items():
            where = f"{source}: {name}.{key}"
            if key not in hints:
                raise ConfigError(f"{where} is not a known key; known: {', '.join(sorted(hints))}")
            value = _coerce(where, value, hints[key])
            choices = CHOICES.get((name, key))
            if choices and value not in choices:
                raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
            setattr(section, key, value)
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: section model must be a mapping")
    try:
        ModelOptions.from_dict(model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: model: {e}") from e
    cfg.model = dict(model)
    _check_values(cfg, source)
    return cfg


def _check_values(cfg: Config, source: str) -> None:
    t, v, sc, d = cfg.train, cfg.val, cfg.scst, cfg.data
    positive = [
        ("data.seq_per_img", d.seq_per_img), ("train.batch_size", t.batch_size),
        ("train.learning_rate", t.learning_rate), ("val.batch_size", v.batch_size),
        ("val.beam_size", v.beam_size), ("val.max_length", v.max_length),
        ("scst.train_sample_n", sc.train_sample_n), ("scst.max_length", sc.max_length),
        ("train.scheduled_sampling_increase_every", t.scheduled_sampling_increase_every),
        ("train.learning_rate_decay_every", t.learning_rate_decay_every),
        ("train.max_epochs", t.max_epochs), ("train.losses_log_every", t.losses_log_every),
        ("train.learning_rate_decay_rate", t.learning_rate_decay_rate), ("train.optim_epsilon", t.optim_epsilon),
        # Paddle's gradient clipping asserts on a bound <= 0 (value mode: [-clip, clip])
        ("train.grad_clip", t.grad_clip), ("scst.temperature", sc.temperature),
    ]
    for where, value in positive:
        if value <= 0:
            raise ConfigError(f"{source}: {where} must be > 0, got {value}")
    non_negative = [
        ("data.num_workers", d.num_workers), ("train.weight_decay", t.weight_decay), ("train.seed", t.seed),
        ("train.num_threads", t.num_threads), ("scst.reduce_on_plateau_patience", sc.reduce_on_plateau_patience),
        ("scst.cider_weight", sc.cider_weight),
    ]
    for where, value in non_negative:
        if value < 0:
            raise ConfigError(f"{source}: {where} must be >= 0, got {value}")
    unit = [
        ("train.optim_alpha", t.optim_alpha, False), ("train.optim_beta", t.optim_beta, False),
        ("train.label_smoothing", t.label_smoothing, False),
        ("train.scheduled_sampling_increase_prob", t.scheduled_sampling_increase_prob, True),
        ("train.scheduled_sampling_max_prob", t.scheduled_sampling_max_prob, True),
    ]
    for where, value, closed in unit:
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            raise ConfigError(f"{source}: {where} must be in [0, 1{']' if closed else ')'}, got {value}")
    if not 0.0 < sc.reduce_on_plateau_factor < 1.0:
        raise ConfigError(f"{source}: scst.reduce_on_plateau_factor must be in (0, 1), got "
                          f"{sc.reduce_on_plateau_factor}")
    for where, value in (("train.max_iters", t.max_iters), ("val.val_images_use", v.val_images_use)):
        if value == 0 or value < -1:
            raise ConfigError(f"{source}: {where} must be >= 1, or -1 (no limit), got {value}")
    if sc.baseline == "new_self_critical" and sc.train_sample_n < 2:
        raise ConfigError(f"{source}: scst.baseline new_self_critical needs scst.train_sample_n >= 2")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(path):], path))
        raise ConfigError(f"_base_ files form a cycle: {cycle}")
    if not path.is_file():
        where = f" (the _base_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("_base_", None)
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _base_ must be a file name, got {base!r}")
        raw = _merge(_read_yaml(path.parent / base, (*chain, path)), raw)
    return raw


def parse_overrides(items: list[str]) -> dict:
    """['train.learning_rate=1e-4', 'model.rnn_size=512'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: the key must be section.key (e.g. train.learning_rate)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not a YAML scalar ({e})") from None
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"--set {item!r}: {parts[0]} is not a section")
        section[parts[1]] = parsed
    return out


def load_config(path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    raw = _merge(_read_yaml(path), parse_overrides(overrides or []))
    return from_dict(raw, source=str(path))


def config_from_text(text: str, source: str) -> Config:
    """A resolved config (a checkpoint's config.yml, no ``_base_``) from its text."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    return from_dict(raw, source=source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
