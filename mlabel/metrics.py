"""Multi-label metrics from scores, in one sorted pass per block of labels (``mlabel._counting``).

Conventions (named so results can be compared with other tools):

- Targets: 1 positive, 0 negative, -1 (or any other value) unknown. Unknown elements are left out
  of every metric; an image whose every target is unknown is left out of the per-image metrics
  (``samples_f1``, ``subset_accuracy``, ``coverage_error``, ``label_ranking_ap``), and a label
  with no known target out of every macro mean (its per-label figures are ``null``).
- ``mAP`` is the macro mean of per-label average precision as scikit-learn defines it
  (``sum_n (R_n - R_{n-1}) P_n``, no interpolation). A label with no positive target has no AP:
  it is reported as ``null`` and left out of the mean. (torchmetrics 1.9 scores such a label 0
  and keeps it in the mean; ASL's code does the same.)
- ``macro_auroc`` likewise leaves out labels without both positives and negatives.
- F1, precision and recall follow scikit-learn with ``zero_division=0``: a ratio whose
  denominator is zero counts as 0. ``samples_f1`` is the mean over images of per-image F1.
- ECE uses ``bins`` equal-width bins ``[k/bins, (k+1)/bins)``; the last bin also holds p = 1.
- Scores may be any floating dtype and any finite or infinite value (logits too); NaN is refused.
  Counts are exact integers; every figure is computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Sequence

import numpy as np
import torch

from ._counting import (UNKNOWN, codes_of, key_kind, label_blocks, micro_sums, positives, ranking_sums,
                        row_blocks, runs, sort_rows, sorted_keys, thread_map)

__all__ = ["Cuts", "average_precision", "auroc", "evaluate_predictions", "label_curves", "label_row",
           "calibration_error", "defined_mean", "label_ranking", "cutoff_metrics"]


def as_arrays(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N, L) NumPy scores (their floating dtype kept; integers become float64) and
    uint8 target codes. 1-D inputs are one label."""
    scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    targets = targets.detach().cpu().numpy() if torch.is_tensor(targets) else np.asarray(targets)
    if scores.dtype == np.float16 or not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32 if scores.dtype == np.float16 else np.float64)
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets.reshape(-1, 1)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be matching (N, L) arrays")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, codes_of(targets)


def _per_label_ranking(scores: np.ndarray, codes: np.ndarray, kind: str | None = None):
    """(L,) AP and AUROC sums with positive and negative counts, one sorted pass per block."""
    kind = kind or key_kind(scores)

    def block(b):
        s, c = np.ascontiguousarray(scores[:, b].T), np.ascontiguousarray(codes[:, b].T)
        if kind == "float":
            return ranking_sums(runs(sort_rows(s, c, kind)), b.stop - b.start)
        known = np.count_nonzero(c != UNKNOWN, axis=1)
        return positives(sorted_keys(s, c, kind), known).ranking_sums()

    parts = thread_map(block, label_blocks(*scores.shape))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _ap_auc(sums) -> tuple[np.ndarray, np.ndarray]:
    ap, auc, n_pos, n_neg = sums
    return _ratio(ap, n_pos), _ratio(auc, n_pos * n_neg)


def average_precision(probs, targets) -> torch.Tensor:
    """(N, L) -> (L,) average precision per label; NaN for labels with no positives."""
    return torch.from_numpy(_ap_auc(_per_label_ranking(*as_arrays(probs, targets)))[0])


def auroc(probs, targets) -> torch.Tensor:
    """(N, L) -> (L,) area under the ROC curve; NaN without both classes present."""
    return torch.from_numpy(_ap_auc(_per_label_ranking(*as_arrays(probs, targets)))[1])


def label_curves(probs, targets):
    """Per label: the distinct scores (descending) with tp and fp at ``prob >= score`` there,
    plus the label's positive and negative counts: the curves the tuner maximises."""
    scores, codes = as_arrays(probs, targets)
    rows = sort_rows(np.ascontiguousarray(scores.T), np.ascontiguousarray(codes.T))
    r = runs(rows)
    for j in range(scores.shape[1]):
        part = slice(r.start[j], r.end[j] + 1)
        yield (rows.value(rows.rank[j, r.col[part]]), r.tp[part], r.fp[part],
               float(r.tp[part][-1]), float(r.fp[part][-1]))


