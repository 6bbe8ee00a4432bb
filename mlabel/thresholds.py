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

from ._counting import (UNKNOWN, codes_of, decode, key_kind, label_blocks, positives, runs, sort_rows, sorted_keys,
                        thread_map)
from .metrics import as_arrays

__all__ = ["tune_thresholds", "ThresholdTuner", "ScoreHistogram", "OBJECTIVES", "FALLBACK_THRESHOLD"]

OBJECTIVES = ("f1", "fbeta", "precision_at_recall", "recall_at_precision", "youden", "global")
FALLBACK_THRESHOLD = 0.5
MAX_BINS = 1 << 24  # ScoreHistogram: the float32 product score x bins is then off by at most one bin


def _upper_edges(bins: int, dtype) -> np.ndarray:
    """(bins + 1,) float64 holding, for k = 0..bins, the smallest ``dtype`` number >= k / bins."""
    k = np.arange(bins + 1, dtype=np.float64)
    edge = k / bins  # the nearest float64, possibly just below k / bins
    # The sign of edge * bins - k, exactly: split edge into 26-bit halves (Veltkamp), so that each
    # half times bins (< 2**26) is exact, and so is the difference with k (Sterbenz).
    t = edge * 134217729.0
    hi = t - (t - edge)
    below = (hi * bins - k) + (edge - hi) * bins < 0
    edge = np.where(below, np.nextafter(edge, np.inf), edge)
    if np.dtype(dtype) == np.float64:
        return edge
    narrow = edge.astype(np.float32)  # a float32 times bins (< 2**29) is exact in float64
    narrow = np.where(narrow.astype(np.float64) * bins < k, np.nextafter(narrow, np.float32(np.inf)), narrow)
    return narrow.astype(np.float64)


def objective_values(metric: str, tp: np.ndarray, fp: np.ndarray, n_pos: np.ndarray,
               n_neg: np.ndarray, beta: float, min_recall: float, min_precision: float) -> np.ndarray:
    """The objective at each cut-off; ``tp``/``fp`` (L, C) float64, ``n_pos``/``n_neg`` (L, 1).

    F-scores are computed in place (``tp`` is overwritten): the tuner's cost is memory traffic.
    """
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
    value = objective_values(metric, r.tp.copy(), r.fp, r.spread(n_pos), r.spread(n_neg), **objective)
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
        value = objective_values(metric, found.tp.copy(), found.seen - found.tp, n_pos[row], n_neg[row], **objective)
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


