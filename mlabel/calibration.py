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

__all__ = ["fit_calibration", "fit_calibration_from_histogram", "apply_calibration", "LogitMoments",
           "CALIBRATION_METHODS"]

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
    """:func:`fit_calibration` from a :class:`~mlabel.histogram.ScoreHistogram` of the plain
    sigmoid probabilities (streaming evaluation), a weighted fit per label in blocks of ``block``
    labels (memory ``4 x groups x block`` per array, whatever N and L).

    A histogram made with ``logits=True`` carries :class:`LogitMoments`: each group of logits
    counts as two points (its mean plus and minus its standard deviation), which follows the fit
    on the scores within about 1e-4 whatever the logits' scale. Without them each bin's images
    count at the logit of the bin's centre: close in the middle bins, coarse in the end bins
    (every logit below ``logit(1 / bins)`` is taken as the first bin's centre)."""
    if method not in ("temperature", "platt"):
        raise ValueError(f"unknown calibration method {method!r}; available: {list(CALIBRATION_METHODS)}")
    moments = getattr(histogram, "logit_moments", None)
    if moments is not None:
        points, counts = moments.points, moments.counts()
    else:
        points, counts = _centre_points(histogram), histogram.counts.cpu().numpy().astype(np.float64)
    n_labels = counts.shape[0]
    scale, bias = np.ones(n_labels), np.zeros(n_labels)
    fit = (counts[..., 0].sum(1) > 0) & (counts[..., 1].sum(1) > 0)
    cols = np.flatnonzero(fit)
    for start in range(0, len(cols), block):
        part = cols[start:start + block]
        x, y, w = points(part)
        scale[part], bias[part] = _newton(x, y, w, method == "platt", max_iter)
    return torch.from_numpy(scale).float(), torch.from_numpy(bias).float()


def _centre_points(histogram):
    """``points`` for a histogram without logit moments: every bin at the logit of its centre."""
    counts = histogram.counts.cpu().numpy().astype(np.float64)  # (L, bins, 2): negatives, positives
    centre = (np.arange(histogram.bins) + 0.5) / histogram.bins
    logit = np.log(centre) - np.log1p(-centre)
    x_one = np.concatenate([logit, logit])[:, None]
    y_one = np.concatenate([np.zeros(histogram.bins), np.ones(histogram.bins)])[:, None]

    def points(part):
        w = np.concatenate([counts[part, :, 0].T, counts[part, :, 1].T])  # (2 bins, labels)
        return np.broadcast_to(x_one, w.shape), np.broadcast_to(y_one, w.shape), w
    return points


class LogitMoments:
    """Per label and class (negative, positive), the count, sum and sum of squares of the logits
    in bins of ``|logit|`` 1/16 of an octave wide from 2^-7 to 2^9, one bin between and one
    beyond each end: what :func:`fit_calibration_from_histogram` fits on. The bins are as fine
    relative to the logit at every scale, so the fit does not degrade when the logits grow (the
    probability histogram's end bins hold every logit past ``logit(1 / bins)``). Memory
    ``3 x 2 x 515`` float64 per label; sums over batches and DDP ranks."""

    PER_OCTAVE, LOW, HIGH = 16, -6, 10  # |logit| in [2**(LOW - 1), 2**(HIGH - 1)) is divided
    LIMIT = 1e6  # logits are clipped to +-LIMIT (an infinite one would make every sum infinite)

    def __init__(self, num_labels: int, device: str | torch.device = "cpu"):
        self.num_labels = int(num_labels)
        self.half = (self.HIGH - self.LOW) * self.PER_OCTAVE  # divided bins per sign
        self.groups = 2 * self.half + 3  # [beyond, divided (-), between, divided (+), beyond]
        self.stats = torch.zeros(3, self.num_labels, self.groups, 2, dtype=torch.float64, device=device)

    def _keys(self, x: np.ndarray) -> np.ndarray:
        """Group of each logit: its sign, octave and 1/16 of the octave (from the float's bits)."""
        mantissa, exponent = np.frexp(np.abs(x))  # |x| = mantissa 2**exponent, mantissa in [0.5, 1)
        octave = exponent - self.LOW  # octave 0: |x| in [2**(LOW - 1), 2**LOW)
        step = np.minimum((2 * mantissa - 1) * self.PER_OCTAVE, self.PER_OCTAVE - 1).astype(np.int64)
        index = np.where(octave >= self.HIGH - self.LOW, self.half, octave * self.PER_OCTAVE + step)
        index = np.where((octave < 0) | (mantissa == 0), -1, index)  # near 0, and 0 itself
        return np.where(x >= 0, self.half + 2 + index, self.half - index)

    def update(self, logits: np.ndarray, codes: np.ndarray) -> "LogitMoments":
        """Add (N, L) logits with their target codes (unknown targets skipped)."""
        x = np.clip(np.asarray(logits, np.float64), -self.LIMIT, self.LIMIT)
        known = codes != UNKNOWN
        key = (self._keys(x) + np.arange(self.num_labels) * self.groups) * 2 + (codes == 1)
        key, x = key[known], x[known]
        size = self.num_labels * self.groups * 2
        for i, weights in enumerate((None, x, x * x)):
            sums = np.bincount(key, weights, minlength=size)
            self.stats[i].view(-1).add_(torch.from_numpy(sums).to(self.stats.device))
        return self

    def merge(self, other: "LogitMoments") -> "LogitMoments":
        self.stats += other.stats.to(self.stats.device)
        return self

    def all_reduce(self, group=None) -> "LogitMoments":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.stats, op=dist.ReduceOp.SUM, group=group)
        return self

    def counts(self) -> np.ndarray:
        """(L, groups, 2) counts of negatives and positives."""
        return self.stats[0].cpu().numpy()

    def points(self, part: np.ndarray):
        """The weighted points (x, y, w), each (4 x groups, len(part)), of labels ``part``: each
        group at its mean plus and minus its standard deviation, half its count on each (the
        group's count, mean and variance kept)."""
        n, total, squares = (s[part].cpu().numpy() for s in self.stats)
        mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
        spread = np.sqrt(np.maximum(np.divide(squares, n, out=np.zeros_like(total), where=n > 0) - mean ** 2, 0.0))
        xs, ys, ws = [], [], []
        for sign in (-1.0, 1.0):
            for target in (0, 1):
                xs.append((mean + sign * spread)[..., target].T)
                ys.append(np.full(xs[-1].shape, float(target)))
                ws.append(n[..., target].T / 2)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)


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
