"""The config checks that need the registries and timm: a backbone timm knows, heads and losses
with the arguments they take, an optimizer of timm's factory, a threshold objective and policy.

:mod:`mlabel.config` checks keys, types, ranges and the cross-field rules with nothing but the
standard library and YAML; the checks here sit beside what they check (the registries live in
:mod:`mlabel.models`, :mod:`mlabel.losses`, :mod:`mlabel.engine`, :mod:`mlabel.policy`).
:func:`load_checked` is what every command calls on user input.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import timm

from ._registry import checked
from .config import Config, ConfigError, LossConfig, ModelConfig, ThresholdsConfig, TrainConfig, head_kwargs, load_config
from .cutoffs import check_metric
from .engine import check_optimizer
from .losses import LOSSES, loss_kwargs
from .models import HEADS
from .policy import resolve_policy
from .weights import check_pretrained

__all__ = ["check_config", "load_checked"]


def load_checked(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`~mlabel.config.Config` as every command does: from defaults, an optional
    recipe and ``key=value`` overrides, checked against the schema (:func:`mlabel.config.load_config`),
    then against timm and the registries (:func:`check_config`)."""
    config = load_config(recipe, list(overrides))
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """Threshold settings, head and loss, optimizer and backbone, each against its registry
    (before anything runs); a :class:`~mlabel.config.ConfigError` names the key and the fix."""
    check_thresholds(config.thresholds)
    check_parts(config.model, config.loss)
    check_optimizer_keys(config.train)
    check_backbone(config.model)


def check_thresholds(th: ThresholdsConfig) -> None:
    """Threshold settings are used only after training: check them before it starts."""
    try:
        check_metric(th.metric, th.beta, th.min_recall, th.min_precision)
        resolve_policy(th.policy, th.metric)
    except ValueError as err:
        raise ConfigError(f"thresholds: {err}") from None


def check_parts(model: ModelConfig, loss: LossConfig) -> None:
    """Head and loss names and arguments (the ``model`` and ``loss`` sections), against the registries."""
    for key, registry, name, kwargs, what in (
            ("model.head", HEADS, model.head, head_kwargs(model), "head"),
            ("loss.name", LOSSES, loss.name, loss_kwargs(loss), "loss")):
        try:
            checked(registry, name, kwargs, what)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None


def check_optimizer_keys(train: TrainConfig) -> None:
    """``train.optimizer`` a name timm's factory knows, ``train.optimizer_args`` arguments it takes."""
    try:
        check_optimizer(train.optimizer, train.optimizer_args)
    except ValueError as err:
        raise ConfigError(f"train.optimizer: {err}") from None


def check_backbone(model: ModelConfig) -> None:
    """A backbone timm knows, and offline weights that exist (hub names only with pretrained=true)."""
    name = model.backbone
    if name.split(":", 1)[0] in ("hf-hub", "hf_hub"):
        if model.pretrained is not True:
            raise ConfigError(f"model.backbone={name} is read from the Hugging Face hub; that needs "
                              "model.pretrained=true (a download), or use a plain timm name")
    elif not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.backbone: timm {timm.__version__} has no model {name!r}{hint}; "
                          "mlabel models PATTERN lists them")
    if isinstance(model.pretrained, str) and model.pretrained != "auto":
        try:
            check_pretrained(model.pretrained)
        except ValueError as err:
            raise ConfigError(str(err)) from None
