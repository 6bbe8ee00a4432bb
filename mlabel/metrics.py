"""Multi-label metrics from probabilities, counted once per label in one vectorised pass.

Conventions (named so results can be compared with other tools):

- Targets: 1 positive, 0 negative, -1 unknown. Unknown elements are left out of every metric.
- ``mAP`` is the macro mean of per-label average precision as scikit-learn defines it
  (``sum_n (R_n - R_{n-1}) P_n``, no interpolation). A label with no positive target has no AP:
  it is reported as ``null`` and left out of the mean (torchmetrics does the same; ASL counts 0).
- ``macro_auroc`` likewise leaves out labels without both positives and negatives.
- F1, precision and recall follow scikit-learn with ``zero_division=0``: a ratio whose
  denominator is zero counts as 0. ``samples_f1`` is the mean over images of per-image F1.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["average_precision", "auroc", "evaluate_predictions", "ranking_counts"]


def _as_tensors(probs, targets, dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) tensors from arrays or tensors; 1-D inputs are one label. ``dtype=None`` keeps the
    scores' floating dtype (the threshold tuner sorts float32 faster)."""
    probs = probs if torch.is_tensor(probs) else torch.as_tensor(np.asarray(probs))
    targets = targets if torch.is_tensor(targets) else torch.as_tensor(np.asarray(targets))
    if dtype is not None or not probs.is_floating_point():
        probs = probs.to(dtype or torch.float64)
    targets = targets.to(device=probs.device, dtype=probs.dtype if dtype else targets.dtype)
    if probs.ndim == 1:
        probs, targets = probs[:, None], targets.reshape(-1, 1)
    if probs.shape != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must match")
    if torch.isnan(probs).any():
        raise ValueError("probs contain NaN")
    return probs, targets


def ranking_counts(probs: torch.Tensor, targets: torch.Tensor):
    """Sort each label's scores (descending) and count tp/fp at every distinct score.

    Args:
        probs, targets: (N, L).

    Returns:
        scores (N, L) sorted descending, tp and fp (N, L) cumulative counts, and ``last`` (N, L)
        bool marking the last element of each run of equal scores: only there is a cut-off
        ``prob >= score`` realisable, so only there are the counts valid.
    """
    scores, order = torch.sort(probs, dim=0, descending=True, stable=True)
    sorted_targets = torch.gather(targets, 0, order)
    tp = torch.cumsum((sorted_targets == 1).double(), 0)
    fp = torch.cumsum((sorted_targets == 0).double(), 0)
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[:-1] != scores[1:]
    return scores, tp, fp, last


def average_precision(probs, targets) -> torch.Tensor:
    """(N, L) -> (L,) average precision per label; NaN for labels with no positives."""
    probs, targets = _as_tensors(probs, targets)
    _, tp, fp, last = ranking_counts(probs, targets)
    n_pos = tp[-1]
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = tp / n_pos.clamp(min=1)
    # Recall at the previous valid cut-off: the running value at each group end.
    recall_at_ends = torch.where(last, recall, torch.zeros_like(recall))
    prev = torch.cummax(recall_at_ends, 0).values
    prev = torch.cat([torch.zeros_like(prev[:1]), prev[:-1]])
    ap = (torch.where(last, (recall - prev) * precision, torch.zeros_like(recall))).sum(0)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, math.nan))


def auroc(probs, targets) -> torch.Tensor:
    """(N, L) -> (L,) area under the ROC curve; NaN without both classes present."""
    probs, targets = _as_tensors(probs, targets)
    _, tp, fp, last = ranking_counts(probs, targets)
    n_pos, n_neg = tp[-1], fp[-1]
    tpr, fpr = tp / n_pos.clamp(min=1), fp / n_neg.clamp(min=1)
    tpr_ends = torch.cummax(torch.where(last, tpr, torch.zeros_like(tpr)), 0).values
    fpr_ends = torch.cummax(torch.where(last, fpr, torch.zeros_like(fpr)), 0).values
    prev_tpr = torch.cat([torch.zeros_like(tpr[:1]), tpr_ends[:-1]])
    prev_fpr = torch.cat([torch.zeros_like(fpr[:1]), fpr_ends[:-1]])
    area = torch.where(last, (fpr - prev_fpr) * (tpr + prev_tpr) / 2, torch.zeros_like(tpr)).sum(0)
    return torch.where((n_pos > 0) & (n_neg > 0), area, torch.full_like(area, math.nan))


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None


