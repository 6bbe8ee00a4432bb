"""Per-label probability calibration fitted on validation logits.

``sigmoid(scale * logit + bias)`` per label: ``temperature`` fits only the scale (1 / T),
``platt`` both. Platt is the default in recipes because ``pos_weight`` shifts a label's logits
by about ``log(pos_weight)``: a bias that a temperature alone cannot undo. Both maps are
increasing (the scale is kept positive), so rankings, AP and AUROC do not change; the thresholds
are tuned after calibration, on the calibrated probabilities.
"""
from __future__ import annotations

import numpy as np
import torch

from ._counting import UNKNOWN
from .metrics import as_arrays

__all__ = ["fit_calibration", "fit_calibration_from_histogram", "apply_calibration", "CALIBRATION_METHODS"]

CALIBRATION_METHODS = ("none", "temperature", "platt")


MAX_SCALE = 1e4  # the fitted slope is bounded: a perfectly separable label has no finite optimum
MAX_BIAS = 1e4


def fit_calibration(logits, targets, method: str = "platt", max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit per-label ``scale`` and ``bias`` (L,) minimising each label's mean BCE on its known targets.

    Each label is its own two-parameter logistic regression, solved by Newton's method with a
    backtracking line search, vectorised over labels and iterated until every label converges
    (the optimum scikit-learn's unregularised ``LogisticRegression`` finds per label). The scale
    stays in [1e-6, 1e4] (the map increasing, finite for separable labels) and the bias in
    [-1e4, 1e4]. Labels without both classes keep the identity (scale 1, bias 0). Float32 results.
    """
    if method not in ("temperature", "platt"):
        raise ValueError(f"unknown calibration method {method!r}; available: {list(CALIBRATION_METHODS)}")
    x, codes = as_arrays(logits, targets)
    x = x.astype(np.float64)
    known, y = (codes != UNKNOWN).astype(np.float64), (codes == 1).astype(np.float64)
    fit = ((y * known).sum(0) > 0) & (((1 - y) * known).sum(0) > 0)
    scale, bias = np.ones(x.shape[1]), np.zeros(x.shape[1])
    if fit.any():
        cols = np.flatnonzero(fit)
        scale[cols], bias[cols] = _newton(x[:, cols], y[:, cols], known[:, cols], method == "platt", max_iter)
    return torch.from_numpy(scale).float(), torch.from_numpy(bias).float()


def fit_calibration_from_histogram(histogram, method: str = "platt", max_iter: int = 100, block: int = 256):
    """:func:`fit_calibration` from a :class:`~mlabel.thresholds.ScoreHistogram` of the plain
    sigmoid probabilities (streaming evaluation): each bin's negatives and positives count as
    that many images at the logit of the bin's centre, a weighted fit per label, in blocks of
    ``block`` labels (memory ``2 x bins x block`` per array, whatever N and L)."""
    if method not in ("temperature", "platt"):
        raise ValueError(f"unknown calibration method {method!r}; available: {list(CALIBRATION_METHODS)}")
    counts = histogram.counts.cpu().numpy().astype(np.float64)  # (L, bins, 2): negatives, positives
    centre = (np.arange(histogram.bins) + 0.5) / histogram.bins
    logit = np.log(centre) - np.log1p(-centre)
    n_labels = counts.shape[0]
    scale, bias = np.ones(n_labels), np.zeros(n_labels)
    fit = (counts[..., 0].sum(1) > 0) & (counts[..., 1].sum(1) > 0)
    cols = np.flatnonzero(fit)
    x_one = np.concatenate([logit, logit])[:, None]
    y_one = np.concatenate([np.zeros(histogram.bins), np.ones(histogram.bins)])[:, None]
    for start in range(0, len(cols), block):
        part = cols[start:start + block]
        w = np.concatenate([counts[part, :, 0].T, counts[part, :, 1].T])  # (2 bins, labels)
        x, y = np.broadcast_to(x_one, w.shape), np.broadcast_to(y_one, w.shape)
        scale[part], bias[part] = _newton(x, y, w, method == "platt", max_iter)
    return torch.from_numpy(scale).float(), torch.from_numpy(bias).float()


def _mean_bce(x, y, w, a, b) -> np.ndarray:
    z = x * a + b
    return (w * (np.logaddexp(0.0, z) - y * z)).sum(0) / w.sum(0)


def _newton(x, y, w, with_bias: bool, max_iter: int):
    a, b = np.ones(x.shape[1]), np.zeros(x.shape[1])
    loss = _mean_bce(x, y, w, a, b)
    active = np.ones(x.shape[1], dtype=bool)
    n = w.sum(0)
    for _ in range(max_iter):
        p = 0.5 * (1 + np.tanh((x * a + b) / 2))  # the sigmoid, without overflow
        r, s = w * (p - y) / n, w * p * (1 - p) / n
        ga, gb = (r * x).sum(0), r.sum(0)
        haa, hab, hbb = (s * x * x).sum(0) + 1e-12, (s * x).sum(0), s.sum(0) + 1e-12
        if with_bias:
            det = haa * hbb - hab * hab
            da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        else:
            da, db = ga / haa, np.zeros_like(gb)
        da, db = np.where(active, da, 0.0), np.where(active, db, 0.0)
        step = np.ones_like(a)
        for _ in range(40):  # backtracking, per label
            new_a = np.clip(a - step * da, 1e-6, MAX_SCALE)
            new_b = np.clip(b - step * db, -MAX_BIAS, MAX_BIAS)
            new_loss = _mean_bce(x, y, w, new_a, new_b)
            worse = active & ~(new_loss <= loss)
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        accept = active & (new_loss <= loss)
        moved = np.maximum(np.abs(new_a - a) / (1 + np.abs(a)), np.abs(new_b - b) / (1 + np.abs(b)))
        a, b = np.where(accept, new_a, a), np.where(accept, new_b, b)
        gain = np.where(accept, loss - new_loss, 0.0)
        loss = np.where(accept, new_loss, loss)
        active &= accept & (moved > 1e-12) & (gain > 1e-15 * np.maximum(loss, 1e-300))
        if not active.any():
            break
    return a, b


def apply_calibration(logits: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Calibrated probabilities ``sigmoid(scale * logits + bias)`` (plain sigmoid without them)."""
    if scale is None:
        return torch.sigmoid(logits)
    return torch.sigmoid(logits * scale.to(logits) + bias.to(logits))  # in the logits' dtype and device
