"""Suspicion of each known (image, label) cell, from out-of-fold probabilities: a pure function of
arrays, used by ``mlabel audit`` and by ``benchmarks/audit.py`` on the same inputs.

Two kinds of label error are scored. *Missing* (given 0, the model says present) applies to the
given negatives; *spurious* (given 1, the model says absent) to the given positives. Unknown (-1)
cells are never scored (NaN in both).

Scorings (``scoring=``):

- ``abs`` (default): ``|given - p|`` on the calibrated probabilities (p for missing, 1 - p for
  spurious). The per-label Platt calibration already puts every label on one probability scale.
- ``margin``: the log-odds distance to the label's own threshold, ``logit(p) - logit(t)`` for
  missing, ``logit(t) - logit(p)`` for spurious (a rare label's threshold sits low).
- ``zscore``: the logit standardised among the label's own given class: for missing,
  ``(logit(p) - mean) / std`` over the label's given negatives; for spurious,
  ``(mean - logit(p)) / std`` over its given positives.

Measured on injected noise (docs/audit.md, ``benchmarks/audit.py``), ``abs`` found as many or
more of the injected cells than ``margin`` in 7 of 8 comparisons (quickstart, MIML, digits, a full
budget; missing and spurious), by 16 of 403 missing labels on the digits, and ``zscore`` fewer
everywhere: ``abs`` is the default.

A cell is *flagged* (listed in issues.csv) where the model disagrees with the given label at the
label's threshold: missing where ``p >= t``, spurious where ``p < t``, whatever the scoring (the
scoring only orders the flagged cells).

Memory: every function walks the rows in blocks of about :data:`BLOCK_CELLS` cells, so besides the
(N, L) inputs and the two (N, L) float32 outputs only one block's temporaries exist at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SCORINGS", "DEFAULT_SCORING", "KINDS", "suspicion", "label_thresholds", "noise_rates",
           "flagged_cells", "suggested_cells", "wilson_interval", "Cells"]

SCORINGS = ("abs", "margin", "zscore")
DEFAULT_SCORING = "abs"
KINDS = ("missing", "spurious", "suggested_positive", "suggested_negative")
BLOCK_CELLS = 2**22  # cells per row block: 4 M float32 cells are 16 MB per temporary
EPS = 1e-6
SUGGEST_POSITIVE = 0.9  # calibrated probability above which an unknown cell is suggested positive
SUGGEST_NEGATIVE = 0.02  # and below which it is suggested negative


def _blocks(n: int, width: int):
    rows = max(1, BLOCK_CELLS // max(1, width))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _check(probs, given) -> tuple[np.ndarray, np.ndarray]:
    probs, given = np.asarray(probs), np.asarray(given)
    if probs.shape != given.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and given {given.shape} must be matching (N, L) arrays")
    return probs, given


def label_thresholds(probs, given) -> np.ndarray:
    """(L,) float64: per label the F1-maximising threshold on ``probs`` (N, L) against ``given``
    (1 / 0 / -1 unknown), the project's exact tuner; 0.5 for a label with a single known class."""
    from ..thresholds import tune_thresholds
    probs, given = _check(probs, given)
    # given as int8 and probs in their own dtype: the tuner's codes are one byte per cell, no copies
    return np.asarray(tune_thresholds(probs, given.astype(np.int8, copy=False), "f1"), dtype=np.float64)


def _class_moments(probs: np.ndarray, given: np.ndarray) -> dict:
    """Per label the mean and std of the logit among given negatives and among given positives."""
    sums = {k: np.zeros((3, probs.shape[1])) for k in (0, 1)}
    for rows in _blocks(*probs.shape):
        z, g = _logit(probs[rows]), given[rows]
        for k in (0, 1):
            m = g == k
            sums[k] += [m.sum(0), np.where(m, z, 0).sum(0), np.where(m, z * z, 0).sum(0)]
    out = {}
    for k in (0, 1):
        n, s, ss = sums[k]
        mean = s / np.maximum(n, 1)
        out[k] = (mean, np.sqrt(np.maximum(ss / np.maximum(n, 1) - mean**2, 0)) + 1e-3)
    return out