def label_ranking(probs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: coverage error and label-ranking average precision (scikit-learn's definitions)
    over the image's known labels; NaN for an image with no known label. An image without a
    positive label has coverage 0 and LRAP 1, as in scikit-learn. Returns two (N,) tensors."""
    coverage, lrap = _image_ranking(*as_arrays(probs, targets))
    return torch.from_numpy(coverage), torch.from_numpy(lrap)


def _image_ranking(scores: np.ndarray, codes: np.ndarray, kind: str | None = None):
    kind = kind or key_kind(scores)

    def block(b):
        s, c = scores[b], codes[b]
        if kind == "float":
            rows = sort_rows(s, c, kind)
            r = runs(rows)
            sums = ranking_sums(r, len(rows.known))
            n_pos = sums.tp  # unknown targets sit at the end of the row: the last run end counts all
            complete = r.tp == r.spread(n_pos)  # run ends at or after the lowest positive
            cover = np.minimum.reduceat(np.where(complete, r.tp + r.fp, np.inf), r.start)
            return sums.ap, n_pos, sums.tp + sums.fp, cover
        found = positives(sorted_keys(s, c, kind), np.count_nonzero(c != UNKNOWN, axis=1))
        sums = found.ranking_sums()
        # the lowest-ranked positive (each row's first, ascending) closes the coverage
        cover = np.zeros(len(found.n_pos))
        has = found.n_pos > 0
        cover[has] = found.seen[found.first[has]]
        return sums.ap, sums.tp, sums.tp + sums.fp, cover

    step = max(1, (1 << 20) // max(scores.shape[1], 1))
    parts = thread_map(block, [slice(s, min(s + step, scores.shape[0])) for s in range(0, scores.shape[0], step)])
    ap, n_pos, n_known, cover = (np.concatenate(p) for p in zip(*parts))
    none_known = n_known == 0
    lrap = np.where(n_pos > 0, _ratio(ap, n_pos), 1.0)
    coverage = np.where(n_pos > 0, cover, 0.0)
    return np.where(none_known, np.nan, coverage), np.where(none_known, np.nan, lrap)


def _ece_block(probs: np.ndarray, codes: np.ndarray, bins: int):
    """Per (label, bin): summed probabilities and positives, and known targets per label."""
    n_labels = probs.shape[1]
    known = codes != UNKNOWN
    index = np.clip((probs * bins).astype(np.int64), 0, bins - 1) + np.arange(n_labels) * bins
    if not known.all():
        index, probs, codes = index[known], probs[known], codes[known]
    index, size = index.ravel(), n_labels * bins
    mass = np.bincount(index, probs.ravel().astype(np.float64), size)
    hits = np.bincount(index, (codes == 1).ravel(), size)
    return mass, hits, np.count_nonzero(known, axis=0)


def calibration_error(probs, targets, bins: int = 15) -> torch.Tensor:
    """(L,) expected calibration error per label: sum over ``bins`` equal-width probability bins
    of (bin share) x |mean probability - positive rate|; NaN for a label with no known target."""
    return torch.from_numpy(_ece(*as_arrays(probs, targets), bins))


def _ece(probs: np.ndarray, codes: np.ndarray, bins: int = 15) -> np.ndarray:
    parts = thread_map(lambda b: _ece_block(probs[b], codes[b], bins), row_blocks(*probs.shape))
    mass, hits, known = (sum(p) for p in zip(*parts))
    gap = np.abs(mass - hits).reshape(len(known), bins).sum(1)
    return _ratio(gap, known.astype(np.float64))


def _count(mask: np.ndarray, axis: int) -> np.ndarray:
    """True elements of a bool array along ``axis`` (a byte sum: faster than count_nonzero)."""
    return mask.view(np.uint8).sum(axis, dtype=np.int64 if mask.shape[axis] >= 2**31 else np.int32)


def _cutoffs_like(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """float64 cut-offs in ``probs``' dtype with the same decisions: ``p >= t`` for a float32 p
    equals ``p >= t32`` with t32 the smallest float32 not below t."""
    if probs.dtype != np.float32:
        return thresholds
    single = thresholds.astype(np.float32)
    with np.errstate(invalid="ignore"):
        low = single < thresholds
    return np.where(low, np.nextafter(single, np.float32(np.inf)), single) if low.any() else single


class Cuts:
    """Per-label and per-image counts of decisions at a cut-off, summed over label blocks."""

    def __init__(self, n_images: int):
        self.label = 0  # (tp, fp, fn, tn) x labels, summed over blocks of images
        self.rows = np.zeros((5, n_images), np.int64)  # tp, predicted, true, wrong, known


    @staticmethod
    def count(probs: np.ndarray, codes: np.ndarray, thresholds: np.ndarray):
        known = codes != UNKNOWN
        true = codes == 1
        pred = probs >= _cutoffs_like(probs, thresholds)
        pred &= known
        hit = pred & true
        wrong = pred ^ true  # unknown elements are neither predicted nor true
        n_pred, n_true, n_hit, n_known = (_count(a, 0) for a in (pred, true, hit, known))
        label = np.stack([n_hit, n_pred - n_hit, n_true - n_hit, n_known - n_pred - n_true + n_hit])
        rows = np.stack([_count(a, 1) for a in (hit, pred, true, wrong, known)])
        return label, rows

    def add_counts(self, label: np.ndarray, rows: np.ndarray, where: slice) -> None:
        """Counts of a block of images ``where`` (all labels)."""
        self.label = self.label + label if isinstance(self.label, np.ndarray) else label
        self.rows[:, where] = rows

    def row(self, name: str) -> np.ndarray:
        """Per-image counts: ``tp``, ``pred`` (predicted), ``true``, ``wrong`` or ``known``."""
        return self.rows[("tp", "pred", "true", "wrong", "known").index(name)]


def defined_mean(x: np.ndarray) -> float | None:
    """The mean of the defined (non-NaN) values, None when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else None


def nanmean(x) -> float | None:
    return defined_mean(np.asarray(x, dtype=np.float64))


def _harmonic(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


@dataclass
class RowStats:
    """The per-image decision counts summed: all the summary needs of them, so that a split
    streamed in batches (or over DDP ranks) adds these instead of keeping a row per image."""
    images: int = 0
    known_rows: int = 0  # images with at least one known target
    known: int = 0  # known targets
    wrong: int = 0  # wrong decisions among them
    exact_rows: int = 0  # images with a known target and no wrong decision
    row_f1_sum: float = 0.0  # per-image F1 summed over the images with a known target

    @classmethod
    def of(cls, rows: np.ndarray) -> "RowStats":
        """From per-image counts (5, n): tp, predicted, true, wrong, known."""
        tp, pred, true, wrong, known = rows
        has = known > 0
        row_f1 = _ratio(2.0 * tp, (pred + true).astype(np.float64))
        row_f1 = np.where(np.isnan(row_f1), 0.0, row_f1)[has]
        return cls(rows.shape[1], int(has.sum()), int(known.sum()), int(wrong.sum()), int((wrong[has] == 0).sum()),
                   float(row_f1.sum()))

    def __add__(self, other: "RowStats") -> "RowStats":
        return RowStats(*(a + b for a, b in zip(self.as_array(), other.as_array())))

    def as_array(self) -> list:
        return [self.images, self.known_rows, self.known, self.wrong, self.exact_rows, self.row_f1_sum]

    @classmethod
    def from_array(cls, values) -> "RowStats":
        return cls(*(int(round(v)) for v in values[:5]), float(values[5]))


def _summarise(cuts: Cuts, binary: bool) -> tuple[dict, dict]:
    return summarise_counts(cuts.label, RowStats.of(cuts.rows), binary)


def summarise_counts(label: np.ndarray, rows: RowStats, binary: bool) -> tuple[dict, dict]:
    """The cut-off summary and per-label arrays from per-label (tp, fp, fn, tn) counts (4, L)
    and the per-image figures summed."""
    tp, fp, fn, tn = (a.astype(np.float64) for a in label)
    has_known = tp + fp + fn + tn > 0
    zero_if_known = np.where(has_known, 0.0, np.nan)

    def per_label(num, den):  # scikit-learn's zero_division=0, NaN for an all-unknown label
        return np.where(den > 0, _ratio(num, den), zero_if_known)

    precision, recall, f1 = per_label(tp, tp + fp), per_label(tp, tp + fn), per_label(2 * tp, 2 * tp + fp + fn)
    stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
    n_known = rows.known

    def micro(num, den):
        return (num / den if den > 0 else 0.0) if n_known else None

    support = tp + fn
    micro_p, micro_r = micro(stp, stp + sfp), micro(stp, stp + sfn)
    cp, cr = defined_mean(precision), defined_mean(recall)
    summary = {
        "macro_f1": defined_mean(f1), "micro_f1": micro(2 * stp, 2 * stp + sfp + sfn),
        "samples_f1": rows.row_f1_sum / rows.known_rows if rows.known_rows else None,
        "weighted_f1": micro(np.nansum(f1 * support), support.sum()),
        "macro_precision": cp, "macro_recall": cr, "micro_precision": micro_p, "micro_recall": micro_r,
        "hamming_loss": rows.wrong / n_known if n_known else None,
        "subset_accuracy": rows.exact_rows / rows.known_rows if rows.known_rows else None,
        # Per-class and overall precision/recall/F1 of the multi-label literature (ML-GCN, ASL):
        # CF1 is the harmonic mean of CP and CR (not the mean of per-label F1); OF1 = micro F1.
        "CP": cp, "CR": cr, "CF1": _harmonic(cp, cr),
        "OP": micro_p, "OR": micro_r, "OF1": _harmonic(micro_p, micro_r),
    }
    if binary:
        summary["accuracy"] = summary["subset_accuracy"]
    counts = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    return summary, {"f1": f1, "precision": precision, "recall": recall, **counts}


def cutoff_metrics(probs, targets, thresholds, binary: bool = False) -> tuple[dict, dict]:
    """Metrics that depend on a cut-off (``prob >= threshold``): the summary dict and per-label
    arrays (f1, precision, recall, tp, fp, fn, tn). ``thresholds`` is (L,) or (N, L)."""
    probs, codes = as_arrays(probs, targets)
    th = _thresholds(thresholds, probs.shape)
    cuts = Cuts(probs.shape[0])
    for b in row_blocks(*probs.shape):
        cuts.add_counts(*Cuts.count(probs[b], codes[b], th[b] if th.ndim == 2 else th), b)
    return _summarise(cuts, binary)


def _thresholds(thresholds, shape) -> np.ndarray:
    n, n_labels = shape
    if thresholds is None:
        return np.full(n_labels, 0.5)
    th = thresholds.detach().cpu().numpy() if torch.is_tensor(thresholds) else np.asarray(thresholds)
    th = th.astype(np.float64)
    if th.ndim != 2:
        th = th.reshape(-1)
    if th.shape[-1] != n_labels or (th.ndim == 2 and th.shape[0] != n):
        raise ValueError(f"thresholds of shape {th.shape} for {n} images x {n_labels} labels")
    if np.isnan(th).any():
        raise ValueError("thresholds contain NaN")
    return th


def evaluate_predictions(probs, targets, thresholds=None, labels: Sequence[str] | None = None,
                         binary: bool | None = None, scores=None) -> dict:
    """Every metric of the run contract, at ``thresholds`` and at 0.5 (keys suffixed ``@0.5``).

    Args:
        probs: (N, L) probabilities (after the sigmoid), any floating dtype.
        targets: (N, L) with 1, 0 or -1 (unknown).
        thresholds: (L,) per-label cut-offs (``prob >= threshold`` is positive), or (N, L) for
            per-image cut-offs such as cross-fitted ones; default 0.5.
        labels: names for ``per_label``; default ``"0"``, ``"1"``, ...
        binary: add ``accuracy``; default: when there is a single label.
        scores: (N, L) scores for the ranking metrics (AP, AUROC, coverage, LRAP) when ``probs``
            lost resolution (float32 probabilities of logits far from 0 tie); default ``probs``.

    Returns:
        a JSON-ready dict: ranking metrics (``mAP``, ``micro_ap``, ``macro_auroc``,
        ``micro_auroc``, ``coverage_error``, ``label_ranking_ap``, ``macro_ece``), cut-off metrics
        (``macro_f1``, ``micro_f1``, ``samples_f1``, ``weighted_f1``, precision/recall twins,
        ``hamming_loss``, ``subset_accuracy``, CP/CR/CF1, OP/OR/OF1, ``accuracy`` for binary tasks)
        with their ``@0.5`` twins, and ``per_label`` (with tp/fp/fn/tn at the thresholds).
        Figures that no known target defines are ``None``.
    """
    probs, codes = as_arrays(probs, targets)
    n, n_labels = probs.shape
    if n == 0 or n_labels == 0:
        raise ValueError(f"nothing to evaluate: scores of shape {probs.shape}")
    labels = list(labels) if labels is not None else [str(i) for i in range(n_labels)]
    if len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label names for {n_labels} columns of probs")
    binary = n_labels == 1 if binary is None else binary
    th = _thresholds(thresholds, probs.shape)
    ranked = probs if scores is None else as_arrays(scores, targets)[0]
    kind = key_kind(ranked)
    ap, roc = _ap_auc(_per_label_ranking(ranked, codes, kind))
    micro_ap, micro_roc = (_num(x[0]) for x in _ap_auc(micro_sums(ranked, codes, kind)))
    coverage, lrap = _image_ranking(ranked, codes, kind)
    ece = _ece(probs, codes)
    tuned, half = _cut_counts(probs, codes, th)
    (summary, per), (summary_half, per_half) = _summarise(tuned, binary), _summarise(half, binary)
    result = {"n_images": n, "mAP": defined_mean(ap), "micro_ap": micro_ap, "macro_auroc": defined_mean(roc),
              "micro_auroc": micro_roc, "coverage_error": defined_mean(coverage),
              "label_ranking_ap": defined_mean(lrap), "macro_ece": defined_mean(ece)}
    result.update(summary)
    result.update({f"{k}@0.5": v for k, v in summary_half.items()})
    support = (codes == 1).sum(0)
    per_th = th if th.ndim == 1 else np.full(n_labels, np.nan)
    result["per_label"] = {name: label_row(i, (ap, roc, ece), per, per_half, per_th, support)
                           for i, name in enumerate(labels)}
    return result


def _cut_counts(probs: np.ndarray, codes: np.ndarray, th: np.ndarray) -> tuple[Cuts, Cuts]:
    """Decision counts at ``th`` ((L,) or (N, L)) and at 0.5, in blocks of whole rows (every
    count a contiguous reduction) on a thread per core."""
    n, n_labels = probs.shape
    tuned, half = Cuts(n), Cuts(n)

    def cut_block(b):
        return (Cuts.count(probs[b], codes[b], th[b] if th.ndim == 2 else th),
                Cuts.count(probs[b], codes[b], np.full(n_labels, 0.5)))

    blocks = row_blocks(n, n_labels)
    for b, (at_th, at_half) in zip(blocks, thread_map(cut_block, blocks)):
        tuned.add_counts(at_th[0], at_th[1], b)
        half.add_counts(at_half[0], at_half[1], b)
    return tuned, half


def _num(x) -> float | None:
    return None if math.isnan(x) else float(x)


def label_row(i: int, ranking: tuple, per: dict, per_half: dict, per_th, support) -> dict:
    """Label ``i``'s row of ``per_label``: ``ranking`` is the (ap, auroc, ece) arrays (L,), ``per``
    and ``per_half`` the cut-off figures at the thresholds ``per_th`` and at 0.5."""
    ap, roc, ece = ranking
    return {
        "ap": _num(ap[i]), "auroc": _num(roc[i]),
        "f1": _num(per["f1"][i]), "precision": _num(per["precision"][i]),
        "recall": _num(per["recall"][i]), "threshold": _num(per_th[i]),
        "f1@0.5": _num(per_half["f1"][i]), "precision@0.5": _num(per_half["precision"][i]),
        "recall@0.5": _num(per_half["recall"][i]), "ece": _num(ece[i]), "support": int(support[i]),
        **{k: int(per[k][i]) for k in ("tp", "fp", "fn", "tn")},
    }
