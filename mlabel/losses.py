"""BCE on logits with per-label ``pos_weight``, and the rule that derives it from label counts.

Targets are float 0/1 with the shape of the logits; -1 marks an unknown target, which is left
out of the loss (the mean is taken over the known elements only).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEWithLogits", "pos_weight_from_targets", "DEFAULT_POS_WEIGHT_MAX"]

# neg/pos is bounded because a label with 3 positives in 30,000 would otherwise get a weight of
# 10,000: its few examples dominate every batch they appear in, gradients spike, and the
# probabilities drift far above the label's real frequency. The per-label threshold tuned on
# val sets the operating point anyway, so the weight only needs to keep rare labels from being
# ignored; 10 does that without destabilising training. The same bound applies below (1/10).
DEFAULT_POS_WEIGHT_MAX = 10.0


def pos_weight_from_targets(targets: torch.Tensor, max_weight: float = DEFAULT_POS_WEIGHT_MAX,
                            labels: Sequence[str] | None = None) -> torch.Tensor:
    """Per-label negatives / positives, bounded to ``[1 / max_weight, max_weight]``.

    Args:
        targets: (N, L) with 1 = positive, 0 = negative, -1 = unknown (ignored).
        max_weight: the bound; labels without positives get ``max_weight`` and a warning,
            labels without negatives get ``1 / max_weight``.
        labels: names used in the warning.

    Returns:
        (L,) float32, always finite.
    """
    targets = torch.as_tensor(targets, dtype=torch.float32)
    if targets.ndim == 1:
        targets = targets[:, None]
    positives = (targets == 1).sum(0).float()
    negatives = (targets == 0).sum(0).float()
    no_pos = positives == 0
    if no_pos.any():
        names = [labels[i] if labels else str(i) for i in no_pos.nonzero().flatten().tolist()]
        warnings.warn(f"labels with no positive training example: {names}; their pos_weight is "
                      f"set to the bound {max_weight:g}. Add positives or drop these labels.",
                      stacklevel=2)
    weight = negatives / positives.clamp(min=1)
    weight = torch.where(no_pos, torch.full_like(weight, max_weight), weight)
    return weight.clamp(1.0 / max_weight, max_weight)


class BCEWithLogits(nn.Module):
    """``BCEWithLogitsLoss`` with a per-label ``pos_weight``, per-element ``weight`` and
    unknown targets (-1) masked out.

    With no unknown targets it equals ``F.binary_cross_entropy_with_logits`` exactly.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """logits, targets: (N, L); weight: broadcastable to (N, L)."""
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                             "must have the same shape")
        known = (targets >= 0).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(
            logits, targets.clamp(min=0).to(logits.dtype), weight=weight,
            pos_weight=self.pos_weight, reduction="none") * known
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / known.sum().clamp(min=1)
