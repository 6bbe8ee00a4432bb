"""Metrics without the ``(N, L)`` scores: from a :class:`mlabel.thresholds.ScoreHistogram`.

At ten thousand labels a validation set of a million images has 10^10 scores; the histogram
holds ``2 x L x bins`` counts, whatever N, and merges across DDP ranks by a sum. From it:

- **AP** per label, with the scores inside a bin taken as evenly interleaved positives and
  negatives: a positive that sits a share u through bin b has precision
  ``(TP_above + u tp_b) / (seen_above + u n_b)``, integrated over u in closed form. (Grouping a
  bin as one tie, as scikit-learn does for tied scores, is the lower end of that range.)
- **AUROC** per label: every positive of bin b outranks the negatives of the bins below and half
  of those in b (the Mann-Whitney count with the bin as a tie).
- **ECE** per label (equal-width bins over [0, 1]), each histogram bin at its centre: the mean
  probability of a calibration bin is off by at most half a histogram bin.
- **Precision, recall, F1** at per-label thresholds: a threshold counts the bins at and above
  the first edge at or over it (exact for thresholds on the edges, as the histogram tuner gives).

docs/RESULTS.md states the errors measured against the exact metrics where both run
(``benchmarks/scale.py``).
"""
from __future__ import annotations

import numpy as np

from .thresholds import ScoreHistogram

__all__ = ["histogram_metrics"]


def _ap(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(L,) AP from per-bin counts ordered from the highest bin down, bins evenly interleaved."""
    tp_above = np.cumsum(pos, 1) - pos
    seen_above = np.cumsum(pos + neg, 1) - pos - neg
    n = pos + neg
    with np.errstate(divide="ignore", invalid="ignore"):
        # integral over u in [0, 1] of (a + b u) / (c + d u), a = tp_above, b = pos, c = seen_above, d = n
        a, b, c, d = tp_above, pos, seen_above, n
        log_term = np.where(c > 0, np.log1p(d / np.where(c > 0, c, 1.0)), 0.0)
        mean_precision = np.where(c > 0, b / d + (a * d - b * c) / (d * d) * log_term, b / np.where(d > 0, d, 1.0))
        mean_precision = np.where(d > 0, mean_precision, 0.0)
    total = pos.sum(1)
    contribution = (pos * mean_precision).sum(1)
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
        edge = np.ceil(np.asarray(thresholds, np.float64) * histogram.bins - 1e-9).clip(0, histogram.bins).astype(np.int64)
        above = np.arange(histogram.bins)[None, :] >= edge[:, None]
        tp, fp = (pos * above).sum(1), (neg * above).sum(1)
        fn = pos.sum(1) - tp
        precision = np.divide(tp, tp + fp, out=np.full(len(tp), np.nan), where=tp + fp > 0)
        recall = np.divide(tp, tp + fn, out=np.full(len(tp), np.nan), where=tp + fn > 0)
        f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.full(len(tp), np.nan), where=2 * tp + fp + fn > 0)
        micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1.0)
        out.update(precision=precision, recall=recall, f1=f1, macro_f1=float(np.nanmean(f1)), micro_f1=float(micro))
    return out
