"""Metrics without the ``(N, L)`` scores: from a :class:`mlabel.histogram.ScoreHistogram`.

At ten thousand labels a validation set of a million images has 10^10 scores; the histogram
holds ``2 x L x bins`` counts, whatever N, and merges across DDP ranks by a sum. From it:

- **AP** per label: its expectation over the orders the histogram cannot see, every order of
  the scores inside a bin taken as equally likely. Bin b holds ``p`` positives among ``d``
  scores below ``A`` positives of ``C`` scores: its j-th score is a positive with probability
  ``p / d`` and then has ``1 + (j - 1)(p - 1)/(d - 1)`` positives of its bin at or above it on
  average, so the bin adds ``p/d sum_j (A + 1 + (j - 1)(p - 1)/(d - 1)) / (C + j)``: a digamma
  difference in closed form. AP is linear in the precisions at the positives, so this is the
  exact expectation (each positive's own count included; leaving it out biased AP low where a
  bin holds few positives). Tied scores, which scikit-learn ranks as one group, are the one
  order it does not average over.
- **AUROC** per label: every positive of bin b outranks the negatives of the bins below and half
  of those in b (the Mann-Whitney count with the bin as a tie).
- **ECE** per label (equal-width bins over [0, 1]), each histogram bin at its centre: the mean
  probability of a calibration bin is off by at most half a histogram bin.
- **Precision, recall, F1** at per-label thresholds: a threshold counts the bins at and above
  the first edge at or over it, each edge rounded up in the dtype of the scores counted
  (:meth:`ScoreHistogram.edges`); exact for the thresholds the histogram tuner gives.

``benchmarks/streaming_error.py`` measures the errors against scikit-learn as a function of the
number of images and of positives per label; ``tests/test_streaming_differential.py`` asserts
them per case class.
"""
from __future__ import annotations

import numpy as np
from scipy.special import digamma

from .histogram import ScoreHistogram

__all__ = ["histogram_metrics"]