def _finish(metric: str, threshold: np.ndarray, value: np.ndarray, n_pos: np.ndarray,
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


def _output(threshold: np.ndarray, value: np.ndarray, like, return_scores: bool):
    """Tensors on ``like``'s device: float64 thresholds (and objective values) for float64
    scores (a float32 copy of a float64 cut-off may round past the scores it separates), float32
    otherwise."""
    wide = (like.dtype == torch.float64) if torch.is_tensor(like) else (np.asarray(like).dtype == np.float64)
    device = like.device if torch.is_tensor(like) else "cpu"
    dtype = torch.float64 if wide else torch.float32
    th = torch.from_numpy(threshold).to(device=device, dtype=dtype)
    return (th, torch.from_numpy(value).to(device=device, dtype=dtype)) if return_scores else th


def tune_thresholds(probs, targets, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
                    min_precision: float = 0.9, mode: str = "exact", bins: int = 2048,
                    labels: Sequence[str] | None = None, fallback: float = FALLBACK_THRESHOLD,
                    return_scores: bool = False):
    """Choose one threshold per label that maximises ``metric`` on (probs, targets).

    Args:
        probs: (N, L) scores of any floating dtype: probabilities, logits, margins (not NaN).
            CUDA tensors are tuned on the CPU; the thresholds come back on their device.
        targets: (N, L) 1 / 0, or -1 for unknown (ignored).
        metric: one of :data:`OBJECTIVES` (see the module docstring).
        beta, min_recall, min_precision: parameters of ``fbeta``, ``precision_at_recall`` and
            ``recall_at_precision``.
        mode: ``"exact"``, or ``"histogram"``: a :class:`ScoreHistogram` pass, then an exact pass
            over only the bins that could still hold a better cut-off (same optimum as exact).
        bins: histogram bins in ``"histogram"`` mode.
        labels: names used in warnings.
        fallback: threshold of labels with a single class in ``targets``.
        return_scores: also return the (L,) objective values reached (NaN where a fallback applied).

    Returns:
        thresholds (L,) on probs' device: float64 for float64 scores, else float32 (and the
        objective values, in the same dtype, when ``return_scores``).
    """
    check_metric(metric, beta, min_recall, min_precision)
    if mode not in ("exact", "histogram"):
        raise ValueError(f"unknown mode {mode!r}; available: ['exact', 'histogram']")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an integer of at least 2, got {bins!r}")
    scores, codes = as_arrays(probs, targets)
    objective = dict(beta=beta, min_recall=min_recall, min_precision=min_precision)
    threshold, value = tune_cutoffs(scores, codes, metric, objective, mode, bins, labels, fallback)
    return _output(threshold, value, probs, return_scores)


def tune_cutoffs(scores, codes, metric, objective, mode, bins, labels, fallback):
    """:func:`tune_thresholds` on validated arrays: float64 thresholds and objective values."""
    dtype = np.float64 if scores.dtype == np.float64 else np.float32
    if mode == "histogram":
        hist = ScoreHistogram(scores.shape[1], bins=bins)
        hist._add_codes(scores, codes)
        threshold, value, n_pos, n_neg = hist._refined(scores, codes, metric, objective, dtype)
    elif metric == "global":
        threshold, value, n_pos, n_neg = _global_cutoff(scores, codes, objective, dtype)
    else:
        threshold, value, n_pos, n_neg = _exact_cutoffs(scores, codes, metric, objective, dtype)
    return _finish(metric, threshold, value, n_pos, n_neg, labels, fallback)


def _exact_cutoffs(scores, codes, metric, objective, dtype):
    n, n_labels = scores.shape
    if n == 0:
        zero = np.zeros(n_labels)
        return zero, np.full(n_labels, np.nan), zero, zero
    kind = key_kind(scores)

    def block(b):
        return _best_cutoffs(np.ascontiguousarray(scores[:, b].T), np.ascontiguousarray(codes[:, b].T),
                             metric, objective, kind, dtype)

    return tuple(np.concatenate(p) for p in zip(*thread_map(block, label_blocks(n, n_labels))))


def _global_cutoff(scores, codes, objective, dtype):
    """One threshold for every label: the best micro-F1 cut-off over all known decisions."""
    n_labels = scores.shape[1]
    known = codes != UNKNOWN
    if not known.any():
        zero = np.zeros(n_labels)
        return zero, np.full(n_labels, np.nan), zero, zero
    found = _best_cutoffs(scores[known][None], codes[known][None], "f1", objective, None, dtype)
    return tuple(np.broadcast_to(t, (n_labels,)).copy() for t in found)


class ScoreHistogram:
    """Streaming threshold tuning: per-label histograms of positive and negative scores.

    ``update`` with each batch, ``merge`` (or :meth:`all_reduce` under DDP) to combine, then
    :meth:`tune`. Memory is ``2 * num_labels * bins`` int64 counts, whatever the number of images.
    Bins are ``[k / bins, (k + 1) / bins)``; scores below 0 count in the first bin, 1 and above in
    the last. Cut-offs are bin edges.

    **Bound.** A cut-off inside bin k can reach at most the objective at (positives down to the
    bottom of k, negatives down to its top), because every objective rises with true positives
    and falls with false positives. After :meth:`tune`, ``gap_bound`` (L,) is the largest such
    excess over the chosen edge: the exact optimum on the same data is at most ``score +
    gap_bound`` (0 when no bin could do better; it grows with the mass of the fullest bins near
    the optimum). :func:`tune_thresholds` with ``mode="histogram"`` closes the gap exactly.
    """

    def __init__(self, num_labels: int, bins: int = 2048, device: str | torch.device = "cpu",
                 logits: bool = False):
        if not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be an integer in [2, {MAX_BINS}], got {bins!r}")
        self.num_labels, self.bins = int(num_labels), int(bins)
        self.counts = torch.zeros(self.num_labels, self.bins, 2, dtype=torch.int64, device=device)
        # the lowest known score per label: the bottom edge must predict every score of bin 0
        self.lowest = torch.full((self.num_labels,), np.inf, dtype=torch.float64, device=device)
        # whether float64 scores were counted: the thresholds are then float64 (else float32)
        self.wide = torch.zeros((), dtype=torch.int64, device=device)
        self.gap_bound: np.ndarray | None = None
        self._edge_tables: dict = {}
        # logits=True: the moments of the logits that the calibration fit needs (the end bins of
        # a probability histogram hold logits from -inf to logit(1 / bins): too coarse to fit on)
        self.logit_moments = None
        if logits:
            from .calibration import LogitMoments
            self.logit_moments = LogitMoments(self.num_labels, device)

    @property
    def dtype(self) -> type:
        """The dtype of the thresholds: float64 once float64 scores were counted, else float32."""
        return np.float64 if int(self.wide) else np.float32

    def edges(self, dtype=None) -> np.ndarray:
        """(bins + 1,) float64: edge k is the smallest ``dtype`` number (default :attr:`dtype`)
        at or above ``k / bins``, so for scores of that dtype (or narrower) ``score >= edges[k]``
        holds exactly when the score is counted in bin k or above (bins + 1 ends the last bin)."""
        dtype = np.dtype(dtype or self.dtype).type
        if dtype not in self._edge_tables:
            self._edge_tables[dtype] = _upper_edges(self.bins, dtype)
        return self._edge_tables[dtype]

    @torch.no_grad()
    def update(self, probs, targets, logits=None) -> "ScoreHistogram":
        """Add a batch: probs and targets (N, L), targets 1 / 0 / -1 (unknown, skipped). With
        ``logits=True`` at construction, ``logits`` (N, L) are the logits behind ``probs`` (by
        default ``logit(probs)``, which a float32 probability of 1 caps near 16.6)."""
        scores, codes = as_arrays(probs, targets)
        if scores.shape[1] != self.num_labels:
            raise ValueError(f"expected {self.num_labels} labels, got {scores.shape[1]}")
        self._add_moments(scores, codes, logits)
        return self._add_codes(scores, codes)

    def _add_moments(self, scores: np.ndarray, codes: np.ndarray, logits) -> None:
        if self.logit_moments is None:
            return
        if logits is None:
            tiny, eps = np.finfo(scores.dtype).tiny, np.finfo(scores.dtype).epsneg
            p = np.clip(scores.astype(np.float64), tiny, 1 - eps)  # 0 and 1 at the dtype's last step
            logits = np.log(p) - np.log1p(-p)
        else:
            logits = logits.detach().cpu().double().numpy() if torch.is_tensor(logits) else \
                np.asarray(logits, np.float64)
            if logits.shape != scores.shape:
                raise ValueError(f"logits {logits.shape} for scores {scores.shape}")
        self.logit_moments.update(logits, codes)

    def _bin_keys(self, scores: np.ndarray) -> np.ndarray:
        """The bin of each score: k such that ``k / bins <= score < (k + 1) / bins`` exactly (in
        real numbers, whatever the dtype), scores below 0 in bin 0, 1 and above in the last."""
        if scores.dtype != np.float64:
            scores = scores.astype(np.float32, copy=False)  # float16 widens exactly
        key = np.clip(scores * scores.dtype.type(self.bins), -1, self.bins).astype(np.int32)
        np.clip(key, 0, self.bins - 1, out=key)
        # The product rounds, so a score next to an edge may land one bin off: compare it with the
        # edges of its own dtype (exact comparisons) and move it back.
        edges = self.edges(scores.dtype).astype(scores.dtype)
        lower, upper = edges[:-1].copy(), edges[1:].copy()
        lower[0], upper[-1] = -np.inf, np.inf
        key -= scores < lower[key]
        key += scores >= upper[key]
        return key

    def _add_codes(self, scores: np.ndarray, codes: np.ndarray) -> "ScoreHistogram":
        self._note_dtype(scores)
        # Blocks of labels whose counts stay in cache, on a thread per core.
        step = max(1, (1 << 16) // self.bins)

        def block(start):
            stop = min(start + step, self.num_labels)
            key = self._bin_keys(scores[:, start:stop])
            key += np.arange(stop - start, dtype=np.int32) * self.bins
            key *= 2
            key += codes[:, start:stop] == 1
            known = codes[:, start:stop] != UNKNOWN
            size = (stop - start) * self.bins * 2
            counts = np.bincount(key.ravel() if known.all() else key[known], minlength=size)
            self.counts[start:stop].view(-1).add_(torch.from_numpy(counts).to(self.counts.device))
            if len(scores):
                low = np.where(known, scores[:, start:stop], np.inf).min(0).astype(np.float64)
                torch.minimum(self.lowest[start:stop], torch.from_numpy(low).to(self.lowest.device),
                              out=self.lowest[start:stop])

        thread_map(block, range(0, self.num_labels, step))
        return self

    @torch.no_grad()
    def update_sparse(self, probs, labels) -> "ScoreHistogram":
        """Add a batch whose targets are a :class:`~mlabel.data.sparse.SparseLabels` of its rows
        (positives and exceptions as index lists): no dense target table is made. With a negative
        default, every score is first counted as a negative (one pass over the scores), then the
        listed positives and unknowns are moved (work in the listed labels); with an unknown
        default only the listed labels are counted."""
        scores = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
        if scores.ndim != 2 or scores.shape != (len(labels), self.num_labels):
            raise ValueError(f"scores {scores.shape} for {len(labels)} images x {self.num_labels} labels")
        scores, _ = as_arrays(scores, np.zeros(scores.shape, np.float32))  # the dtype kept, as update does
        self._note_dtype(scores)
        if self.logit_moments is not None:  # the moments take dense codes (one batch)
            self._add_moments(scores, codes_of(labels.dense(np.arange(len(labels)))), None)
        pos = labels._gather(labels.pos_ptr, labels.pos_idx, np.arange(len(labels)))
        other = labels._gather(labels.other_ptr, labels.other_idx, np.arange(len(labels)))
        size = self.num_labels * self.bins
        pos_keys = self._bin_keys(scores[pos]) + pos[1].astype(np.int32) * self.bins
        other_keys = self._bin_keys(scores[other]) + other[1].astype(np.int32) * self.bins
        positives = np.bincount(pos_keys, minlength=size)
        counts = self.counts.view(self.num_labels, self.bins, 2)
        if labels.default == 0.0:  # unlisted: negative; listed others: unknown
            negatives = self._all_counts(scores) - positives - np.bincount(other_keys, minlength=size)
            low = scores.min(0).astype(np.float64) if len(scores) else np.full(self.num_labels, np.inf)
            if len(other[0]):  # labels with unknowns: their lowest known score, column by column
                columns, where = np.unique(other[1], return_inverse=True)
                part = scores[:, columns]
                part[other[0], where] = np.inf
                low[columns] = part.min(0)
        else:  # unlisted: unknown; listed others: negative
            negatives = np.bincount(other_keys, minlength=size)
            low = np.full(self.num_labels, np.inf)
            np.minimum.at(low, pos[1], scores[pos])
            np.minimum.at(low, other[1], scores[other])
        counts[..., 0].add_(torch.from_numpy(negatives.reshape(self.num_labels, self.bins)).to(counts.device))
        counts[..., 1].add_(torch.from_numpy(positives.reshape(self.num_labels, self.bins)).to(counts.device))
        torch.minimum(self.lowest, torch.from_numpy(low.astype(np.float64)).to(self.lowest.device), out=self.lowest)
        return self

    def _all_counts(self, scores: np.ndarray) -> np.ndarray:
        """(L * bins,) counts of every score by label and bin: blocks of labels whose counts stay
        in cache, a thread per core."""
        step = max(1, (1 << 16) // self.bins)
        out = np.empty(self.num_labels * self.bins, np.int64)

        def block(start):
            stop = min(start + step, self.num_labels)
            key = self._bin_keys(scores[:, start:stop])
            key += np.arange(stop - start, dtype=np.int32) * self.bins
            out[start * self.bins:stop * self.bins] = np.bincount(key.ravel(), minlength=(stop - start) * self.bins)

        thread_map(block, range(0, self.num_labels, step))
        return out

    def _note_dtype(self, scores: np.ndarray) -> None:
        if scores.dtype == np.float64:
            self.wide.fill_(1)

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shape {tuple(other.counts.shape)} into "
                             f"{tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.counts.device)
        torch.minimum(self.lowest, other.lowest.to(self.lowest.device), out=self.lowest)
        self.wide.fill_(max(int(self.wide), int(other.wide)))
        if (self.logit_moments is None) != (other.logit_moments is None):
            raise ValueError("cannot merge a histogram with logit moments and one without")
        if self.logit_moments is not None:
            self.logit_moments.merge(other.logit_moments)
        return self

    def all_reduce(self, group=None) -> "ScoreHistogram":
        """Sum the histograms of every DDP rank in place (no-op outside torch.distributed)."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self.lowest, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(self.wide, op=dist.ReduceOp.MAX, group=group)
            if self.logit_moments is not None:
                self.logit_moments.all_reduce(group)
        return self

    def _curves(self, metric: str, objective: dict):
        """Cumulative counts at the descending edges, the objective there, and the per-bin bound."""
        counts = self.counts.cpu().numpy().astype(np.float64)
        if metric == "global":
            counts = counts.sum(0, keepdims=True)
        # Descending cut-offs: position i is the edge k = bins - 1 - i (predict bins >= k).
        tp = counts[..., 1][:, ::-1].cumsum(1)
        fp = counts[..., 0][:, ::-1].cumsum(1)
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        name = "f1" if metric == "global" else metric
        value = objective_values(name, tp.copy(), fp, n_pos, n_neg, **objective)
        fp_above = np.concatenate([np.zeros_like(fp[:, :1]), fp[:, :-1]], axis=1)
        bound = objective_values(name, tp.copy(), fp_above, n_pos, n_neg, **objective)
        return tp, fp, n_pos, n_neg, value, bound

    def tune(self, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
             min_precision: float = 0.9, labels: Sequence[str] | None = None,
             fallback: float = FALLBACK_THRESHOLD, return_scores: bool = False):
        """Thresholds (L,) at bin edges maximising ``metric``; same contract as
        :func:`tune_thresholds`. Sets ``gap_bound`` (see the class docstring)."""
        check_metric(metric, beta, min_recall, min_precision)
        objective = dict(beta=beta, min_recall=min_recall, min_precision=min_precision)
        threshold, value, n_pos, n_neg = self._edge_cutoffs(metric, objective)
        threshold, value = _finish(metric, threshold, value, n_pos, n_neg, labels, fallback)
        like = torch.zeros(0, dtype=torch.float64 if int(self.wide) else torch.float32, device=self.counts.device)
        return _output(threshold, value, like, return_scores)

    def _edge_cutoffs(self, metric: str, objective: dict):
        tp, fp, n_pos, n_neg, value, bound = self._curves(metric, objective)
        best_value = value.max(1, keepdims=True)
        at_best = value == best_value
        seen_all = tp + fp
        # Every edge with the same counts gives the same decisions: take the middle of that run.
        first = np.argmax(at_best, axis=1)
        seen = np.take_along_axis(seen_all, first[:, None], 1)
        last = (seen_all <= seen).sum(1) - 1
        if metric == "precision_at_recall":
            last = self.bins - 1 - np.argmax(at_best[:, ::-1], axis=1)
            seen = np.take_along_axis(seen_all, last[:, None], 1)
            first = (seen_all < seen).sum(1)
        edge_hi, edge_lo = self.bins - 1 - first, self.bins - 1 - last
        # The middle of the run, in the scores' dtype, kept between the run's end edges (rounded
        # up in that dtype, so that ``score >= edge`` is exactly "in that bin or above").
        edges = self.edges()
        middle = ((edge_hi + edge_lo) / (2 * self.bins)).astype(self.dtype).astype(np.float64)
        threshold = np.clip(middle, edges[edge_lo], edges[edge_hi])
        # The bottom edge predicts all of bin 0, which also holds the scores below 0.
        lowest = self.lowest.cpu().numpy()
        lowest = lowest.min(keepdims=True) if metric == "global" else lowest
        threshold = np.where(edge_hi == 0, np.minimum(threshold, lowest), threshold)
        self.gap_bound = np.maximum(bound.max(1) - best_value[:, 0], 0.0)
        found = threshold, best_value[:, 0], n_pos[:, 0], n_neg[:, 0]
        if metric == "global":
            self.gap_bound = np.broadcast_to(self.gap_bound, (self.num_labels,)).copy()
            found = tuple(np.broadcast_to(t, (self.num_labels,)).copy() for t in found)
        return found

    def _refined(self, scores: np.ndarray, codes: np.ndarray, metric: str, objective: dict, dtype):
        """Edge cut-offs, then an exact search inside the bins whose bound beats the best edge:
        the optimum of the exact tuner, from a pass over only those bins' scores."""
        if metric == "global":  # one ranking over every label: the exact path is the refinement
            return _global_cutoff(scores, codes, objective, dtype)
        threshold, value, n_pos, n_neg = self._edge_cutoffs(metric, objective)
        tp, fp, _, _, _, bound = self._curves(metric, objective)
        open_bins = bound > value[:, None] + 1e-12
        for j in np.flatnonzero(open_bins.any(1) & (n_pos > 0) & (n_neg > 0)):
            found = self._refine_label(scores[:, j], codes[:, j], tp[j], fp[j], open_bins[j],
                                       metric, objective, dtype)
            if found is not None and found[1] > value[j]:
                threshold[j], value[j] = found
        self.gap_bound = np.zeros(self.num_labels)
        return threshold, value, n_pos, n_neg

    def _refine_label(self, column, codes, tp_edges, fp_edges, open_bins, metric, objective, dtype):
        """Best cut-off at the scores inside the open bins of one label (descending positions)."""
        position = self.bins - 1 - self._bin_keys(column)  # descending edge position of the bin
        keep = open_bins[position] & (codes != UNKNOWN)
        values, codes, position = column[keep].astype(np.float64), codes[keep], position[keep]
        if values.size == 0:
            return None
        order = np.argsort(-values, kind="stable")
        values, codes, position = values[order], codes[order], position[order]
        # Counts strictly above a score's bin come from the histogram; within it, from the scores.
        tp_above = np.concatenate([[0.0], tp_edges])[position]
        fp_above = np.concatenate([[0.0], fp_edges])[position]
        starts = np.r_[True, position[1:] != position[:-1]]
        group = np.maximum.accumulate(np.where(starts, np.arange(values.size), 0))
        pos_cum, neg_cum = np.cumsum(codes == 1), np.cumsum(codes == 0)
        pos_before = np.where(group > 0, pos_cum[group - 1], 0)
        neg_before = np.where(group > 0, neg_cum[group - 1], 0)
        tp = (tp_above + pos_cum - pos_before)[None]
        fp = (fp_above + neg_cum - neg_before)[None]
        value = objective_values(metric, tp, fp, tp_edges[None, -1:], fp_edges[None, -1:], **objective)[0]
        value[np.r_[values[:-1] == values[1:], False]] = -np.inf  # only run ends are realisable
        best = int(np.argmax(value))
        chosen, key_best = values[best], self.bins - 1 - position[best]
        if best + 1 < values.size and position[best + 1] == position[best]:
            below = values[best + 1]
        else:  # every lower score lies below this bin's lower edge (bin 0 holds all of them)
            below = key_best / self.bins if key_best > 0 else None
        threshold = chosen
        if below is not None and below < chosen:
            mid = np.float64(dtype(chosen / 2 + below / 2))
            if below < mid <= chosen:
                threshold = mid
        return threshold, value[best]


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
        self.histogram_._add_codes(scores, codes)
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
