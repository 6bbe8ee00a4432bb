"""A config resolved once: :func:`resolve` decides every ``auto`` of a :class:`~mlabel.config.Config`
from the data (its :class:`~mlabel.data.Splits`) and the :class:`Machine`, and returns a frozen
:class:`ResolvedConfig` that everything after it reads; nothing re-decides or assigns a value.

What each ``auto`` becomes:

- ``data.resize``, ``data.augment``, ``data.box_crops``, ``data.cache``, ``data.num_workers``,
  ``model.pretrained``, ``train.schedule``, ``train.precision``: :func:`mlabel.defaults.resolve_defaults`
  decides them and says so in one ``defaults:`` line each.
- ``task``: the data's task; ``train.device``: the device this process runs on.
- ``data.augment_on``: ``device`` or ``workers`` (:func:`mlabel.data.loaders.augment_on`).
- ``loss.pos_weight``: ``auto`` names a rule computed from the training split's label counts
  after its images are checked, so it resolves to the rule's name, ``ratio`` (``sqrt`` stays).
- ``thresholds.policy``: the policy the objective's measured default is (``lipton`` for F-scores,
  else ``argmax``); :attr:`ResolvedConfig.decided` keeps that it was chosen, so metrics.json
  still names it ``auto (lipton)``.
- ``thresholds.streaming``: true when a val or test split holds more than
  :data:`STREAM_LIMIT` scores (for a training run; a command that scores one split, that split).
- ``data.root`` of a generated data set: the folder it was drawn into; ``out_dir``: the run
  directory claimed for the run (given to :func:`resolve` in the config).

``config.yaml`` and the checkpoints keep what the user asked for the keys decided again on each
machine and data (:data:`ASKED_KEYS`) and the decided value of the others (:func:`saved_config`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .config import (CalibrationConfig, Config, DataConfig, LogConfig, LossConfig, ModelConfig, ThresholdsConfig,
                     TrainConfig)
from .data import build_splits
from .data.loaders import augment_on
from .data.synthetic import scenes_root
from .defaults import resolve_defaults, usable_cores
from .policy import resolve_policy
from .weights import resolve_auto_pretrained

__all__ = ["ASKED_KEYS", "Machine", "ResolvedConfig", "STREAM_LIMIT", "resolve", "resolve_for_model", "saved_config"]

STREAM_LIMIT = 2 * 10**8  # scores of a scored split past which thresholds.streaming=auto streams

# Keys config.yaml saves as the user gave them: decided again by every run on its own machine and data.
ASKED_KEYS = ("task", "train.device", "data.augment_on", "loss.pos_weight", "thresholds.policy", "thresholds.streaming")


@dataclass(frozen=True)
class Machine:
    """Where the run executes: this process's ``device`` (a ``torch.device``), the CPU ``cores``
    it may use, the ``world_size`` of processes training together, and whether ``model.pretrained=auto``
    may ask the Hugging Face ``hub`` (not when a trained model is scored: its weights are loaded)."""
    device: Any
    cores: int
    world_size: int = 1
    hub: bool = True

    @classmethod
    def here(cls, device, world_size: int = 1, hub: bool = True) -> "Machine":
        return cls(device, usable_cores(), world_size, hub)


class _Frozen:
    """Assigning or deleting an attribute raises: a resolved value is read, never re-decided."""

    def __setattr__(self, name: str, value) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: the resolved config is frozen")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}: the resolved config is frozen")


class ResolvedDataConfig(_Frozen, DataConfig):
    """The ``data`` section, resolved and frozen."""


class ResolvedModelConfig(_Frozen, ModelConfig):
    """The ``model`` section, resolved and frozen."""


class ResolvedTrainConfig(_Frozen, TrainConfig):
    """The ``train`` section, resolved and frozen."""


class ResolvedLossConfig(_Frozen, LossConfig):
    """The ``loss`` section, resolved and frozen."""


class ResolvedThresholdsConfig(_Frozen, ThresholdsConfig):
    """The ``thresholds`` section, resolved and frozen."""


class ResolvedCalibrationConfig(_Frozen, CalibrationConfig):
    """The ``calibration`` section, resolved and frozen."""


class ResolvedLogConfig(_Frozen, LogConfig):
    """The ``log`` section, resolved and frozen."""


class ResolvedConfig(_Frozen, Config):
    """A :class:`~mlabel.config.Config` with no ``auto`` left, frozen (each section too). Its
    sections are still instances of the config's section classes. ``decided``: the dotted keys
    that were ``auto`` and were decided by :func:`resolve`."""
    decided: frozenset


_FROZEN = {DataConfig: ResolvedDataConfig, ModelConfig: ResolvedModelConfig, TrainConfig: ResolvedTrainConfig,
           LossConfig: ResolvedLossConfig, ThresholdsConfig: ResolvedThresholdsConfig,
           CalibrationConfig: ResolvedCalibrationConfig, LogConfig: ResolvedLogConfig, Config: ResolvedConfig}


def _freeze(obj):
    """A frozen copy of the config tree ``obj`` (the values deep-copied, so nothing is shared)."""
    frozen = object.__new__(_FROZEN[type(obj)])
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        object.__setattr__(frozen, f.name, _freeze(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value))
    return frozen


def resolve(config: Config, splits, machine: Machine, log: Callable[[str], None] | None = None,
            scored: tuple[str, ...] = ("val", "test")) -> ResolvedConfig:
    """Every ``auto`` of ``config`` decided from ``splits`` (:class:`mlabel.data.Splits`) and
    ``machine``, each default said in one ``defaults:`` line to ``log``; ``config`` is left as it
    is. ``scored``: the splits that will be scored (their sizes decide ``thresholds.streaming``)."""
    draft = copy.deepcopy(config)
    tables = [t for t in (splits.train, splits.val, splits.test) if t is not None]
    if draft.data.generate:  # config.yaml (and the checkpoint) name the folder the generated set was drawn into
        draft.data.root = str(scenes_root(draft.data.root, draft.data.cache_dir))
    if draft.model.pretrained == "auto" and not machine.hub:
        draft.model.pretrained = resolve_auto_pretrained(draft.model.backbone, probe=False)[0]
    resolve_defaults(draft, splits.task, log or (lambda text: None), images=sum(len(t) for t in tables),
                     boxes=splits.train.boxes is not None, device=machine.device, cores=machine.cores)
    decided = {key for key in ASKED_KEYS if _get(draft, key) == "auto"}
    _resolve_rest(draft, splits, machine, scored)
    resolved = _freeze(draft)
    object.__setattr__(resolved, "decided", frozenset(decided))
    return resolved


def _resolve_rest(draft: Config, splits, machine: Machine, scored: tuple[str, ...]) -> None:
    """The ``auto`` values no ``defaults:`` line reports, decided on the private ``draft``."""
    if draft.task == "auto":
        draft.task = splits.task
    if draft.train.device == "auto":
        draft.train.device = str(machine.device)
    draft.data.augment_on = augment_on(draft.data, machine.device)
    if draft.loss.pos_weight == "auto":
        draft.loss.pos_weight = "ratio"
    draft.thresholds.policy = resolve_policy(draft.thresholds.policy, draft.thresholds.metric)
    if draft.thresholds.streaming == "auto":
        tables = [getattr(splits, name) for name in scored]
        scores = [len(t) * len(splits.labels) for t in tables if t is not None]
        draft.thresholds.streaming = any(n > STREAM_LIMIT for n in scores)


def resolve_for_model(config: Config, model, device, scored: tuple[str, ...]) -> tuple[ResolvedConfig, object]:
    """For scoring a trained ``model`` on the ``scored`` splits (evaluate, tune, a report rebuilt):
    the splits of ``config``'s data read with the model's task (``task=auto``), and ``config``
    resolved on them, quietly, asking no hub."""
    splits = build_splits(config.data, model.task if config.task == "auto" else config.task, config.seed)
    return resolve(config, splits, Machine.here(device, hub=False), scored=scored), splits


def _get(tree, key: str):
    """The value of the dotted ``key`` in the config tree ``tree``."""
    for part in key.split("."):
        tree = getattr(tree, part)
    return tree


def saved_config(config: Config, resolved: ResolvedConfig) -> dict:
    """The tree ``config.yaml`` and the checkpoints hold: the resolved values, but the keys of
    :data:`ASKED_KEYS` as ``config`` (the config as given) has them."""
    tree = dataclasses.asdict(resolved)
    for key in ASKED_KEYS:
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = copy.deepcopy(_get(config, key))
    return tree