def _harmonic(p: torch.Tensor, r: torch.Tensor) -> float:
    return float(_safe_div(2 * p * r, p + r))


def label_ranking(probs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: coverage error and label-ranking average precision (scikit-learn's definitions).

    Unknown (-1) labels are left out of the image's ranking. An image without positive labels has
    coverage 0 and LRAP 1, as in scikit-learn. Returns two (N,) tensors.
    """
    probs, targets = _as_tensors(probs, targets)
    relevant = targets == 1
    scores = torch.where(targets >= 0, probs, torch.full_like(probs, -torch.inf))
    lowest_relevant = torch.where(relevant, scores, torch.full_like(scores, torch.inf)).min(1, keepdim=True).values
    coverage = (scores >= lowest_relevant).sum(1).double()
    # rank_j = #labels scoring >= s_j; hits_j = #relevant labels scoring >= s_j: counts at the end
    # of each run of equal scores in the descending order of each row.
    ordered, order = torch.sort(scores, dim=1, descending=True)
    rel = torch.gather(relevant, 1, order).double()
    n_labels = scores.shape[1]
    position = torch.arange(1, n_labels + 1, dtype=torch.float64).expand_as(rel)
    last = torch.ones_like(rel, dtype=torch.bool)
    last[:, :-1] = ordered[:, :-1] != ordered[:, 1:]
    end = torch.where(last, torch.arange(n_labels).expand_as(rel), torch.full_like(order, n_labels))
    end = torch.flip(torch.cummin(torch.flip(end, [1]), 1).values, [1])
    rank = position.gather(1, end)
    hits = rel.cumsum(1).gather(1, end)
    n_rel = rel.sum(1)
    lrap = _safe_div((rel * hits / rank).sum(1), n_rel)
    lrap = torch.where(n_rel > 0, lrap, torch.ones_like(lrap))
    return torch.where(n_rel > 0, coverage, torch.zeros_like(coverage)), lrap


def calibration_error(probs, targets, bins: int = 15) -> torch.Tensor:
    """(L,) expected calibration error per label: sum over ``bins`` equal-width probability bins
    of (bin share) x |mean probability - positive rate|; NaN for a label with no known target."""
    probs, targets = _as_tensors(probs, targets)
    known = targets >= 0
    index = (probs * bins).long().clamp(0, bins - 1) + torch.arange(probs.shape[1]) * bins
    n_labels = probs.shape[1]

    def per_bin(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_labels * bins, dtype=torch.float64).index_add_(
            0, index[known], values[known]).view(n_labels, bins)

    gap = (per_bin(probs) - per_bin((targets == 1).double())).abs().sum(1)
    n_known = known.sum(0).double()
    return torch.where(n_known > 0, gap / n_known.clamp(min=1), torch.full_like(gap, math.nan))


def _cutoff_metrics(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                    binary: bool) -> tuple[dict, dict]:
    """Metrics that depend on a cut-off: summary dict and per-label tensors.

    ``thresholds`` is (L,) or, for cross-fitted thresholds, (N, L).
    """
    known = targets >= 0
    pred = (probs >= thresholds) & known
    true = (targets == 1) & known
    tp = (pred & true).sum(0).double()
    fp = (pred & ~true).sum(0).double()
    fn = (~pred & true).sum(0).double()
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
    support = tp + fn
    row_tp = (pred & true).sum(1).double()
    row_f1 = _safe_div(2 * row_tp, pred.sum(1).double() + true.sum(1).double())
    wrong = (pred != true) & known
    micro_p, micro_r = _safe_div(stp, stp + sfp), _safe_div(stp, stp + sfn)
    summary = {
        "macro_f1": float(f1.mean()),
        "micro_f1": float(_safe_div(2 * stp, 2 * stp + sfp + sfn)),
        "samples_f1": float(row_f1.mean()),
        "weighted_f1": float(_safe_div((f1 * support).sum(), support.sum())),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "micro_precision": float(micro_p),
        "micro_recall": float(micro_r),
        "hamming_loss": float(wrong.sum() / known.sum().clamp(min=1)),
        "subset_accuracy": float((~wrong.any(1)).double().mean()),
        # Per-class and overall precision/recall/F1 of the multi-label literature (ML-GCN, ASL):
        # CF1 is the harmonic mean of CP and CR (not the mean of per-label F1); OF1 = micro F1.
        "CP": float(precision.mean()), "CR": float(recall.mean()),
        "CF1": _harmonic(precision.mean(), recall.mean()),
        "OP": float(micro_p), "OR": float(micro_r), "OF1": _harmonic(micro_p, micro_r),
    }
    if binary:
        summary["accuracy"] = summary["subset_accuracy"]
    return summary, {"f1": f1, "precision": precision, "recall": recall}


def evaluate_predictions(probs, targets, thresholds=None, labels: Sequence[str] | None = None,
                         binary: bool | None = None, scores=None) -> dict:
    """Every metric of the run contract, at ``thresholds`` and at 0.5 (keys suffixed ``@0.5``).

    Args:
        probs: (N, L) probabilities (after the sigmoid).
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
        with their ``@0.5`` twins, and ``per_label``.
    """
    probs, targets = _as_tensors(probs, targets)
    n_labels = probs.shape[1]
    labels = list(labels) if labels is not None else [str(i) for i in range(n_labels)]
    if len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label names for {n_labels} columns of probs")
    binary = n_labels == 1 if binary is None else binary
    th = torch.full((n_labels,), 0.5, dtype=torch.float64) if thresholds is None \
        else torch.as_tensor(np.asarray(thresholds, dtype=np.float64))
    if th.ndim != 2:
        th = th.reshape(-1)
    if th.shape[-1] != n_labels:
        raise ValueError(f"{th.shape[-1]} thresholds for {n_labels} labels")
    ranked = probs if scores is None else _as_tensors(scores, targets)[0]
    ap, roc = average_precision(ranked, targets), auroc(ranked, targets)
    known = targets >= 0
    flat_p, flat_t = ranked[known][:, None], targets[known][:, None]
    coverage, lrap = label_ranking(ranked, targets)
    ece = calibration_error(probs, targets)
    tuned, per = _cutoff_metrics(probs, targets, th, binary)
    half, per_half = _cutoff_metrics(probs, targets, torch.full((n_labels,), 0.5, dtype=torch.float64), binary)
    result = {"n_images": int(probs.shape[0]), "mAP": _nanmean(ap), "micro_ap": _nanmean(average_precision(flat_p, flat_t)),
              "macro_auroc": _nanmean(roc), "micro_auroc": _nanmean(auroc(flat_p, flat_t)),
              "coverage_error": float(coverage.mean()), "label_ranking_ap": float(lrap.mean()),
              "macro_ece": _nanmean(ece)}
    result.update(tuned)
    result.update({f"{k}@0.5": v for k, v in half.items()})
    support = (targets == 1).sum(0)
    per_th = th if th.ndim == 1 else torch.full((n_labels,), math.nan, dtype=torch.float64)

    def num(x):
        return None if math.isnan(x) else float(x)

    result["per_label"] = {
        name: {
            "ap": num(ap[i]), "auroc": num(roc[i]),
            "f1": float(per["f1"][i]), "precision": float(per["precision"][i]),
            "recall": float(per["recall"][i]), "threshold": num(per_th[i]),
            "f1@0.5": float(per_half["f1"][i]), "ece": num(ece[i]), "support": int(support[i]),
        }
        for i, name in enumerate(labels)
    }
    return result
