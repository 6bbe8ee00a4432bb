"""Per-label decision thresholds tuned on validation scores: exact, streamed, or cross-fitted.

**Exact mode.** Every distinct score of a label is a candidate cut-off (``prob >= t`` is
positive). One sort per label gives the true/false-positive counts at all candidates at once, so
the objective reached is the optimum over scikit-learn's ``precision_recall_curve`` points. Tied
scores form one candidate (the counts are read at the end of each run of equal scores). Among
cut-offs with the same objective value the highest is kept (fewer positive predictions), except
for ``precision_at_recall`` where the lowest is kept (more recall at the same precision). The
stored threshold sits halfway between the chosen score and the next lower score: the decisions on
the tuning set are unchanged and unseen scores near the boundary go the way their neighbours did.

**Streaming mode** (:class:`ScoreHistogram`) keeps, per label, a histogram of positive and of
negative scores over ``bins`` equal-width bins of [0, 1]. Histograms from several batches or DDP
ranks merge by summation; the cut-offs are the bin edges.

**Fallbacks.** A label whose tuning targets have no positive or no negative example carries no
information about where its boundary lies: it keeps ``fallback`` (0.5) and a warning names it.
``recall_at_precision`` on a label that never reaches the requested precision takes the cut-off of
highest precision, scores NaN and warns. Unknown targets (-1) are ignored throughout.

Objectives (``metric``): ``f1``; ``fbeta`` (``beta``); ``precision_at_recall`` (highest precision
with recall >= ``min_recall``); ``recall_at_precision`` (highest recall with precision >=
``min_precision``); ``youden`` (TPR - FPR); ``global`` (one threshold for every label that
maximises micro F1 over all known label decisions).
"""
from __future__ import annotations

from typing import Sequence

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .cutoffs import (FALLBACK_THRESHOLD, OBJECTIVES, as_tensors, check_metric, exact_cutoffs, finish_cutoffs,
                      global_cutoff)
from .histogram import ScoreHistogram
from .metrics import as_arrays

__all__ = ["tune_thresholds", "ThresholdTuner", "ScoreHistogram", "TunePlan", "OBJECTIVES", "FALLBACK_THRESHOLD"]


@dataclass(frozen=True)
class TunePlan:
    """How one exact tuning runs: the objective (``metric`` and its parameters ``beta``,
    ``min_recall``, ``min_precision``), the search (``mode``: exact, or histogram with ``bins``),
    the ``fallback`` cut-off of labels with one class, and ``draws``, the bootstrap resamples of
    the ``bagged`` policy. The keywords of :func:`tune_thresholds` are its fields."""
    metric: str = "f1"
    beta: float = 1.0
    min_recall: float = 0.9
    min_precision: float = 0.9
    mode: str = "exact"
    bins: int = 2048
    fallback: float = FALLBACK_THRESHOLD
    draws: int = 25

    @property
    def objective(self) -> dict:
        """The metric's parameters, as :func:`mlabel.cutoffs.objective_values` takes them."""
        return dict(beta=self.beta, min_recall=self.min_recall, min_precision=self.min_precision)

    def check(self) -> "TunePlan":
        """Raise ValueError on an unknown metric or mode, or a parameter out of range."""
        check_metric(self.metric, self.beta, self.min_recall, self.min_precision)
        if self.mode not in ("exact", "histogram"):
            raise ValueError(f"unknown mode {self.mode!r}; available: ['exact', 'histogram']")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"bins must be an integer of at least 2, got {self.bins!r}")
        return self


def tune_thresholds(probs, targets, metric: str = "f1", *, labels: Sequence[str] | None = None,
                    return_scores: bool = False, **options):
    """Choose one threshold per label that maximises ``metric`` on (probs, targets).

    Args:
        probs: (N, L) scores of any floating dtype: probabilities, logits, margins (not NaN).
            CUDA tensors are tuned on the CPU; the thresholds come back on their device.
        targets: (N, L) 1 / 0, or -1 for unknown (ignored).
        metric: one of :data:`OBJECTIVES` (see the module docstring).
        labels: names used in warnings.
        return_scores: also return the (L,) objective values reached (NaN where a fallback applied).
        **options: the other fields of :class:`TunePlan`: ``beta``, ``min_recall``,
            ``min_precision`` (parameters of ``fbeta``, ``precision_at_recall`` and
            ``recall_at_precision``); ``mode``: ``"exact"``, or ``"histogram"``: a
            :class:`ScoreHistogram` pass, then an exact pass over only the bins that could still
            hold a better cut-off (same optimum as exact); ``bins``: histogram bins in
            ``"histogram"`` mode; ``fallback``: threshold of labels with a single class in
            ``targets``.

    Returns:
        thresholds (L,) on probs' device: float64 for float64 scores, else float32 (and the
        objective values, in the same dtype, when ``return_scores``).
    """
    plan = TunePlan(metric, **options).check()
    scores, codes = as_arrays(probs, targets)
    threshold, value = tune_cutoffs(scores, codes, plan, labels)
    return as_tensors(threshold, value, probs, return_scores)