def suspicion(probs, given, scoring: str = DEFAULT_SCORING, thresholds=None) -> tuple[np.ndarray, np.ndarray]:
    """Suspicion that each known cell's given label is wrong.

    Args:
        probs: (N, L) calibrated out-of-fold probabilities.
        given: (N, L) given labels, 1 / 0 / -1 unknown.
        scoring: one of :data:`SCORINGS` (see the module docstring).
        thresholds: (L,) the labels' thresholds; default :func:`label_thresholds` of the inputs.

    Returns:
        missing (N, L) float32: the score of given-0 cells, NaN elsewhere; spurious (N, L) float32:
        the score of given-1 cells, NaN elsewhere. Higher is more suspect.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; available: {list(SCORINGS)}")
    probs, given = _check(probs, given)
    t = label_thresholds(probs, given) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    moments = _class_moments(probs, given) if scoring == "zscore" else None
    missing = np.full(probs.shape, np.nan, dtype=np.float32)
    spurious = np.full(probs.shape, np.nan, dtype=np.float32)
    for rows in _blocks(*probs.shape):
        up, down = _score_block(probs[rows], scoring, _logit(t), moments)
        g = given[rows]
        missing[rows] = np.where(g == 0, up, np.nan)
        spurious[rows] = np.where(g == 1, down, np.nan)
    return missing, spurious


def _score_block(p: np.ndarray, scoring: str, threshold_logit: np.ndarray, moments):
    """(rows, L) 'present' and 'absent' scores of one block."""
    if scoring == "abs":
        return p, 1 - p
    z = _logit(p)
    if scoring == "margin":
        return z - threshold_logit, threshold_logit - z
    (mean0, std0), (mean1, std1) = moments[0], moments[1]
    return (z - mean0) / std0, (mean1 - z) / std1


@dataclass
class Cells:
    """Listed cells, best first: ``rows``, ``cols`` (K,) int64, ``kind`` (K,) str, ``score`` (K,)."""
    rows: np.ndarray
    cols: np.ndarray
    kind: np.ndarray
    score: np.ndarray

    @classmethod
    def join(cls, parts: list["Cells"], top: int | None) -> "Cells":
        """The parts merged, sorted by score (highest first, ties by row then label), cut at ``top``."""
        rows, cols = (np.concatenate([getattr(p, k) for p in parts]) for k in ("rows", "cols"))
        kind, score = (np.concatenate([getattr(p, k) for p in parts]) for k in ("kind", "score"))
        order = np.lexsort((cols, rows, -score.astype(np.float64)))[:top]
        return cls(rows[order], cols[order], kind[order], score[order])


def _top_of(mask_score: np.ndarray, offset: int, kind: str, top: int | None) -> Cells:
    """The cells of one block whose score is not NaN, at most ``top`` of the highest."""
    r, c = np.nonzero(~np.isnan(mask_score))
    s = mask_score[r, c]
    if top is not None and len(s) > top:
        keep = np.argpartition(-s, top - 1)[:top]
        r, c, s = r[keep], c[keep], s[keep]
    return Cells(r + offset, c, np.full(len(s), kind, dtype=object), s)


def flagged_cells(probs, missing, spurious, thresholds, top: int | None = None) -> Cells:
    """Cells where the model disagrees with the given label at the label's threshold (missing:
    ``p >= t``; spurious: ``p < t``), ordered by their suspicion score, at most ``top``."""
    t = np.asarray(thresholds)
    parts = [_top_of(np.zeros((0, 0)), 0, "missing", 0)]  # so that no data still joins to empty arrays
    for rows in _blocks(*probs.shape):
        p = probs[rows]
        parts.append(_top_of(np.where(p >= t, missing[rows], np.nan), rows.start, "missing", top))
        parts.append(_top_of(np.where(p < t, spurious[rows], np.nan), rows.start, "spurious", top))
    return Cells.join(parts, top)


def suggested_cells(probs, given, thresholds, top: int | None = None) -> Cells:
    """Unknown cells the model is confident about: ``suggested_positive`` where ``p >= max(t,
    0.9)``, ``suggested_negative`` where ``p <= min(t, 0.02)``; scored by the log-odds margin to
    the threshold, at most ``top``."""
    thresholds = np.asarray(thresholds)
    zt = _logit(thresholds)
    parts = [_top_of(np.zeros((0, 0)), 0, "suggested_positive", 0)]  # so that no data still joins
    for rows in _blocks(*probs.shape):
        p, unknown = probs[rows], given[rows] < 0
        z = _logit(p)
        up = unknown & (p >= np.maximum(thresholds, SUGGEST_POSITIVE))
        down = unknown & (p <= np.minimum(thresholds, SUGGEST_NEGATIVE))
        parts.append(_top_of(np.where(up, z - zt, np.nan), rows.start, "suggested_positive", top))
        parts.append(_top_of(np.where(down, zt - z, np.nan), rows.start, "suggested_negative", top))
    return Cells.join(parts, top)


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (95 % by default) of the proportions ``k / n``; (0, 1) where n = 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    m = np.maximum(n, 1)
    p = k / m
    centre = (p + z * z / (2 * m)) / (1 + z * z / m)
    half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    return np.where(n > 0, centre - half, 0.0), np.where(n > 0, centre + half, 1.0)


def _class_means(probs, given) -> tuple[np.ndarray, np.ndarray]:
    """(L,) mean probability among each label's given negatives and among its given positives."""
    sums = np.zeros((4, np.shape(probs)[1]))
    for rows in _blocks(*np.shape(probs)):
        p, g = probs[rows].astype(np.float64), given[rows]
        sums += [(g == 0).sum(0), np.where(g == 0, p, 0).sum(0), (g == 1).sum(0), np.where(g == 1, p, 0).sum(0)]
    return sums[1] / np.maximum(sums[0], 1), sums[3] / np.maximum(sums[2], 1)