def _ap(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(L,) expected AP from per-bin counts ordered from the highest bin down, every order inside
    a bin equally likely (see the module docstring)."""
    d = pos + neg
    above = np.cumsum(pos, 1) - pos  # A: positives in the bins above
    seen = np.cumsum(d, 1) - d  # C: scores in the bins above
    # sum_{j=1..d} (alpha + beta j) / (C + j) = beta d + (alpha - beta C) (psi(C + d + 1) - psi(C + 1))
    beta = np.where(d > 1, (pos - 1) / np.maximum(d - 1, 1), 0.0)
    alpha = above + 1 - beta
    harmonic = digamma(seen + d + 1) - digamma(seen + 1)
    per_bin = pos / np.maximum(d, 1) * (beta * d + (alpha - beta * seen) * harmonic)
    total = pos.sum(1)
    contribution = np.where(pos > 0, per_bin, 0.0).sum(1)
    return np.divide(contribution, total, out=np.full(len(total), np.nan), where=total > 0)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    neg_below = neg.sum(1, keepdims=True) - np.cumsum(neg, 1)  # descending order: below = later
    wins = (pos * (neg_below + 0.5 * neg)).sum(1)
    pairs = pos.sum(1) * neg.sum(1)
    return np.divide(wins, pairs, out=np.full(len(pairs), np.nan), where=pairs > 0)


def _ece(neg: np.ndarray, pos: np.ndarray, bins: int) -> np.ndarray:
    """Ascending per-bin counts -> (L,) ECE with ``bins`` equal-width bins, at the bin centres."""
    centres = (np.arange(neg.shape[1]) + 0.5) / neg.shape[1]
    group = np.minimum((centres * bins).astype(np.int64), bins - 1)
    count = pos + neg
    mass = np.zeros((len(neg), bins))
    hits = np.zeros((len(neg), bins))
    np.add.at(mass.T, group, (count * centres).T)
    np.add.at(hits.T, group, pos.T)
    known = count.sum(1)
    return np.divide(np.abs(mass - hits).sum(1), known, out=np.full(len(known), np.nan), where=known > 0)


def histogram_metrics(histogram: ScoreHistogram, thresholds=None, ece_bins: int = 15) -> dict:
    """Per-label ``ap``, ``auroc``, ``ece`` (L,) and their means (``mAP``, ``macro_auroc``); with
    ``thresholds`` (L,), per-label ``precision``, ``recall``, ``f1`` and ``macro_f1``,
    ``micro_f1`` at them."""
    counts = histogram.counts.cpu().numpy().astype(np.float64)
    neg, pos = counts[..., 0], counts[..., 1]
    down_neg, down_pos = neg[:, ::-1], pos[:, ::-1]
    ap, roc = _ap(down_neg, down_pos), _auroc(down_neg, down_pos)
    out = {"ap": ap, "auroc": roc, "ece": _ece(neg, pos, ece_bins),
           "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else None,
           "macro_auroc": float(np.nanmean(roc)) if np.isfinite(roc).any() else None}
    if thresholds is not None:
        # the first edge at or over each threshold (edges in the scores' dtype: a float32 0.1 is edge
        # 10 of 100, though it lies above 10 / 100)
        edge = np.searchsorted(histogram.edges()[:-1], np.asarray(thresholds, np.float64).reshape(-1), side="left")
        above = np.arange(histogram.bins)[None, :] >= edge[:, None]
        tp, fp = (pos * above).sum(1), (neg * above).sum(1)
        fn = pos.sum(1) - tp
        precision = np.divide(tp, tp + fp, out=np.full(len(tp), np.nan), where=tp + fp > 0)
        recall = np.divide(tp, tp + fn, out=np.full(len(tp), np.nan), where=tp + fn > 0)
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.full(len(tp), np.nan), where=2 * tp + fp + fn > 0)
        micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1.0)
        out.update(precision=precision, recall=recall, f1=f1, macro_f1=float(np.nanmean(f1)), micro_f1=float(micro))
    return out


class SplitStream:
    """What a run's metrics need from one pass over a split, without its ``(N, L)`` scores: a
    :class:`ScoreHistogram` of the probabilities and, at given thresholds and at 0.5, the decision
    counts per label and the per-image figures summed (:class:`mlabel.metrics.RowStats`). Each
    DDP rank feeds its own images; :meth:`all_reduce` sums them. Memory: ``2 x L x bins`` counts
    and ``8 x L`` decision counts, whatever N; with ``logits=True`` (a pass that fits the
    calibration) the histogram also keeps the logits' moments (``3 x 2 x 515`` floats per label,
    :class:`mlabel.calibration.LogitMoments`)."""

    def __init__(self, num_labels: int, bins: int = 2048, thresholds=None, uncalibrated: bool = False,
                 logits: bool = False):
        self.histogram = ScoreHistogram(num_labels, bins, logits=logits)
        # the plain sigmoid's histogram beside the calibrated one (its ECE in metrics.json)
        self.uncalibrated = ScoreHistogram(num_labels, bins) if uncalibrated else None
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float64).reshape(-1)
        self.cuts = {}  # "tuned" / "half" -> [label counts (4, L), RowStats]
        self.loss_sum, self.seen = 0.0, 0

    def update(self, probs, targets, uncalibrated=None, logits=None) -> None:
        """Add a batch: probabilities, targets, the plain sigmoid's probabilities (with
        ``uncalibrated``) and the logits (with ``logits``; else taken as ``logit(probs)``)."""
        from .metrics import RowStats, Cuts, as_arrays
        scores, codes = as_arrays(probs, targets)
        self.histogram.update(scores, targets, logits=logits)
        if self.uncalibrated is not None:
            self.uncalibrated.update(uncalibrated, targets)
        if self.thresholds is None:
            return
        for name, th in (("tuned", self.thresholds), ("half", np.full(scores.shape[1], 0.5))):
            label, rows = Cuts.count(scores, codes, th)
            old = self.cuts.get(name)
            stats = RowStats.of(rows)
            self.cuts[name] = [label, stats] if old is None else [old[0] + label, old[1] + stats]

    def all_reduce(self, world) -> "SplitStream":
        """Sum over the DDP ranks (nothing to do in one process)."""
        if not world.distributed:
            return self
        import torch
        self.histogram.all_reduce()
        if self.uncalibrated is not None:
            self.uncalibrated.all_reduce()
        for name in ("tuned", "half"):
            if name in self.cuts:
                label, stats = self.cuts[name]
                flat = torch.from_numpy(np.concatenate([label.ravel(), stats.as_array()]).astype(np.float64))
                torch.distributed.all_reduce(flat)
                values = flat.numpy()
                self.cuts[name] = [values[:label.size].reshape(label.shape).astype(np.int64),
                                   type(stats).from_array(values[label.size:])]
        return self

    def metrics(self, labels: list[str], binary: bool) -> dict:
        """The run contract's metrics dict (as :func:`mlabel.metrics.evaluate_predictions` gives
        it): the ranking figures from the histogram (``micro_ap``, ``micro_auroc``,
        ``coverage_error`` and ``label_ranking_ap`` need per-image rankings: None), the cut-off
        figures exact."""
        from .metrics import label_row, defined_mean, summarise_counts
        ranked = histogram_metrics(self.histogram)
        counts = self.histogram.counts.cpu().numpy()
        (summary, per), (half, per_half) = (summarise_counts(*self.cuts[n], binary) for n in ("tuned", "half"))
        result = {"n_images": int(self.cuts["tuned"][1].images), "mAP": ranked["mAP"], "micro_ap": None,
                  "macro_auroc": ranked["macro_auroc"], "micro_auroc": None, "coverage_error": None,
                  "label_ranking_ap": None, "macro_ece": defined_mean(ranked["ece"])}
        result.update(summary)
        result.update({f"{k}@0.5": v for k, v in half.items()})
        support = counts[..., 1].sum(1)
        ranking = ranked["ap"], ranked["auroc"], ranked["ece"]
        result["per_label"] = {name: label_row(i, ranking, per, per_half, self.thresholds, support)
                               for i, name in enumerate(labels)}
        if self.uncalibrated is not None:
            raw = histogram_metrics(self.uncalibrated)["ece"]
            result["macro_ece_uncalibrated"] = defined_mean(raw)
            for name, value in zip(labels, raw.tolist()):
                result["per_label"][name]["ece_uncalibrated"] = None if np.isnan(value) else value
        result["streaming"] = {"bins": self.histogram.bins, "note": "AP, AUROC and ECE from per-label score "
                               "histograms (docs/RESULTS.md states their measured error); cut-off figures exact"}
        return result
