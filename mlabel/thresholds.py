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

import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .metrics import _as_tensors

__all__ = ["tune_thresholds", "ThresholdTuner", "ScoreHistogram", "cross_fit_predictions",
           "OBJECTIVES", "FALLBACK_THRESHOLD"]

OBJECTIVES = ("f1", "fbeta", "precision_at_recall", "recall_at_precision", "youden", "global")
FALLBACK_THRESHOLD = 0.5
_CHUNK_ELEMENTS = 1 << 20  # labels are processed in blocks of about this many scores


def _objective(metric: str, tp: torch.Tensor, fp: torch.Tensor, n_pos: torch.Tensor,
               n_neg: torch.Tensor, beta: float, min_recall: float, min_precision: float) -> torch.Tensor:
    """The objective at each cut-off; ``tp``/``fp`` (L, C) float64, ``n_pos``/``n_neg`` (L, 1).

    F-scores are computed in place (``tp`` is overwritten): the tuner's cost is memory traffic.
    """
    if metric in ("f1", "global", "fbeta"):
        b2 = 1.0 if metric != "fbeta" else beta * beta
        # F_beta = (1 + b2) tp / ((1 + b2) tp + b2 fn + fp) = (1 + b2) tp / (tp + fp + b2 P)
        denominator = torch.add(tp, fp).add_(n_pos, alpha=b2).clamp_(min=1e-12)
        return tp.mul_(1 + b2).div_(denominator)
    precision = tp / (tp + fp).clamp(min=1)
    recall = tp / n_pos.clamp(min=1)
    if metric == "precision_at_recall":
        return torch.where(recall >= min_recall, precision, torch.full_like(precision, -1.0))
    if metric == "recall_at_precision":
        # Unreachable precision: fall back to the most precise cut-off (scored below any feasible one).
        return torch.where(precision >= min_precision, recall, precision - 2.0)
    if metric == "youden":
        return recall - fp / n_neg.clamp(min=1)
    raise ValueError(f"unknown threshold metric {metric!r}; available: {list(OBJECTIVES)}")