def noise_rates(probs, given, thresholds, labels) -> dict:
    """Per label, the estimated missing-positive rate (given negatives that are positives, over
    the given negatives) and spurious-positive rate (given positives that are negatives, over the
    given positives), each with a 95 % Wilson interval, and the counts.

    The estimator is confident learning's (Northcutt, Jiang & Chuang 2021): a given negative
    counts as a missing positive when its probability reaches the label's *mean probability
    among its given positives*, a given positive as spurious when its probability is at most the
    mean among its given negatives. Measured on the quickstart scenes with 5 % of positives
    removed and 2 % of images given a spurious label, it came within about 2x of the injected
    rates, where counting every disagreement at the F1 threshold overstated them 3-10x (that
    count, ``flagged_*``, is the rows of issues.csv: model errors included). The interval covers
    the sampling of the cells only, not the model's own errors."""
    t = np.asarray(thresholds)
    mean_neg, mean_pos = _class_means(probs, given)
    counts = np.zeros((7, len(labels)), dtype=np.int64)
    for rows in _blocks(*np.shape(probs)):
        p, g = probs[rows], given[rows]
        counts += [(g == 0).sum(0), (g == 1).sum(0), (g < 0).sum(0), ((g == 0) & (p >= t)).sum(0),
                   ((g == 1) & (p < t)).sum(0), ((g == 0) & (p >= mean_pos)).sum(0), ((g == 1) & (p <= mean_neg)).sum(0)]
    neg, pos, unk, miss, spur, confident_miss, confident_spur = counts
    out = {kind: (k / np.maximum(n, 1), *wilson_interval(k, n))
           for kind, k, n in (("missing", confident_miss, neg), ("spurious", confident_spur, pos))}
    return {name: {"threshold": _round(t[j]), "given_positive": int(pos[j]), "given_negative": int(neg[j]),
                   "unknown": int(unk[j]), "flagged_missing": int(miss[j]), "flagged_spurious": int(spur[j]),
                   **{f"{kind}_rate": {"estimate": _round(e[j]), "low": _round(lo[j]), "high": _round(hi[j])}
                      for kind, (e, lo, hi) in out.items()}}
            for j, name in enumerate(labels)}


def _round(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 6)
