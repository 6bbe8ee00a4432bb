"""Layered run configuration: dataclass defaults <- recipe YAML <- dotted ``key=value`` overrides.

Every key is declared here with its type; unknown keys and values of the wrong type fail with a
:class:`ConfigError` that names the key and lists what is valid.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = ["Config", "ConfigError", "load_config", "resolve_recipe", "list_recipes", "config_to_dict"]


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message says how to fix it."""


@dataclass
class DataConfig:
    format: Literal["csv", "folder", "jsonl", "voc", "coco"] = "csv"
    root: str = "."
    train: str = "train.csv"
    val: str | None = None
    test: str | None = None
    labels: list[str] | None = None
    image_column: str | None = None
    label_columns: list[str] | None = None
    labels_column: str | None = None
    label_delimiter: str = " "
    regression_columns: list[str] | None = None   # csv: numeric columns for an auxiliary regression head
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    generate: Literal["scenes"] | None = None
    image_size: int = 224
    resize: Literal["crop", "squish"] = "crop"
    # a preset, or a list of albumentations transforms: [{name: HorizontalFlip, p: 0.5}, ...]
    augment: Literal["none", "light", "flips", "medium", "strong"] | list[dict] = "light"
    # device: the preset runs as batched tensor ops on uint8 batches (GPU decoding of JPEGs when
    # uncached on CUDA); workers: per-image albumentations in the loader; auto: device when cached
    augment_on: Literal["auto", "workers", "device"] = "auto"
    on_bad_image: Literal["error", "skip"] = "error"   # skip: drop unreadable images, list them in skipped.csv
    cache: bool = False                 # decode every image once into a memory-mapped uint8 cache
    cache_dir: str | None = None        # default: $XDG_CACHE_HOME/mlabel or ~/.cache/mlabel
    batch_size: int = 64
    num_workers: int = 4
    pin_memory: bool | None = None      # null: on when training on CUDA
    persistent_workers: bool = True


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    pretrained: bool | str = True
    head: str = "linear"              # a name of mlabel.models.HEADS: linear, mlp, csra
    head_args: dict = field(default_factory=dict)  # the head's constructor arguments (over the keys below)
    drop_rate: float = 0.0
    head_hidden: int = 512            # mlp
    head_dropout: float = 0.2         # mlp
    csra_lambda: float = 0.1          # csra: weight of the attention-pooled score
    csra_temperature: float = 1.0     # csra: softmax temperature over locations (>= 99: max)


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.001
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_backbone_epochs: int = 0
    freeze_norm_stats: bool = False
    grad_clip: float | None = None
    channels_last: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA, fp32 on the CPU
    accumulate: int = 1               # optimizer step every N batches (effective batch N x batch_size)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    early_stop_patience: int = 0      # stop after N epochs without a better val mAP; 0 = never
    mixup_alpha: float = 0.0          # > 0: mixup with lambda ~ Beta(a, a); targets mixed with the same lambda
    cutmix_alpha: float = 0.0         # > 0: cutmix; with both, each batch picks one at random
    mix_prob: float = 1.0             # share of batches mixed
    ema: bool = False                 # keep an exponential moving average of the weights
    ema_decay: float = 0.999
    ema_warmup: bool = True           # decay ramps up as 1 - step ** (-2/3) early on (timm ModelEmaV3)
    compile: bool = False             # torch.compile the model for training


@dataclass
class LossConfig:
    name: str = "bce"                 # a name of mlabel.losses.LOSSES: bce, bce_prob, focal, asl, hinge
    args: dict = field(default_factory=dict)  # the loss's constructor arguments (over the keys below)
    pos_weight: Literal["auto", "none"] | list[float] = "auto"
    pos_weight_max: float = 10.0
    label_smoothing: float = 0.0      # bce, bce_prob
    eps: float = 1.0e-7               # bce_prob: probabilities clamped to [eps, 1 - eps]
    gamma: float = 2.0                # focal
    alpha: float | None = 0.25        # focal; null = no class balancing
    gamma_neg: float = 4.0            # asl
    gamma_pos: float = 0.0            # asl
    clip: float = 0.05                # asl: probability shift of negatives
    focal_grad: bool = False          # asl: gradient through the focusing weights (the paper: no)
    margin: float = 1.0               # hinge
    regression: Literal["mse", "l1"] = "mse"   # loss of data.regression_columns
    regression_weight: float = 1.0             # its weight in the sum with the classification loss


