"""The ``auto`` values of a config, decided from the data and the machine before training, and
said: every choice prints one ``defaults:`` line with its reason, and the saved ``config.yaml``
holds the decided values, so a rerun trains the same way.

- ``data.resize``: ``squish`` for multi-label data (the whole image is kept, so no labelled object
  is cut away by a centre crop), ``crop`` for a binary task (one subject, usually centred).
- ``data.num_workers``: the cores this process may use, less one for training, at most 4.
- ``model.pretrained``: the offline weights installed for the backbone (``mlabel models`` lists
  them), else from scratch. ``auto`` never downloads; ``true`` asks timm's hub.
"""
from __future__ import annotations

import os
from typing import Callable

__all__ = ["resolve_defaults", "usable_cores", "loader_workers"]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(value) -> int:
    """``data.num_workers`` as a number: ``auto`` is the usable cores less one, at most 4."""
    return max(0, min(4, usable_cores() - 1)) if value == "auto" else int(value)


def resolve_defaults(cfg, task: str, log: Callable[[str], None]) -> None:
    """Replace every ``auto`` of ``cfg`` that the data or the machine decides, in place."""
    data, model = cfg.data, cfg.model
    if data.resize == "auto":
        data.resize = "squish" if task == "multilabel" else "crop"
        reason = "multi-label: keep the whole image, so no labelled object is cropped away" \
            if task == "multilabel" else "binary: one subject, centre-cropped as pretrained models saw it"
        log(f"defaults: data.resize={data.resize} ({reason})")
    if data.num_workers == "auto":
        data.num_workers = loader_workers("auto")
        log(f"defaults: data.num_workers={data.num_workers} ({usable_cores()} usable cores, one left for training)")
    if model.pretrained == "auto":
        from .weights import offline_weights
        package = offline_weights().get(model.backbone)
        model.pretrained = package or False
        log(f"defaults: model.pretrained={model.pretrained} (" + (
            f"ImageNet weights installed offline for {model.backbone}" if package else
            f"no offline weights for {model.backbone} on this machine: from scratch, nothing downloaded; "
            "model.pretrained=true fetches timm's") + ")")