def _check_metric(metric: str, beta: float, min_recall: float, min_precision: float) -> None:
    if metric not in OBJECTIVES:
        raise ValueError(f"unknown threshold metric {metric!r}; available: {list(OBJECTIVES)}")
    if metric == "fbeta" and not beta > 0:
        raise ValueError(f"fbeta needs beta > 0, got {beta}")
    for name, value in (("min_recall", min_recall), ("min_precision", min_precision)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _codes(targets: torch.Tensor) -> torch.Tensor:
    """1 positive, 0 negative, 2 unknown (any other value)."""
    codes = torch.full(targets.shape, 2, dtype=torch.uint8, device=targets.device)
    codes[targets == 1] = 1
    codes[targets == 0] = 0
    return codes


def _sorted_block(scores: torch.Tensor, codes: torch.Tensor):
    """Sort each row descending. Returns sorted scores and codes, both (l, N)."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and bool((scores >= 0).all()):
        # Non-negative float32 order like their bit patterns: sort one uint32 key per element that
        # carries the code in its two low bits (numpy's vectorised sort, no index gather).
        bits = (scores + 0.0).numpy().view(np.uint32)  # + 0.0 turns -0.0 into 0.0
        keys = ~((bits << np.uint32(2)) | codes.numpy().astype(np.uint32))
        keys.sort(axis=1)
        keys = ~keys  # descending
        sorted_scores = torch.from_numpy((keys >> np.uint32(2)).view(np.float32))
        sorted_codes = torch.from_numpy((keys & np.uint32(3)).astype(np.uint8))
        return sorted_scores, sorted_codes
    sorted_scores, order = torch.sort(scores, dim=1, descending=True)
    return sorted_scores, torch.gather(codes, 1, order)


def _best_cutoffs(scores: torch.Tensor, codes: torch.Tensor, metric: str, beta: float,
                  min_recall: float, min_precision: float):
    """Exact best cut-off per row of ``scores``/``codes`` (l, N).

    Returns threshold (l,) float64, best objective (l,), positives and negatives (l,).
    """
    sorted_scores, sorted_codes = _sorted_block(scores, codes)
    count_dtype = torch.float64
    tp = torch.cumsum(sorted_codes == 1, dim=1, dtype=torch.int64).to(count_dtype)
    fp = torch.cumsum(sorted_codes == 0, dim=1, dtype=torch.int64).to(count_dtype)
    n_pos, n_neg = tp[:, -1:].clone(), fp[:, -1:].clone()
    value = _objective(metric, tp, fp, n_pos, n_neg, beta, min_recall, min_precision)
    # Only at the last of a run of equal scores is the cut-off ``prob >= score`` realisable.
    value[:, :-1].masked_fill_(sorted_scores[:, :-1] == sorted_scores[:, 1:], -torch.inf)
    best_value = value.max(1, keepdim=True).values
    if metric == "precision_at_recall":  # the lowest cut-off among equals keeps the most recall
        n = value.shape[1]
        best = n - 1 - torch.argmax((value.flip(1) == best_value).to(torch.uint8), dim=1)
    else:
        best = torch.argmax((value == best_value).to(torch.uint8), dim=1)
    chosen = sorted_scores.gather(1, best[:, None]).squeeze(1).double()
    has_below = best + 1 < sorted_scores.shape[1]
    below = sorted_scores.gather(1, (best + 1).clamp(max=sorted_scores.shape[1] - 1)[:, None]).squeeze(1).double()
    mid = ((chosen + below) / 2).to(scores.dtype).double()
    threshold = torch.where(has_below & (mid > below) & (mid <= chosen), mid, chosen)
    return threshold, best_value.squeeze(1), n_pos.squeeze(1), n_neg.squeeze(1)


def _finish(metric: str, threshold: torch.Tensor, value: torch.Tensor, n_pos: torch.Tensor,
            n_neg: torch.Tensor, labels: Sequence[str] | None, fallback: float):
    """Apply the documented fallbacks (with warnings) and return float32 thresholds and scores."""
    def names(mask):
        return [labels[i] if labels else str(i) for i in mask.nonzero().flatten().tolist()]

    value = value.double().clone()
    threshold = threshold.double().clone()
    if metric == "recall_at_precision":
        unreachable = value < 0
        if unreachable.any():
            warnings.warn(f"labels {names(unreachable)} never reach the requested precision; they "
                          "use their most precise cut-off and score NaN", stacklevel=3)
            value[unreachable] = float("nan")
    elif metric == "precision_at_recall":
        value[value < 0] = float("nan")
    one_class = (n_pos == 0) | (n_neg == 0)
    if one_class.any():
        warnings.warn(f"labels {names(one_class)} have no positive or no negative example to tune "
                      f"on; they keep the threshold {fallback}", stacklevel=3)
        threshold[one_class] = fallback
        value[one_class] = float("nan")
    return threshold.float(), value.float()


def tune_thresholds(probs, targets, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
                    min_precision: float = 0.9, mode: str = "exact", bins: int = 2048,
                    labels: Sequence[str] | None = None, fallback: float = FALLBACK_THRESHOLD,
                    return_scores: bool = False):
    """Choose one threshold per label that maximises ``metric`` on (probs, targets).

    Args:
        probs: (N, L) probabilities (any non-NaN scores work in exact mode), CPU or CUDA.
        targets: (N, L) 1 / 0, or -1 for unknown (ignored).
        metric: one of :data:`OBJECTIVES` (see the module docstring).
        beta, min_recall, min_precision: parameters of ``fbeta``, ``precision_at_recall`` and
            ``recall_at_precision``.
        mode: ``"exact"`` or ``"histogram"`` (streaming; see :class:`ScoreHistogram`).
        bins: histogram bins in ``"histogram"`` mode.
        labels: names used in warnings.
        fallback: threshold of labels with a single class in ``targets``.
        return_scores: also return the (L,) objective values reached (NaN where a fallback applied).

    Returns:
        thresholds (L,) float32 tensor on probs' device (and the scores when ``return_scores``).
    """
    _check_metric(metric, beta, min_recall, min_precision)
    if mode == "histogram":
        hist = ScoreHistogram(np.shape(probs)[-1] if np.ndim(probs) > 1 else 1, bins=bins,
                              device=probs.device if torch.is_tensor(probs) else "cpu")
        hist.update(probs, targets)
        return hist.tune(metric, beta=beta, min_recall=min_recall, min_precision=min_precision,
                         labels=labels, fallback=fallback, return_scores=return_scores)
    if mode != "exact":
        raise ValueError(f"unknown mode {mode!r}; available: ['exact', 'histogram']")
    probs, targets = _as_tensors(probs, targets, dtype=None)
    n, n_labels = probs.shape
    codes = _codes(targets)
    if metric == "global":
        known = codes != 2
        threshold, value, n_pos, n_neg = _best_cutoffs(probs[known][None].contiguous(), codes[known][None],
                                                       "f1", beta, min_recall, min_precision)
        threshold, value, n_pos, n_neg = (t.expand(n_labels) for t in (threshold, value, n_pos, n_neg))
    else:
        parts = []
        step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        for start in range(0, n_labels, step):
            block = slice(start, start + step)
            parts.append(_best_cutoffs(probs[:, block].T.contiguous(), codes[:, block].T.contiguous(),
                                       metric, beta, min_recall, min_precision))
        threshold, value, n_pos, n_neg = (torch.cat(p) for p in zip(*parts))
    threshold, value = _finish(metric, threshold, value, n_pos, n_neg, labels, fallback)
    return (threshold, value) if return_scores else threshold


class ScoreHistogram:
    """Streaming threshold tuning: per-label histograms of positive and negative scores.

    ``update`` with each batch, ``merge`` (or :meth:`all_reduce` under DDP) to combine, then
    :meth:`tune`. Memory is ``2 * num_labels * bins`` int64 counts, whatever the number of images.
    Scores are probabilities in [0, 1]; cut-offs are the bin edges ``k / bins``.
    """

    def __init__(self, num_labels: int, bins: int = 2048, device: str | torch.device = "cpu"):
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.num_labels, self.bins = int(num_labels), int(bins)
        self.counts = torch.zeros(self.num_labels, self.bins, 2, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, probs, targets) -> "ScoreHistogram":
        """Add a batch: probs and targets (N, L), targets 1 / 0 / -1 (unknown, skipped)."""
        probs, targets = _as_tensors(probs, targets, dtype=None)
        probs, targets = probs.to(self.counts.device), targets.to(self.counts.device)
        if probs.shape[1] != self.num_labels:
            raise ValueError(f"expected {self.num_labels} labels, got {probs.shape[1]}")
        if self.counts.device.type != "cpu":
            self._add_block(probs, targets, 0, self.num_labels)
            return self
        # On the CPU, blocks of labels whose counts stay in cache, spread over a thread per core.
        step = max(1, (1 << 16) // self.bins)
        blocks = [(s, min(s + step, self.num_labels)) for s in range(0, self.num_labels, step)]
        list(_pool().map(lambda b: self._add_block(probs, targets, *b), blocks))
        return self

    def _add_block(self, probs: torch.Tensor, targets: torch.Tensor, start: int, stop: int) -> None:
        """Count labels ``start:stop`` of a batch: key = (label * bins + bin) * 2 + positive."""
        size = (stop - start) * self.bins * 2
        if probs.device.type == "cpu":  # numpy's ufuncs and bincount release the GIL: blocks run in parallel
            p, t = probs[:, start:stop].numpy(), targets[:, start:stop].numpy()
            key = (p * self.bins).astype(np.int32)
            np.clip(key, 0, self.bins - 1, out=key)
            key += np.arange(stop - start, dtype=np.int32) * self.bins
            key *= 2
            key += t == 1
            known = t >= 0
            key = key.ravel() if known.all() else key[known]
            counts = torch.from_numpy(np.bincount(key, minlength=size))
        else:
            p, t = probs[:, start:stop], targets[:, start:stop]
            key = (p * self.bins).to(torch.int32).clamp_(0, self.bins - 1)
            key += torch.arange(stop - start, dtype=torch.int32, device=key.device) * self.bins
            key = key.mul_(2).add_((t == 1).to(torch.int32))
            known = t >= 0
            counts = torch.bincount(key.flatten() if bool(known.all()) else key[known], minlength=size)
        self.counts[start:stop].view(-1).add_(counts.to(self.counts))

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shape {tuple(other.counts.shape)} into "
                             f"{tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group=None) -> "ScoreHistogram":
        """Sum the histograms of every DDP rank in place (no-op outside torch.distributed)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    def tune(self, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
             min_precision: float = 0.9, labels: Sequence[str] | None = None,
             fallback: float = FALLBACK_THRESHOLD, return_scores: bool = False):
        """Thresholds (L,) at bin edges maximising ``metric``; same contract as :func:`tune_thresholds`."""
        _check_metric(metric, beta, min_recall, min_precision)
        counts = self.counts.double()
        if metric == "global":
            counts = counts.sum(0, keepdim=True)
        # Descending cut-offs: position i is the edge k = bins - 1 - i (predict bins >= k).
        tp = counts[..., 1].flip(1).cumsum(1)
        fp = counts[..., 0].flip(1).cumsum(1)
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        value = _objective("f1" if metric == "global" else metric, tp.clone(), fp, n_pos, n_neg,
                           beta, min_recall, min_precision)
        best_value = value.max(1, keepdim=True).values
        at_best = value == best_value
        # Every edge with the same counts gives the same decisions: take the middle of that run.
        first = torch.argmax(at_best.to(torch.uint8), dim=1)
        seen = (tp + fp).gather(1, first[:, None])
        last = (tp + fp <= seen).sum(1) - 1
        if metric == "precision_at_recall":
            last = self.bins - 1 - torch.argmax(at_best.flip(1).to(torch.uint8), dim=1)
            seen = (tp + fp).gather(1, last[:, None])
            first = ((tp + fp) < seen).sum(1)
        edge_hi, edge_lo = self.bins - 1 - first, self.bins - 1 - last
        threshold = (edge_hi + edge_lo).double() / (2 * self.bins)
        value, n_pos, n_neg = best_value.squeeze(1), n_pos.squeeze(1), n_neg.squeeze(1)
        if metric == "global":
            threshold, value, n_pos, n_neg = (t.expand(self.num_labels) for t in (threshold, value, n_pos, n_neg))
        threshold, value = _finish(metric, threshold, value, n_pos, n_neg, labels, fallback)
        return (threshold, value) if return_scores else threshold


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="mlabel-hist")
    return _POOL