@dataclass
class ThresholdsConfig:
    metric: Literal["f1", "fbeta", "precision_at_recall", "recall_at_precision", "youden", "global"] = "f1"
    beta: float = 1.0             # fbeta
    min_recall: float = 0.9       # precision_at_recall
    min_precision: float = 0.9    # recall_at_precision
    # where each label's cut-off goes for unseen data (mlabel.policy; docs/THRESHOLDS.md)
    policy: Literal["auto", "argmax", "half", "lipton", "bagged", "smoothed", "shrunk", "select"] = "auto"
    bootstrap: int = 200          # resamples for each label's 90 % interval of its val objective; 0 = off
    mode: Literal["exact", "histogram"] = "exact"
    bins: int = 2048              # histogram mode
    cross_fit: int = 5            # folds for the cross-fitted F1 in metrics.json; 0 = off
    fallback: float = 0.5         # labels with one class in val


@dataclass
class CalibrationConfig:
    method: Literal["none", "temperature", "platt"] = "platt"


@dataclass
class LogConfig:
    tensorboard: bool = False         # write per-epoch scalars to out_dir/tensorboard (needs tensorboard)


@dataclass
class Config:
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool | str = False
    task: Literal["auto", "multilabel", "binary"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------- recipes

def _packaged_recipes() -> Path | None:
    """Recipes next to the source tree (checkout) or installed as ``mlabel.recipes``."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    try:
        return Path(str(resources.files("mlabel.recipes")))
    except ModuleNotFoundError:
        return None


def list_recipes() -> list[str]:
    folder = _packaged_recipes()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path, or a bare recipe name looked up in the shipped ``recipes/``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    folder = _packaged_recipes()
    candidate = folder / f"{name_or_path}.yaml" if folder else None
    if candidate is None or not candidate.is_file():
        raise ConfigError(
            f"unknown recipe {name_or_path!r}: give a YAML path or one of {list_recipes()}")
    return candidate


# --------------------------------------------------------------------------- type checks

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """Ints become floats where a float is declared, so the saved config is uniform."""
    if tp is float or (typing.get_origin(tp) in (Union, types.UnionType)
                       and float in typing.get_args(tp)):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


# --------------------------------------------------------------------------- merging

def _apply(obj: Any, key: str, value: Any, where: str, prefix: str = "") -> None:
    """Set dotted ``key`` on the dataclass tree ``obj``, checking the name and the type."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(obj))
    full = prefix + head
    if head not in hints:
        valid = ", ".join(sorted(hints))
        raise ConfigError(f"{where}: unknown key {full!r}; valid keys here: {valid}")
    tp = hints[head]
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, where, full + ".")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {full!r} is a section; give a mapping or use {full}.KEY=VALUE")
        for sub_key, sub_value in value.items():
            _apply(current, str(sub_key), sub_value, where, full + ".")
        return
    if rest and isinstance(current, dict):  # an argument dict: model.head_args.hidden=256
        setattr(obj, head, {**current, rest: value})
        return
    if rest:
        raise ConfigError(f"{where}: {full!r} is a value, not a section (got {prefix + key!r})")
    if not _matches(value, tp):
        raise ConfigError(f"{where}: {full!r} must be {_type_name(tp)}, got {value!r}")
    setattr(obj, head, _coerce(value, tp))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional recipe and ``key=value`` overrides."""
    config = Config()
    if recipe is not None:
        path = resolve_recipe(str(recipe))
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe {path} must be a mapping of keys, got {type(tree).__name__}")
        for key, value in tree.items():
            _apply(config, str(key), value, f"recipe {path}")
    for text in overrides:
        key, value = _parse_override(text)
        _apply(config, key, value, f"override {text!r}")
    _check(config)
    return config


def _check(config: Config) -> None:
    """Cross-field rules that the types alone cannot express."""
    if not 0 <= config.data.val_fraction < 1 or not 0 <= config.data.test_fraction < 1:
        raise ConfigError("data.val_fraction and data.test_fraction must lie in [0, 1)")
    if config.data.label_columns and config.data.labels_column:
        raise ConfigError("give either data.label_columns (0/1 columns) or data.labels_column "
                          "(one column of names), not both")
    if config.data.regression_columns:
        if config.data.format != "csv":
            raise ConfigError("data.regression_columns needs data.format: csv")
        both = set(config.data.regression_columns) & set(config.data.label_columns or ())
        if both:
            raise ConfigError(f"columns {sorted(both)} are in both data.label_columns and data.regression_columns")
    if config.thresholds.cross_fit == 1 or config.thresholds.cross_fit < 0:
        raise ConfigError("thresholds.cross_fit is a number of folds: 0 (off) or at least 2")
    _check_thresholds(config.thresholds)
    _check_parts(config)
    if config.train.accumulate < 1:
        raise ConfigError(f"train.accumulate must be >= 1, got {config.train.accumulate}")
    positive = {"train.epochs": config.train.epochs, "data.batch_size": config.data.batch_size,
                "data.image_size": config.data.image_size, "loss.pos_weight_max": config.loss.pos_weight_max}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


# The flat keys of the shipped heads, as their constructor arguments.
_HEAD_KEYS = {"mlp": {"hidden": "head_hidden", "dropout": "head_dropout"},
              "csra": {"lam": "csra_lambda", "temperature": "csra_temperature"}}


def head_kwargs(model: ModelConfig) -> dict:
    """The head's constructor arguments: its flat keys, then ``model.head_args``."""
    flat = {arg: getattr(model, key) for arg, key in _HEAD_KEYS.get(model.head, {}).items()}
    return {**flat, **model.head_args}


