"""Per-label decision thresholds tuned exactly on validation scores.

Every distinct score of a label is a candidate cut-off (``prob >= t`` is positive). The counts at
all candidates come from one sort per label (:func:`mlabel.metrics.ranking_counts`), vectorised
over labels, so the F1 reached equals the best F1 on scikit-learn's ``precision_recall_curve``.
The returned threshold sits halfway between the chosen score and the next lower one: the
predictions on the tuning set are the same, and unseen scores close to the boundary fall on the
side their neighbours chose.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .metrics import _as_tensors, ranking_counts

__all__ = ["tune_thresholds", "FALLBACK_THRESHOLD"]

# A label with no positive (or no known) example in the tuning set has no F1 optimum to find.
FALLBACK_THRESHOLD = 0.5


def _f1_at_cutoffs(tp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    fn = tp[-1] - tp
    return 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12)


def tune_thresholds(probs, targets, metric: str = "f1", labels: Sequence[str] | None = None,
                    return_scores: bool = False):
    """Choose one threshold per label that maximises ``metric`` on (probs, targets).

    Args:
        probs: (N, L) probabilities.
        targets: (N, L) 1 / 0, or -1 for unknown (ignored).
        metric: ``"f1"``.
        labels: names used in warnings.
        return_scores: also return the (L,) best metric values.

    Returns:
        thresholds (L,) float32 tensor, and the scores when ``return_scores``. Labels without
        positives keep :data:`FALLBACK_THRESHOLD` (with a warning) and score NaN.
    """
    if metric != "f1":
        raise ValueError(f"unknown threshold metric {metric!r}; available: ['f1']")
    probs, targets = _as_tensors(probs, targets)
    scores, tp, fp, last = ranking_counts(probs, targets)
    objective = torch.where(last, _f1_at_cutoffs(tp, fp), torch.full_like(tp, -1.0))
    best_value, best = objective.max(0)
    chosen = scores.gather(0, best[None]).squeeze(0)
    # The next lower distinct score below the chosen one (if any).
    below = torch.where(scores < chosen, scores, torch.full_like(scores, -torch.inf)).max(0).values
    # Compared in float32, the precision thresholds are stored and applied in.
    mid = ((chosen + below) / 2).float().double()
    threshold = torch.where(torch.isfinite(below) & (mid > below.float().double()), mid, chosen)
    no_pos = tp[-1] == 0
    if no_pos.any():
        names = [labels[i] if labels else str(i) for i in no_pos.nonzero().flatten().tolist()]
        warnings.warn(f"no positive example to tune on for labels {names}; they keep the "
                      f"threshold {FALLBACK_THRESHOLD}", stacklevel=2)
        threshold = torch.where(no_pos, torch.full_like(threshold, FALLBACK_THRESHOLD), threshold)
        best_value = torch.where(no_pos, torch.full_like(best_value, float("nan")), best_value)
    threshold = threshold.float()
    return (threshold, best_value.float()) if return_scores else threshold
