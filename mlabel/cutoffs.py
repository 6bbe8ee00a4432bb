"""The exact cut-off search that the threshold tuners share (issue 28: split out of thresholds.py
so that the histogram tuner, :mod:`mlabel.histogram`, and the exact one, :mod:`mlabel.thresholds`,
both build on it without importing each other).

:func:`objective_values` scores every candidate cut-off at once; :func:`exact_cutoffs` and
:func:`global_cutoff` find the best per label (or one for all labels); :func:`finish_cutoffs`
applies the documented fallbacks and :func:`as_tensors` returns them in the scores' dtype. The
objectives and fallbacks are described in :mod:`mlabel.thresholds`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from ._counting import UNKNOWN, decode, key_kind, label_blocks, positives, runs, sort_rows, sorted_keys, thread_map

__all__ = ["OBJECTIVES", "FALLBACK_THRESHOLD", "DEFAULT_OBJECTIVE", "objective_values", "check_metric", "exact_cutoffs", "global_cutoff",
           "finish_cutoffs", "as_tensors"]

OBJECTIVES = ("f1", "fbeta", "precision_at_recall", "recall_at_precision", "youden", "global")
FALLBACK_THRESHOLD = 0.5
DEFAULT_OBJECTIVE = {"beta": 1.0, "min_recall": 0.9, "min_precision": 0.9}  # the metrics' parameters


def objective_values(metric: str, tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray,
                     objective: dict | None = None) -> np.ndarray:
    """The objective at each cut-off; ``tp``/``fp`` (L, C) float64, ``n_pos``/``n_neg`` (L, 1);
    ``objective``: the metric's parameters ``beta``, ``min_recall``, ``min_precision``
    (:data:`DEFAULT_OBJECTIVE` where left out).

    F-scores are computed in place (``tp`` is overwritten): the tuner's cost is memory traffic.
    """
    objective = {**DEFAULT_OBJECTIVE, **(objective or {})}
    beta, min_recall, min_precision = objective["beta"], objective["min_recall"], objective["min_precision"]
    if metric in ("f1", "global", "fbeta"):
        b2 = 1.0 if metric != "fbeta" else beta * beta
        # F_beta = (1 + b2) tp / ((1 + b2) tp + b2 fn + fp) = (1 + b2) tp / (tp + fp + b2 P)
        denominator = np.add(tp, fp)
        denominator += b2 * n_pos
        np.maximum(denominator, 1e-12, out=denominator)
        tp *= 1 + b2
        tp /= denominator
        return tp
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / np.maximum(n_pos, 1)
    if metric == "precision_at_recall":
        return np.where(recall >= min_recall, precision, -1.0)
    if metric == "recall_at_precision":
        # Unreachable precision: fall back to the most precise cut-off (scored below any feasible one).
        return np.where(precision >= min_precision, recall, precision - 2.0)
    if metric == "youden":
        return recall - fp / np.maximum(n_neg, 1)
    raise ValueError(f"unknown threshold metric {metric!r}; available: {list(OBJECTIVES)}")


def check_metric(metric: str, beta: float, min_recall: float, min_precision: float) -> None:
    if metric not in OBJECTIVES:
        raise ValueError(f"unknown threshold metric {metric!r}; available: {list(OBJECTIVES)}")
    if metric == "fbeta" and not beta > 0:
        raise ValueError(f"fbeta needs beta > 0, got {beta}")
    for name, value in (("min_recall", min_recall), ("min_precision", min_precision)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _best_cutoffs(scores: np.ndarray, codes: np.ndarray, metric: str, objective: dict,
                  kind: str | None = None, dtype=np.float32):
    """Exact best cut-off per row of ``scores``/``codes`` (l, N).

    Returns threshold (l,) float64 (representable in ``dtype``), best objective (l,), positives
    and negatives (l,).
    """
    kind = kind or key_kind(scores)
    if kind != "float":
        return _best_at_positives(scores, codes, metric, objective, kind, dtype)
    rows = sort_rows(scores, codes, kind)
    r = runs(rows)
    n_rows, n = rows.rank.shape
    n_pos, n_neg = r.tp[r.end], r.fp[r.end]
    value = objective_values(metric, r.tp.copy(), r.fp, r.spread(n_pos), r.spread(n_neg), objective)
    value[r.tp + r.fp == r.previous(r.tp + r.fp, 0.0)] = -np.inf  # a run of unknown targets only
    best_value = np.maximum.reduceat(value, r.start)
    hit = value == r.spread(best_value)
    index = np.arange(len(value))
    if metric == "precision_at_recall":  # the lowest cut-off among equals keeps the most recall
        best = np.maximum.reduceat(np.where(hit, index, -1), r.start)
    else:
        best = np.minimum.reduceat(np.where(hit, index, len(value)), r.start)
    col = r.col[best]
    chosen = rows.value(rows.rank[np.arange(n_rows), col])
    has_below = col + 1 < rows.known  # the next lower known score
    below = rows.value(rows.rank[np.arange(n_rows), np.minimum(col + 1, n - 1)])
    return _between(chosen, below, has_below, dtype), best_value, n_pos, n_neg


def _between(chosen: np.ndarray, below: np.ndarray, has_below: np.ndarray, dtype) -> np.ndarray:
    """The stored threshold: halfway to the next lower score where ``dtype`` keeps the tuning
    decisions unchanged, else the chosen score itself."""
    with np.errstate(over="ignore", invalid="ignore"):
        mid = (chosen / 2 + below / 2).astype(dtype).astype(np.float64)
    keep_mid = has_below & (mid > below) & (mid <= chosen) & np.isfinite(mid)
    return np.where(keep_mid, mid, chosen)


def _best_at_positives(scores, codes, metric, objective, kind, dtype):
    """:func:`_best_cutoffs` for packed keys: every objective peaks at the end of a run that holds
    a positive (below it only false positives are added), so only those cut-offs are scored."""
    keys = sorted_keys(scores, codes, kind)
    n_rows, n = keys.shape
    found = positives(keys, np.count_nonzero(codes != UNKNOWN, axis=1))
    n_pos, n_neg = found.n_pos.astype(np.float64), (found.n_known - found.n_pos).astype(np.float64)
    threshold, best_value = np.zeros(n_rows), np.full(n_rows, np.nan)
    has = found.n_pos > 0
    if has.any():
        row = found.row
        value = objective_values(metric, found.tp.copy(), found.seen - found.tp, n_pos[row], n_neg[row], objective)
        starts = found.first[has]
        best = np.maximum.reduceat(value, starts)
        hit = value == np.repeat(best, found.n_pos[has])
        # the highest cut-off among equals (largest ascending start), or the lowest for precision_at_recall
        if metric == "precision_at_recall":
            pick = np.minimum.reduceat(np.where(hit, found.lo, n), starts)
        else:
            pick = np.maximum.reduceat(np.where(hit, found.lo, -1), starts)
        rows_with = np.flatnonzero(has)
        shift = keys.dtype.type(2)
        chosen = decode(keys[rows_with, pick] >> shift, kind)
        has_below = pick - 1 >= n - found.n_known[rows_with]  # a known score below the run
        below = decode(keys[rows_with, np.maximum(pick - 1, 0)] >> shift, kind)
        threshold[rows_with] = _between(chosen, below, has_below, dtype)
        best_value[rows_with] = best
    return threshold, best_value, n_pos, n_neg


def finish_cutoffs(metric: str, threshold: np.ndarray, value: np.ndarray, n_pos: np.ndarray,
            n_neg: np.ndarray, labels: Sequence[str] | None, fallback: float):
    """Apply the documented fallbacks (with warnings); float64 thresholds and scores."""
    def names(mask):
        return [labels[i] if labels else str(i) for i in np.flatnonzero(mask).tolist()]

    value = np.array(value, dtype=np.float64)
    threshold = np.array(threshold, dtype=np.float64)
    if metric == "recall_at_precision":
        unreachable = value < 0
        if unreachable.any():
            warnings.warn(f"labels {names(unreachable)} never reach the requested precision; they "
                          "use their most precise cut-off and score NaN", stacklevel=3)
            value[unreachable] = np.nan
    elif metric == "precision_at_recall":
        value[value < 0] = np.nan
    one_class = (n_pos == 0) | (n_neg == 0)
    if one_class.any():
        warnings.warn(f"labels {names(one_class)} have no positive or no negative example to tune "
                      f"on; they keep the threshold {fallback}", stacklevel=3)
        threshold[one_class] = fallback
        value[one_class] = np.nan
    return threshold, value


def as_tensors(threshold: np.ndarray, value: np.ndarray, like, return_scores: bool):
    """Tensors on ``like``'s device: float64 thresholds (and objective values) for float64
    scores (a float32 copy of a float64 cut-off may round past the scores it separates), float32
    otherwise."""
    wide = (like.dtype == torch.float64) if torch.is_tensor(like) else (np.asarray(like).dtype == np.float64)
    device = like.device if torch.is_tensor(like) else "cpu"
    dtype = torch.float64 if wide else torch.float32
    th = torch.from_numpy(threshold).to(device=device, dtype=dtype)
    return (th, torch.from_numpy(value).to(device=device, dtype=dtype)) if return_scores else th

def exact_cutoffs(scores, codes, metric, objective, dtype):
    n, n_labels = scores.shape
    if n == 0:
        zero = np.zeros(n_labels)
        return zero, np.full(n_labels, np.nan), zero, zero
    kind = key_kind(scores)

    def block(b):
        return _best_cutoffs(np.ascontiguousarray(scores[:, b].T), np.ascontiguousarray(codes[:, b].T),
                             metric, objective, kind, dtype)

    return tuple(np.concatenate(p) for p in zip(*thread_map(block, label_blocks(n, n_labels))))


def global_cutoff(scores, codes, objective, dtype):
    """One threshold for every label: the best micro-F1 cut-off over all known decisions."""
    n_labels = scores.shape[1]
    known = codes != UNKNOWN
    if not known.any():
        zero = np.zeros(n_labels)
        return zero, np.full(n_labels, np.nan), zero, zero
    found = _best_cutoffs(scores[known][None], codes[known][None], "f1", objective, None, dtype)
    return tuple(np.broadcast_to(t, (n_labels,)).copy() for t in found)