def loss_kwargs(loss: LossConfig) -> dict:
    """The loss's constructor arguments: the flat keys it takes, then ``loss.args``."""
    from ._registry import settable
    from .losses import LOSSES
    if loss.name not in LOSSES:
        return dict(loss.args)
    flat = {arg: getattr(loss, arg) for arg in settable(LOSSES[loss.name]) if hasattr(loss, arg)}
    return {**flat, **loss.args}


def threshold_kwargs(th: ThresholdsConfig) -> dict:
    """The threshold settings as the keyword arguments of :func:`mlabel.evaluate.calibrate_and_tune`."""
    return dict(policy=th.policy, metric=th.metric, mode=th.mode, bins=th.bins, bootstrap=th.bootstrap,
                fallback=th.fallback, beta=th.beta, min_recall=th.min_recall, min_precision=th.min_precision)


def cross_fit_kwargs(th: ThresholdsConfig) -> dict:
    """The threshold settings as the cross-fitting arguments of :func:`mlabel.evaluate.evaluate_outputs`."""
    return dict(cross_fit=th.cross_fit, policy=th.policy, metric=th.metric, fallback=th.fallback,
                beta=th.beta, min_recall=th.min_recall, min_precision=th.min_precision)


def _check_parts(config: Config) -> None:
    """Head and loss names and arguments, against the registries (before anything runs)."""
    from ._registry import checked
    from .losses import LOSSES
    from .models import HEADS
    for key, registry, name, kwargs, what in (
            ("model.head", HEADS, config.model.head, head_kwargs(config.model), "head"),
            ("loss.name", LOSSES, config.loss.name, loss_kwargs(config.loss), "loss")):
        try:
            checked(registry, name, kwargs, what)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None


def _check_thresholds(th: ThresholdsConfig) -> None:
    """Threshold settings are used only after training: check them before it starts."""
    from .policy import resolve_policy
    from .thresholds import _check_metric
    try:
        _check_metric(th.metric, th.beta, th.min_recall, th.min_precision)
        resolve_policy(th.policy, th.metric)
    except ValueError as err:
        raise ConfigError(f"thresholds: {err}") from None
    if th.bootstrap < 0:
        raise ConfigError(f"thresholds.bootstrap is a number of resamples: 0 (off) or more, got {th.bootstrap}")
    if th.bins < 2:
        raise ConfigError(f"thresholds.bins must be at least 2, got {th.bins}")
    if not 0.0 <= th.fallback <= 1.0:
        raise ConfigError(f"thresholds.fallback is a probability in [0, 1], got {th.fallback}")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(tree: dict) -> Config:
    config = Config()
    for key, value in tree.items():
        _apply(config, key, value, "saved config")
    return config
