"""Layered run configuration: dataclass defaults <- recipe YAML <- dotted ``key=value`` overrides.

Every key is declared here with its type; unknown keys and values of the wrong type fail with a
:class:`ConfigError` that names the key and lists what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
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


def _key(default: Any, help: str, range: str | None = None):
    """A config key: its default, a one-line meaning (``--help`` lists it) and, for numbers, the
    valid interval as text, e.g. ``"(0, inf)"`` or ``"[0, 1]"`` (checked by :func:`load_config`)."""
    meta = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    format: Literal["csv", "folder", "jsonl", "voc", "coco", "wds", "yolo", "labelstudio", "openimages", "hf"] = _key(
        "csv", "layout of the annotations; wds: WebDataset tar shards (python -m mlabel.data shard writes them); "
        "yolo: an Ultralytics data.yaml; labelstudio: Label Studio JSON exports (Choices); openimages: "
        "image-label CSVs (Confidence 1/0, the rest unknown); hf: a Hugging Face datasets folder (pip install mlabel[hf])")
    root: str = _key(".", "folder the image paths are relative to; yolo: the data set's data.yaml; hf: a save_to_disk, "
                     "imagefolder or parquet folder, or hf://datasets/OWNER/NAME (downloaded)")
    train: str = _key("train.csv", "training split: a csv/jsonl/json file, folder, annotation file or split name "
                      "(yolo: the yaml's train, val, test keys; the default train.csv means train there)")
    val: str | None = _key(None, "validation split; null: a seeded stratified share of train")
    test: str | None = _key(None, "test split; null: a share of train when test_fraction > 0, else none")
    labels: list[str] | None = _key(None, "label names and their order; null: from the data")
    label_file: str | None = _key(None, "a text file of the labels to train on, one name a line (openimages: or "
                                  "/m/ id), instead of data.labels; relative to data.root (yolo: the yaml's folder)")
    image_column: str | None = _key(None, "csv: the column of image paths; null: the first column; "
                                    "labelstudio: the task data key of the image; null: image, or the only key; "
                                    "hf: the Image column; null: the only one")
    class_descriptions: str | None = _key(
        None, "openimages: the class-descriptions CSV (LabelName,DisplayName), relative to data.root; null: "
        "found beside the labels CSV or in data.root")
    box_files: list[str] | None = _key(None, "openimages: box CSVs (ImageID,...,XMin,XMax,YMin,YMax) whose boxes "
                                       "feed data.box_crops, relative to data.root")
    label_columns: list[str] | None = _key(None, "csv, hf: 0/1 columns (empty or -1 = unknown); null: all others")
    labels_column: str | None = _key(None, "csv: one column of label names joined by label_delimiter; hf: the "
                                     "list (or class label) column; null: the only one")
    label_delimiter: str = _key(" ", "csv: separator inside labels_column")
    regression_columns: list[str] | None = _key(None, "csv: numeric columns for an auxiliary regression head")
    val_fraction: float = _key(0.2, "share of train held out for val when data.val is null", "[0, 1)")
    test_fraction: float = _key(0.0, "share of train held out for test when data.test is null", "[0, 1)")
    allow_overlap: bool = _key(False, "accept the same annotation file for two splits (refused otherwise)")
    generate: Literal["scenes"] | None = _key(None, "draw a synthetic data set (the quickstart) into the cache")
    image_size: int = _key(224, "side of the square network input in pixels", "[8, 4096]")
    resize: Literal["auto", "crop", "squish"] = _key(
        "auto", "crop: short side to size then centre crop; squish: stretch; auto: squish for multi-label, crop for binary")
    augment: Literal["auto", "none", "light", "flips", "medium", "strong"] | list[dict] = _key(
        "auto", "a preset or a list of albumentations transforms [{name: HorizontalFlip, p: 0.5}]; "
        "auto: light for a binary task, none for multi-label (a mirror image can change what a label means)")
    box_crops: bool | Literal["auto"] = _key(
        "auto", "random crops keep every labelled box (voc, coco, yolo, openimages with box_files); auto: on "
        "when the annotations give boxes")
    augment_on: Literal["auto", "workers", "device"] = _key(
        "auto", "device: batched tensor ops on uint8 batches; workers: albumentations per image; auto: device when cached")
    on_bad_image: Literal["error", "skip"] = _key("error", "skip: drop unreadable images, listed in skipped.csv")
    cache: bool | Literal["auto"] = _key(
        "auto", "decode every image once into a memory-mapped uint8 cache; auto: when it fits in 2 GiB (and RAM/8)")
    cache_dir: str | None = _key(None, "where caches and generated data go; null: $XDG_CACHE_HOME/mlabel or ~/.cache/mlabel")
    batch_size: int = _key(64, "images per batch (per process under torchrun)", "[1, 65536]")
    num_workers: int | Literal["auto"] = _key(
        "auto", "loader processes; auto: usable cores - 1, at most 4 (none with the cache on <= 2 cores)", "[0, 256]")
    pin_memory: bool | None = _key(None, "null: on when training on CUDA")
    persistent_workers: bool = _key(True, "keep loader processes between epochs")
    shuffle_buffer: int = _key(1000, "wds: samples each loader worker mixes while streaming its shards", "[1, 1000000]")


@dataclass
class ModelConfig:
    backbone: str = _key("resnet50", "a timm model name (mlabel models lists them)")
    pretrained: bool | str = _key("auto", "auto: an installed weights package, else timm's weights in the local "
                                  "Hugging Face cache, else a download when the hub answers (not with HF_HUB_OFFLINE=1), "
                                  "else from scratch, saying why; true: timm's hub; false; or a weights file or package name")
    head: str = _key("linear", "a name of mlabel.models.HEADS: linear, mlp, csra")
    head_args: dict = _key({}, "the head's constructor arguments (over the flat keys below)")
    drop_rate: float = _key(0.0, "dropout before the head", "[0, 1)")
    head_hidden: int = _key(512, "mlp: hidden width", "[1, 65536]")
    head_dropout: float = _key(0.2, "mlp: dropout", "[0, 1)")
    csra_lambda: float = _key(0.1, "csra: weight of the attention-pooled score", "[0, inf)")
    csra_temperature: float = _key(1.0, "csra: softmax temperature over locations (>= 99: max)", "(0, inf)")


@dataclass
class TrainConfig:
    epochs: int = _key(10, "passes over the training split", "[1, 100000]")
    lr: float = _key(0.001, "peak learning rate", "[0, inf)")
    optimizer: str = _key("adamw", "any optimizer timm.optim knows (timm.optim.list_optimizers()): adamw, sgd "
                                   "(Nesterov momentum), momentum, lamb, lars, lion, adan, ...")
    optimizer_args: dict = _key({}, "the optimizer's other arguments, e.g. train.optimizer_args.betas=[0.9,0.99]")
    layer_decay: float | None = _key(None, "backbone learning rate shrunk by this factor per layer from the head "
                                           "down (timm's layer groups); null: off", "(0, 1]")
    backbone_lr_scale: float = _key(1.0, "backbone learning rate as a share of lr", "[0, inf)")
    weight_decay: float = _key(0.05, "decoupled weight decay (not on norms and biases)", "[0, inf)")
    warmup_epochs: float = _key(1.0, "linear warmup length in epochs", "[0, inf)")
    freeze_backbone_epochs: int = _key(0, "train only the head for this many epochs", "[0, inf)")
    freeze_norm_stats: bool = _key(False, "keep the backbone's batch-norm statistics fixed")
    grad_clip: float | None = _key(None, "clip the gradient norm to this value; null: off", "(0, inf)")
    channels_last: bool = _key(True, "NHWC memory format (faster convolutions on GPUs and CPUs)")
    device: str = _key("auto", "auto, cpu, cuda, cuda:1 ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _key(
        "auto", "training precision; auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (evaluation: fp32 on CPUs)")
    accumulate: int = _key(1, "optimizer step every N batches (effective batch N x batch_size)", "[1, 4096]")
    schedule: Literal["auto", "cosine", "onecycle", "constant", "plateau"] = _key(
        "auto", "learning-rate schedule after warmup; plateau: constant until val mAP stalls, then cosine; "
        "auto: cosine from pretrained weights, plateau from scratch")
    checkpoint_every_steps: int = _key(0, "also checkpoint every N optimizer steps inside an epoch (long epochs); "
                                       "0: after each epoch only", "[0, inf)")
    early_stop_patience: int = _key(0, "stop after N epochs without a better val mAP; 0 = never", "[0, inf)")
    mixup_alpha: float = _key(0.0, "> 0: mixup with lambda ~ Beta(a, a), targets mixed alike", "[0, inf)")
    cutmix_alpha: float = _key(0.0, "> 0: cutmix; with both, each batch picks one", "[0, inf)")
    mix_prob: float = _key(1.0, "share of batches mixed", "[0, 1]")
    ema: bool = _key(False, "keep an exponential moving average of the weights")
    ema_decay: float = _key(0.999, "EMA decay per step", "[0, 1)")
    ema_warmup: bool = _key(True, "decay ramps up as 1 - step ** (-2/3) early on (timm ModelEmaV3)")
    compile: bool = _key(False, "torch.compile the model for training")


@dataclass
class LossConfig:
    name: str = _key("bce", "a name of mlabel.losses.LOSSES: bce, bce_prob, focal, asl, hinge")
    args: dict = _key({}, "the loss's constructor arguments (over the flat keys below)")
    pos_weight: Literal["auto", "sqrt", "none"] | list[float] = _key(
        "none", "auto: negatives/positives per label (capped); sqrt: its square root; none (the default: "
        "thresholds are tuned per label, and the weighting cost mAP on data it was not tuned for); or one value per label")
    pos_weight_max: float = _key(10.0, "cap of the automatic pos_weight", "(0, inf)")
    label_smoothing: float = _key(0.0, "bce, bce_prob: targets pulled towards 0.5 by this share", "[0, 1)")
    eps: float = _key(1.0e-7, "bce_prob: probabilities clamped to [eps, 1 - eps]", "(0, 0.5)")
    gamma: float = _key(2.0, "focal: focusing exponent", "[0, inf)")
    alpha: float | None = _key(0.25, "focal: weight of positives; null = no class balancing", "[0, 1]")
    gamma_neg: float = _key(4.0, "asl: focusing exponent of negatives", "[0, inf)")
    gamma_pos: float = _key(0.0, "asl: focusing exponent of positives", "[0, inf)")
    clip: float = _key(0.05, "asl: probability shift of negatives", "[0, 1)")
    focal_grad: bool = _key(False, "asl: gradient through the focusing weights (the paper: no)")
    margin: float = _key(1.0, "hinge: margin", "(0, inf)")
    regression: Literal["mse", "l1"] = _key("mse", "loss of data.regression_columns")
    regression_weight: float = _key(1.0, "its weight in the sum with the classification loss", "[0, inf)")


@dataclass
class ThresholdsConfig:
    metric: Literal["f1", "fbeta", "precision_at_recall", "recall_at_precision", "youden", "global"] = _key(
        "f1", "the objective each label's threshold maximises on val")
    beta: float = _key(1.0, "fbeta: weight of recall", "(0, inf)")
    min_recall: float = _key(0.9, "precision_at_recall: the recall to keep", "[0, 1]")
    min_precision: float = _key(0.9, "recall_at_precision: the precision to keep", "[0, 1]")
    policy: Literal["auto", "argmax", "half", "lipton", "bagged", "smoothed", "shrunk", "select"] = _key(
        "auto", "where each cut-off goes for unseen data (docs/THRESHOLDS.md)")
    bootstrap: int = _key(200, "resamples for each label's 90 % interval of its val objective; 0 = off", "[0, 10000]")
    mode: Literal["exact", "histogram"] = _key("exact", "exact: every score; histogram: binned (streaming)")
    bins: int = _key(2048, "histogram mode: bins per label", "[2, 65536]")
    cross_fit: int = _key(5, "folds for the cross-fitted F1 in metrics.json; 0 = off", "[0, 100]")
    streaming: bool | Literal["auto"] = _key(
        "auto", "val/test metrics and thresholds from per-label score histograms (thresholds.bins) merged across "
        "ranks, without the (N, L) scores (calibration fitted on the bins; no predictions/ or report); "
        "auto: when a split has more than 2e8 scores")
    fallback: float = _key(0.5, "threshold of labels with one class in val", "[0, 1]")


@dataclass
class CalibrationConfig:
    method: Literal["none", "temperature", "platt"] = _key("platt", "per-label probability calibration fitted on val")


@dataclass
class LogConfig:
    tensorboard: bool = _key(False, "write per-epoch scalars to out_dir/tensorboard (needs tensorboard)")


@dataclass
class Config:
    seed: int = _key(0, "seed of the split, the initialisation, augmentation and the bootstrap", "[0, 4294967295]")
    out_dir: str = _key("runs/default", "run directory; a finished run there is kept and -2, -3 ... is used")
    overwrite: bool = _key(False, "replace a finished run in out_dir instead of choosing a new directory")
    resume: bool | str = _key(False, "true: continue from out_dir's checkpoint; or a checkpoint path")
    task: Literal["auto", "multilabel", "binary"] = _key("auto", "auto: from the data (binary for two exclusive classes)")
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


def _shipped(name: str) -> bool:
    """Whether ``name`` is a shipped recipe (a folder of that name in the working directory, such
    as a run directory, does not hide it)."""
    folder = _packaged_recipes()
    return bool(folder) and (folder / f"{name}.yaml").is_file()


def resolve_recipe(name_or_path: str) -> Path:
    """A YAML path, or a bare recipe name looked up in the shipped ``recipes/``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or (path.exists() and not (path.is_dir() and _shipped(name_or_path))):
        if not path.exists():
            raise ConfigError(f"recipe file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"recipe {path} is not a regular file")
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
        raise ConfigError(f"{where}: unknown key {full!r}{_did_you_mean(prefix + key)}; valid keys here: {valid}")
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
        raise ConfigError(f"{where}: {full!r} must be {_type_name(tp)}, got {value!r}{_closest_choice(value, tp)}")
    setattr(obj, head, _coerce(value, tp))


def all_keys(obj: Any = None, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every dotted key of the config tree, with its dataclass field and declared type."""
    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    keys = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.update(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys[prefix + f.name] = (f, hints[f.name])
    return keys


def _did_you_mean(key: str) -> str:
    """`` (did you mean 'train.epochs'?)`` for a misspelt or misplaced dotted key, else ``""``."""
    keys = list(all_keys())
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # the right name in the wrong section: epochs -> train.epochs
        leaf = key.rpartition(".")[2]
        close = [k for k in keys if k.rpartition(".")[2] == leaf][:1] or \
            [k for k in keys if k.rpartition(".")[2] in difflib.get_close_matches(
                leaf, [k.rpartition(".")[2] for k in keys], n=1, cutoff=0.75)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _closest_choice(value: Any, tp: Any) -> str:
    choices = [a for a in _literals(tp) if isinstance(a, str)]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _literals(tp: Any) -> list:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return list(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return [a for arg in typing.get_args(tp) for a in _literals(arg)]
    return []


# --------------------------------------------------------------------------- ranges and help

def _interval(text: str) -> tuple[float, float, bool, bool]:
    """``"[0, 1)"`` -> (0.0, 1.0, True, False): the bounds and whether each is included."""
    low, high = (float(part.strip(" [()]")) for part in text.split(","))
    return low, high, text.startswith("["), text.endswith("]")


def _in_range(value: float, text: str) -> bool:
    low, high, low_in, high_in = _interval(text)
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def _check_ranges(config: Config) -> None:
    """Every number against the interval declared with its key, e.g. train.lr in (0, inf)."""
    tree = dataclasses.asdict(config)
    for key, (f, _) in all_keys(config).items():
        text = f.metadata.get("range")
        value = _lookup(tree, key)
        if text is None or value is None or isinstance(value, (bool, str)):  # "auto" is decided later
            continue
        if not _in_range(value, text):
            raise ConfigError(f"{key} must lie in {text}, got {value!r}")
    weights = config.loss.pos_weight
    if isinstance(weights, list) and not all(0 < w < math.inf for w in weights):
        raise ConfigError(f"loss.pos_weight values must be positive and finite, got {weights}")


def _lookup(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def describe_keys(config: Config | None = None) -> str:
    """One line per key: name, type, value (the recipe's where given), meaning and valid range."""
    config = Config() if config is None else config
    tree = dataclasses.asdict(config)
    rows = []
    for key, (f, tp) in all_keys(config).items():
        kind = _type_name(tp) + (f" in {f.metadata['range']}" if f.metadata.get("range") else "")
        value = yaml.safe_dump(_lookup(tree, key), default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((key, value, f"{f.metadata.get('help', '')} [{kind}]"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}} = {v:<12} {text}" for k, v, text in rows)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_BoundedLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


MAX_YAML_NODES = 100_000  # a recipe is a few hundred nodes; aliases could expand a few bytes to billions


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that refuses documents whose aliases expand beyond :data:`MAX_YAML_NODES`."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # expanded node count, each shared node measured once
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a cycle counts as nothing more
                children = n.value if isinstance(n, yaml.SequenceNode) else \
                    [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else []
                sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if node is not None and size(node) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values")
        return node


def yaml_problem(path: Path, err: yaml.YAMLError, what: str) -> str:
    """One line for a YAML syntax error: the file and line, PyYAML's problem and the fix (PyYAML's
    own message spans several lines, quoting the text around the error)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    return (f"{what} {where} is not valid YAML ({problem}); fix that line (a key: value per line, "
            "lists in [a, b], text with ':' or '#' in quotes)")


def read_yaml(path: Path, what: str = "recipe") -> Any:
    """A recipe or saved config (``what`` names it in errors): a regular file of safe YAML with
    bounded alias expansion."""
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file")
    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml.load(fh, Loader=_BoundedLoader)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_problem(path, err, what)) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if tree is None:  # an empty file would silently mean the defaults: the embedded quickstart data
        raise ConfigError(f"{what} {path} is empty (no keys): write the keys it changes (e.g. data.root: ...), or "
                          "leave the recipe out to use the defaults")
    return tree


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional recipe and ``key=value`` overrides,
    checked against the schema; :func:`mlabel.checks.load_checked` also checks it against the
    registries and timm, as every command does."""
    config = Config()
    if recipe is not None:
        path = resolve_recipe(str(recipe))
        tree = read_yaml(path)
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
    """Ranges, then the cross-field rules that the types alone cannot express (the checks against
    the registries and timm are :func:`mlabel.checks.check_config`'s)."""
    _check_ranges(config)
    if config.data.labels is not None and config.data.label_file:
        raise ConfigError("give either data.labels or data.label_file (a file listing them), not both")
    if config.data.label_columns and config.data.labels_column:
        raise ConfigError("give either data.label_columns (0/1 columns) or data.labels_column "
                          "(one column of names), not both")
    for key in ("labels", "label_columns", "regression_columns"):
        names = getattr(config.data, key) or []
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"data.{key} names {repeated} more than once; list each once")
    if config.data.regression_columns:
        if config.data.format != "csv":
            raise ConfigError("data.regression_columns needs data.format: csv")
        both = set(config.data.regression_columns) & set(config.data.label_columns or ())
        if both:
            raise ConfigError(f"columns {sorted(both)} are in both data.label_columns and data.regression_columns")
    if config.data.format == "wds":
        _check_wds(config.data)
    if config.thresholds.cross_fit == 1:
        raise ConfigError("thresholds.cross_fit is a number of folds: 0 (off) or at least 2")


def _check_wds(data: DataConfig) -> None:
    """What WebDataset shards cannot do: they hold images and labels, streamed."""
    if data.cache is True:
        raise ConfigError("data.cache=true decodes image files into a cache; wds shards are streamed and "
                          "decoded in the loader workers: set data.cache=false (or auto)")
    for key in ("image_column", "label_columns", "labels_column", "regression_columns"):
        if getattr(data, key):
            raise ConfigError(f"data.{key} is a csv key; wds shards carry their labels in each sample's JSON")


# The flat keys of the shipped heads, as their constructor arguments.
_HEAD_KEYS = {"mlp": {"hidden": "head_hidden", "dropout": "head_dropout"},
              "csra": {"lam": "csra_lambda", "temperature": "csra_temperature"}}


def head_kwargs(model: ModelConfig) -> dict:
    """The head's constructor arguments: its flat keys, then ``model.head_args``."""
    flat = {arg: getattr(model, key) for arg, key in _HEAD_KEYS.get(model.head, {}).items()}
    return {**flat, **model.head_args}


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(tree: dict) -> Config:
    config = Config()
    for key, value in tree.items():
        _apply(config, key, value, "saved config")
    return config