def tune_cutoffs(scores, codes, plan: TunePlan, labels: Sequence[str] | None = None):
    """:func:`tune_thresholds` on validated arrays: float64 thresholds and objective values."""
    dtype = np.float64 if scores.dtype == np.float64 else np.float32
    metric, objective = plan.metric, plan.objective
    if plan.mode == "histogram":
        hist = ScoreHistogram(scores.shape[1], bins=plan.bins)
        hist.add_codes(scores, codes)
        threshold, value, n_pos, n_neg = hist.refined(scores, codes, metric, objective, dtype)
    elif metric == "global":
        threshold, value, n_pos, n_neg = global_cutoff(scores, codes, objective, dtype)
    else:
        threshold, value, n_pos, n_neg = exact_cutoffs(scores, codes, metric, objective, dtype)
    return finish_cutoffs(metric, threshold, value, n_pos, n_neg, labels, plan.fallback)


def fold_ids(n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) fold of each image: a seeded permutation dealt round-robin (sizes differ by <= 1)."""
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[rng.permutation(n)] = np.arange(n) % folds
    return fold_of


def out_of_fold(scores: np.ndarray, codes: np.ndarray, fold_of: np.ndarray, choose) -> np.ndarray:
    """(N, L) cut-offs: each image's row chosen by ``choose(scores, codes)`` on the other folds."""
    rows = np.empty(scores.shape, dtype=np.float64)
    for k in np.unique(fold_of):
        held = fold_of == k
        rows[held] = choose(scores[~held], codes[~held])
    return rows


class ThresholdTuner(BaseEstimator):
    """Per-label thresholds as a scikit-learn estimator.

    ``fit(probs, targets, labels=None)`` returns ``self`` and sets ``thresholds_`` (L,),
    ``scores_`` (L,), ``labels_`` and ``n_labels_``; ``partial_fit`` accumulates batches in
    ``mode="histogram"``; ``predict(probs)`` gives the bool decisions; ``to_dict``/``from_dict``
    store the thresholds keyed by label name.
    """

    def __init__(self, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
                 min_precision: float = 0.9, mode: str = "exact", bins: int = 2048,
                 fallback: float = FALLBACK_THRESHOLD):
        self.metric = metric
        self.beta = beta
        self.min_recall = min_recall
        self.min_precision = min_precision
        self.mode = mode
        self.bins = bins
        self.fallback = fallback

    def _objective_kwargs(self) -> dict:
        return dict(beta=self.beta, min_recall=self.min_recall, min_precision=self.min_precision,
                    fallback=self.fallback)

    def _set_result(self, thresholds, scores, labels, n_labels) -> "ThresholdTuner":
        self.thresholds_ = thresholds.cpu().numpy()
        self.scores_ = scores.cpu().numpy()
        self.n_labels_ = n_labels
        self.labels_ = list(labels) if labels is not None else [str(i) for i in range(n_labels)]
        return self

    def fit(self, probs, targets, labels: Sequence[str] | None = None) -> "ThresholdTuner":
        for name in ("histogram_", "gap_bound_"):
            self.__dict__.pop(name, None)
        th, scores = tune_thresholds(probs, targets, self.metric, mode=self.mode, labels=labels,
                                     return_scores=True, **self._objective_kwargs())
        return self._set_result(th, scores, labels, th.numel())

    def partial_fit(self, probs, targets, labels: Sequence[str] | None = None) -> "ThresholdTuner":
        if self.mode != "histogram":
            raise ValueError("partial_fit needs mode='histogram' (exact tuning needs every score at once)")
        scores, codes = as_arrays(probs, targets)
        if not hasattr(self, "histogram_"):
            self.histogram_ = ScoreHistogram(scores.shape[1], self.bins)
        elif scores.shape[1] != self.histogram_.num_labels:
            raise ValueError(f"expected {self.histogram_.num_labels} labels, got {scores.shape[1]}")
        self.histogram_.add_codes(scores, codes)
        labels = labels if labels is not None else getattr(self, "labels_", None)
        th, scores = self.histogram_.tune(self.metric, labels=labels, return_scores=True,
                                          **self._objective_kwargs())
        self.gap_bound_ = self.histogram_.gap_bound  # the exact optimum is at most scores_ + this
        return self._set_result(th, scores, labels, th.numel())

    def predict(self, probs) -> np.ndarray:
        if not hasattr(self, "thresholds_"):
            raise RuntimeError("this ThresholdTuner is not fitted yet; call fit first")
        probs = probs.detach().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs)
        if probs.shape[-1] != self.n_labels_:
            raise ValueError(f"expected {self.n_labels_} labels, got {probs.shape[-1]}")
        return probs >= self.thresholds_

    def to_dict(self) -> dict:
        if not hasattr(self, "thresholds_"):
            raise RuntimeError("this ThresholdTuner is not fitted yet; call fit first")
        return {
            "params": self.get_params(),
            "thresholds": {n: float(t) for n, t in zip(self.labels_, self.thresholds_)},
            "scores": {n: (None if np.isnan(s) else float(s)) for n, s in zip(self.labels_, self.scores_)},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ThresholdTuner":
        tuner = cls(**data.get("params", {}))
        names = list(data["thresholds"])
        scores = data.get("scores") or {}
        tuner.labels_, tuner.n_labels_ = names, len(names)
        tuner.thresholds_ = np.array([data["thresholds"][n] for n in names], dtype=np.float32)
        tuner.scores_ = np.array([np.nan if scores.get(n) is None else scores[n] for n in names],
                                 dtype=np.float32)
        return tuner
