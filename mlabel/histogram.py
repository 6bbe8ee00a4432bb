"""Per-label score histograms: streamed threshold tuning and the streamed metrics' counts.

:class:`ScoreHistogram` keeps, per label, a histogram of positive and of negative scores over
``bins`` equal-width bins of [0, 1]; histograms of several batches or DDP ranks merge by
summation. It tunes thresholds at its bin edges (``tune``; :func:`mlabel.thresholds.tune_thresholds`
with ``mode="histogram"`` refines them to the exact optimum) and feeds the streamed metrics of
:mod:`mlabel.streaming` (AP, AUROC, ECE without the ``(N, L)`` scores).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ._counting import UNKNOWN, thread_map
from .cutoffs import FALLBACK_THRESHOLD, as_tensors, check_metric, finish_cutoffs, global_cutoff, objective_values
from .metrics import as_arrays

__all__ = ["ScoreHistogram", "MAX_BINS"]

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
        return self.add_codes(scores, codes)

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

    def add_codes(self, scores: np.ndarray, codes: np.ndarray) -> "ScoreHistogram":
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
        value = objective_values(name, tp.copy(), fp, n_pos, n_neg, objective)
        fp_above = np.concatenate([np.zeros_like(fp[:, :1]), fp[:, :-1]], axis=1)
        bound = objective_values(name, tp.copy(), fp_above, n_pos, n_neg, objective)
        return tp, fp, n_pos, n_neg, value, bound

    def tune(self, metric: str = "f1", *, beta: float = 1.0, min_recall: float = 0.9,
             min_precision: float = 0.9, labels: Sequence[str] | None = None,
             fallback: float = FALLBACK_THRESHOLD, return_scores: bool = False):
        """Thresholds (L,) at bin edges maximising ``metric``; same contract as
        :func:`tune_thresholds`. Sets ``gap_bound`` (see the class docstring)."""
        check_metric(metric, beta, min_recall, min_precision)
        objective = dict(beta=beta, min_recall=min_recall, min_precision=min_precision)
        threshold, value, n_pos, n_neg = self._edge_cutoffs(metric, objective)
        threshold, value = finish_cutoffs(metric, threshold, value, n_pos, n_neg, labels, fallback)
        like = torch.zeros(0, dtype=torch.float64 if int(self.wide) else torch.float32, device=self.counts.device)
        return as_tensors(threshold, value, like, return_scores)

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

    def refined(self, scores: np.ndarray, codes: np.ndarray, metric: str, objective: dict, dtype):
        """Edge cut-offs, then an exact search inside the bins whose bound beats the best edge:
        the optimum of the exact tuner, from a pass over only those bins' scores."""
        if metric == "global":  # one ranking over every label: the exact path is the refinement
            return global_cutoff(scores, codes, objective, dtype)
        threshold, value, n_pos, n_neg = self._edge_cutoffs(metric, objective)
        tp, fp, _, _, _, bound = self._curves(metric, objective)
        open_bins = bound > value[:, None] + 1e-12
        for j in np.flatnonzero(open_bins.any(1) & (n_pos > 0) & (n_neg > 0)):
            found = self._refine_label(scores[:, j], codes[:, j], (tp[j], fp[j], open_bins[j]),
                                       metric, objective, dtype)
            if found is not None and found[1] > value[j]:
                threshold[j], value[j] = found
        self.gap_bound = np.zeros(self.num_labels)
        return threshold, value, n_pos, n_neg

    def _refine_label(self, column, codes, curves: tuple, metric, objective, dtype):
        """Best cut-off at the scores inside the open bins of one label (descending positions);
        ``curves``: the label's cumulative true and false positives at the descending edges and
        its open bins, (bins,) each."""
        tp_edges, fp_edges, open_bins = curves
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
        value = objective_values(metric, tp, fp, tp_edges[None, -1:], fp_edges[None, -1:], objective)[0]
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