def cross_fit_predictions(probs, targets, folds: int = 5, seed: int = 0, **tune_kwargs) -> torch.Tensor:
    """Out-of-fold thresholds: each image is judged by thresholds tuned on the other folds.

    Returns (N, L) thresholds (one row per image) to pass to
    :func:`mlabel.evaluate_predictions`; the F1 reached with them is an honest estimate of the
    F1 the in-sample thresholds will reach on new data. Fallback warnings are silenced here.
    """
    probs, targets = _as_tensors(probs, targets, dtype=None)
    n = probs.shape[0]
    if folds < 2 or folds > n:
        raise ValueError(f"cross-fitting needs 2 <= folds <= {n} images, got {folds}")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n)).to(probs.device)
    fold_of = torch.empty(n, dtype=torch.long, device=probs.device)
    fold_of[order] = torch.arange(n, device=probs.device) % folds
    rows = torch.empty(probs.shape, dtype=torch.float32, device=probs.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(folds):
            held = fold_of == k
            rows[held] = tune_thresholds(probs[~held], targets[~held], **tune_kwargs)
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
        if hasattr(self, "histogram_"):
            del self.histogram_
        if self.mode == "histogram":
            return self.partial_fit(probs, targets, labels)
        th, scores = tune_thresholds(probs, targets, self.metric, mode=self.mode, labels=labels,
                                     return_scores=True, **self._objective_kwargs())
        return self._set_result(th, scores, labels, th.numel())

    def partial_fit(self, probs, targets, labels: Sequence[str] | None = None) -> "ThresholdTuner":
        if self.mode != "histogram":
            raise ValueError("partial_fit needs mode='histogram' (exact tuning needs every score at once)")
        probs, targets = _as_tensors(probs, targets, dtype=None)
        if not hasattr(self, "histogram_"):
            self.histogram_ = ScoreHistogram(probs.shape[1], self.bins, probs.device)
        self.histogram_.update(probs, targets)
        labels = labels if labels is not None else getattr(self, "labels_", None)
        th, scores = self.histogram_.tune(self.metric, labels=labels, return_scores=True,
                                          **self._objective_kwargs())
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
