"""What a model predicts and what it is trained against, by name.

A model's :meth:`~mlabel.models.MultiLabelClassifier.outputs` is an :class:`Outputs`: the label
``logits`` (N, L) and, for a model with regression targets (``data.regression_columns``), the
standardised ``regression`` outputs (N, R); the data yields :class:`Targets`: the label targets
(N, L; 1 / 0 / -1 unknown, fractions after mixup) and the ``regression`` targets (N, R, in their
own units, NaN = missing). ``regression`` is None when there are none. Losses, mixup, metrics and
the saved predictions use these names, never column offsets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Outputs", "Targets", "as_targets", "collate", "concat", "map_fields"]


def map_fields(pair, fn):
    """``fn`` applied to each field of a named pair that is not None."""
    return type(pair)(*(None if x is None else fn(x) for x in pair))


class Outputs(NamedTuple):
    logits: torch.Tensor
    regression: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Outputs":
        return map_fields(self, lambda x: x.to(device, non_blocking=non_blocking))

    def float(self) -> "Outputs":
        return map_fields(self, lambda x: x.float())


class Targets(NamedTuple):
    labels: torch.Tensor
    regression: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return map_fields(self, lambda x: x.to(device, non_blocking=non_blocking))


def as_targets(targets) -> Targets:
    """A loader's targets by name: a plain (N, L) tensor (a user's own loader) holds the labels."""
    return targets if isinstance(targets, Targets) else Targets(targets)


def _join(parts: list, join):
    """Named pairs of one type joined field by field with ``join`` (a field None in the first is None)."""
    first = parts[0]
    return type(first)(*(None if field is None else join([p[k] for p in parts]) for k, field in enumerate(first)))


def concat(parts: list):
    """Batches of :class:`Outputs` (or :class:`Targets`) joined along the images."""
    return _join(parts, torch.cat)


def collate(samples: list) -> tuple[torch.Tensor, Targets]:
    """The loader's batch of ``(image, Targets)`` samples."""
    return torch.stack([image for image, _ in samples]), _join([t for _, t in samples], torch.stack)
