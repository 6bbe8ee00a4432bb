"""Threshold policies: where each label's cut-off should sit for images not yet seen.

The exact tuner (:func:`mlabel.tune_thresholds`) finds the best cut-off *on the validation set*.
With a few hundred images and rare labels that arg-max is noisy: it fits the particular
positives of val. A policy decides, per label, from the same validation scores:

- ``argmax``: the exact tuner's cut-off (the primitive; best on val by construction).
- ``half``: 0.5, the Bayes cut-off for accuracy on calibrated probabilities.
- ``lipton``: for calibrated probabilities the F1-optimal cut-off is half the best attainable F1
  (Lipton, Elkan & Narayanaswamy 2014; F-beta: F* / (1 + beta^2)), with F* the exact optimum
  on val: one number estimated from all of val instead of the position of one point.
- ``bagged``: the mean of the exact cut-offs of ``draws`` bootstrap resamples of val.
- ``smoothed``: the arg-max of the objective computed from kernel-smoothed counts (each score
  spread by a Gaussian of Silverman's bandwidth), on a grid of 1,024 cut-offs per label.
- ``shrunk``: the exact cut-off pulled toward the ``lipton`` one, with weight
  ``positives / (positives + 30)`` on the exact one: the more support, the more it is trusted.
- ``select``: per label, the candidate (argmax, half, lipton, bagged) whose cut-offs, tuned on
  4/5 of val, scored best on the held-out fifth (pooled over 5 folds).

``half``, ``lipton`` and ``shrunk`` assume calibrated probabilities and an F-score objective
(they, ``select`` and ``auto`` where it means ``lipton`` refuse scores outside [0, 1]); the
other policies apply to every objective and every score. ``auto`` is the measured default (docs/THRESHOLDS.md):
``lipton`` for F-scores, else ``argmax`` (see docs/THRESHOLDS.md for the constraint study).

Every choice comes with a bootstrap interval of its val objective at the chosen cut-off
(``level``, 90 % by default) so a person sees how sure the number is. Where the bootstrap is
flat (every resample the same value: no true positive at the cut-off, as for a rare label under
``half``) the interval is the Jeffreys posterior of the label's confusion counts instead, and
the record says so (``interval_note``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ._counting import UNKNOWN, label_blocks
from .metrics import as_arrays
from .cutoffs import FALLBACK_THRESHOLD, check_metric, objective_values
from .thresholds import TunePlan, fold_ids, out_of_fold, tune_cutoffs

__all__ = ["POLICIES", "ThresholdChoice", "ThresholdSettings", "check_scores", "choose", "choose_thresholds", "cross_fit_predictions", "objective_at",
           "resolve_policy"]

POLICIES = ("auto", "argmax", "half", "lipton", "bagged", "smoothed", "shrunk", "select")
F_SCORES = ("f1", "fbeta", "global")
NEEDS_F_SCORE = ("half", "lipton", "shrunk")
SELECT_FROM = ("argmax", "half", "lipton", "bagged")
NEEDS_PROBABILITIES = ("half", "lipton", "shrunk", "select")  # select: its candidates half and lipton
PER_LABEL_ONLY = ("smoothed", "shrunk", "select")
CONSTRAINTS = {"precision_at_recall": "recall", "recall_at_precision": "precision"}
SHRINK_PRIOR = 30.0  # positives at which the exact cut-off and the prior weigh the same
GRID = 1024
POSTERIOR_NOTE = ("every bootstrap resample gave the same value (too few true positives or errors at this "
                  "cut-off): the interval is the Jeffreys posterior of the label's confusion counts")


@dataclass
class ThresholdChoice:
    """Cut-offs chosen by a policy, with what the validation data says about them.

    ``thresholds`` (L,) float64; ``value`` (L,) the objective on the tuning data at those
    cut-offs (NaN where a label has one class); ``interval`` (L, 2) its bootstrap interval at
    ``level`` (for constraint objectives, of the optimised figure whether or not the constraint
    holds in the resample; ``constraint_interval`` gives the constrained figure's);
    ``chosen``: for ``select``, each label's candidate policy; ``posterior``: the labels whose
    bootstrap was flat, whose interval is the Jeffreys posterior one (``interval_note`` says so).
    """
    policy: str
    metric: str
    thresholds: np.ndarray
    value: np.ndarray
    interval: np.ndarray
    level: float
    chosen: list[str] | None = None
    held_out: np.ndarray | None = None  # constraint objectives: the constrained figure out of fold
    target: float | None = None
    constraint_interval: np.ndarray | None = None  # and its bootstrap interval on the tuning data
    posterior: np.ndarray | None = None  # (L,) bool: intervals from the Jeffreys posterior (a flat bootstrap)

    def to_dict(self, labels: Sequence[str]) -> dict:
        """JSON-ready: the policy and, per label, threshold, val objective and interval."""
        def num(x):
            return None if np.isnan(x) else float(x)

        per_label = {}
        for j, name in enumerate(labels):
            row = {"threshold": float(self.thresholds[j]), "val_" + self.metric: num(self.value[j]),
                   f"interval_{round(self.level * 100)}": [num(self.interval[j, 0]), num(self.interval[j, 1])]}
            if self.chosen is not None:
                row["chosen"] = self.chosen[j]
            if self.posterior is not None and self.posterior[j]:
                row["interval_note"] = POSTERIOR_NOTE
            if self.constraint_interval is not None:
                figure = CONSTRAINTS[self.metric]
                row[f"{figure}_interval_{round(self.level * 100)}"] = [num(v) for v in self.constraint_interval[j]]
            if self.held_out is not None:  # does the constraint hold on images not tuned on?
                figure = CONSTRAINTS[self.metric]
                row[f"cross_fit_{figure}"] = num(self.held_out[j])
                row["holds_out_of_sample"] = None if np.isnan(self.held_out[j]) else bool(
                    self.held_out[j] >= self.target)
            per_label[name] = row
        return {"policy": self.policy, "metric": self.metric, "level": self.level, "per_label": per_label}


def resolve_policy(policy: str, metric: str) -> str:
    """``auto`` -> the measured default for ``metric``; refuses a policy that does not apply."""
    if policy not in POLICIES:
        raise ValueError(f"unknown threshold policy {policy!r}; available: {list(POLICIES)}")
    if policy == "auto":
        return "lipton" if metric in F_SCORES else "argmax"
    if policy in NEEDS_F_SCORE and metric not in F_SCORES:
        usable = [p for p in POLICIES if p not in NEEDS_F_SCORE]
        raise ValueError(f"threshold policy {policy!r} needs an F-score objective (f1, fbeta, global), "
                         f"not {metric!r}; use one of {usable}")
    if metric == "global" and policy in PER_LABEL_ONLY:
        raise ValueError(f"threshold policy {policy!r} gives each label its own cut-off; the 'global' "
                         f"objective keeps one: use argmax, half, lipton or bagged")
    return policy


def check_scores(policy: str, name: str, scores: np.ndarray) -> None:
    """Refuse scores outside [0, 1] for a policy that reads them as probabilities (``policy`` as
    asked, ``name`` as resolved: ``auto`` is ``lipton`` for F-scores)."""
    if name not in NEEDS_PROBABILITIES or scores.size == 0:
        return
    low, high = float(scores.min()), float(scores.max())
    if low >= 0.0 and high <= 1.0:
        return
    asked = policy if policy == name else f"{policy} ({name})"
    usable = [p for p in POLICIES if p not in NEEDS_PROBABILITIES and p != "auto"]
    raise ValueError(f"threshold policy {asked!r} reads the scores as calibrated probabilities, but they range "
                     f"over [{low:.4g}, {high:.4g}] (logits?): pass probabilities (the sigmoid of the logits), or set "
                     f"thresholds.policy (policy= in Python) to one that takes any score: {usable}")


@dataclass(frozen=True)
class ThresholdSettings:
    """Everything a threshold policy reads besides the scores (:func:`choose_thresholds`' keywords).

    ``policy``, ``metric``: a policy of :data:`POLICIES` and an objective of
    :data:`mlabel.thresholds.OBJECTIVES` (with ``beta``, ``min_recall``, ``min_precision``).
    ``fallback``: the cut-off of labels with one class. ``seed``: resamples and folds.
    ``draws``: bootstrap resamples of ``bagged``. ``bootstrap``: resamples for the interval (0:
    no interval); ``level``: its coverage. ``check_constraint``: for ``precision_at_recall`` /
    ``recall_at_precision``, measure the constrained figure out of fold (5 folds; ``held_out``).
    ``mode``, ``bins``: how the exact optimum is found (:func:`mlabel.tune_thresholds`).
    ``defaulted``: ``policy`` is what ``thresholds.policy=auto`` resolved to, and is reported as
    ``auto (NAME)``.
    """
    policy: str = "auto"
    metric: str = "f1"
    beta: float = 1.0
    min_recall: float = 0.9
    min_precision: float = 0.9
    fallback: float = FALLBACK_THRESHOLD
    seed: int = 0
    draws: int = 25
    bootstrap: int = 200
    level: float = 0.9
    check_constraint: bool = True
    mode: str = "exact"
    bins: int = 2048
    defaulted: bool = False

    @classmethod
    def of(cls, th, seed: int = 0, defaulted: bool = False) -> "ThresholdSettings":
        """The settings of the config's ``thresholds`` section (:class:`mlabel.config.ThresholdsConfig`)."""
        return cls(policy=th.policy, metric=th.metric, mode=th.mode, bins=th.bins, bootstrap=th.bootstrap,
                   fallback=th.fallback, beta=th.beta, min_recall=th.min_recall, min_precision=th.min_precision,
                   seed=seed, defaulted=defaulted)

    @property
    def plan(self) -> TunePlan:
        """The exact tuner's part of the settings."""
        return TunePlan(self.metric, self.beta, self.min_recall, self.min_precision, self.mode, self.bins,
                        self.fallback, self.draws)

    @property
    def target(self) -> float | None:
        """The constraint a constraint objective must meet (min_recall or min_precision), else None."""
        if self.metric not in CONSTRAINTS:
            return None
        return self.min_recall if self.metric == "precision_at_recall" else self.min_precision


def choose_thresholds(probs, targets, policy: str = "auto", metric: str = "f1", *,
                      labels: Sequence[str] | None = None, **options) -> ThresholdChoice:
    """Per-label cut-offs for unseen data (see the module docstring for the policies).

    Args:
        probs: (N, L) calibrated probabilities (``half``, ``lipton``, ``shrunk``, ``select`` and
            ``auto`` for F-scores refuse scores outside [0, 1]; the others take any score).
        targets: (N, L) 1 / 0 / -1 (unknown, ignored).
        policy, metric: a policy of :data:`POLICIES` and an objective of
            :data:`mlabel.thresholds.OBJECTIVES`.
        labels: names for warnings.
        **options: the other fields of :class:`ThresholdSettings`: ``beta``, ``min_recall``,
            ``min_precision``, ``fallback``, ``seed``, ``draws``, ``bootstrap``, ``level``,
            ``check_constraint``, ``mode``, ``bins``.
    """
    return choose(probs, targets, ThresholdSettings(policy, metric, **options), labels)


def choose(probs, targets, settings: ThresholdSettings, labels: Sequence[str] | None = None) -> ThresholdChoice:
    """:func:`choose_thresholds` with its settings in one value."""
    metric, plan = settings.metric, settings.plan
    check_metric(metric, **plan.objective)
    name = resolve_policy(settings.policy, metric)
    policy = "auto" if settings.defaulted else settings.policy  # as asked, for the messages and the record
    if not 0 < settings.level < 1:
        raise ValueError(f"level must lie in (0, 1), got {settings.level}")
    scores, codes = as_arrays(probs, targets)
    check_scores(policy, name, scores)
    rng = np.random.default_rng(settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning is given once, below
        thresholds, chosen = choose_on_arrays(name, scores, codes, rng, plan)
    one_class = _warn_one_class(codes, labels, settings.fallback)
    value = objective_at(scores, codes, thresholds, metric, **plan.objective)
    value[one_class] = np.nan
    interval, constraint_interval, posterior = _intervals(scores, codes, thresholds, settings, rng)
    interval[one_class] = np.nan
    posterior &= ~one_class
    held_out = None
    if metric in CONSTRAINTS:
        constraint_interval[one_class] = np.nan
    if metric in CONSTRAINTS and settings.check_constraint:
        held_out = _held_out_constraint(scores, codes, name, rng, plan)
        held_out[one_class] = np.nan
    return ThresholdChoice(policy if policy != "auto" else f"auto ({name})", metric, thresholds, value,
                           interval, settings.level, chosen, held_out, settings.target, constraint_interval, posterior)


def _warn_one_class(codes: np.ndarray, labels, fallback: float) -> np.ndarray:
    """(L,) labels with one class in ``codes``; one warning names them and their fallback."""
    one_class = _one_class(codes)
    if one_class.any():
        names = [labels[i] if labels else str(i) for i in np.flatnonzero(one_class)]
        warnings.warn(f"labels {names} have no positive or no negative example to tune on; they keep "
                      f"the threshold {fallback}", stacklevel=3)
    return one_class


def choose_on_arrays(name: str, scores: np.ndarray, codes: np.ndarray, rng: np.random.Generator,
                     plan: TunePlan) -> tuple[np.ndarray, list[str] | None]:
    """Policy ``name`` (resolved) on validated arrays: (L,) cut-offs and, for ``select``, each
    label's candidate. What :func:`choose_thresholds` and cross-fitting run on each fold."""
    if name == "select":
        return _select(scores, codes, rng, plan)
    return _policy(name, scores, codes, rng, plan), None


def _held_out_constraint(scores, codes, name, rng, plan: TunePlan, folds: int = 5):
    """(L,) recall (precision_at_recall) or precision (recall_at_precision) of cut-offs chosen on
    4/5 of the data, measured on the held-out fifth, pooled over the folds."""
    fold_of = fold_ids(len(scores), max(2, min(folds, len(scores))), rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # folds with one class fall back silently
        rows = out_of_fold(scores, codes, fold_of, lambda s, c: choose_on_arrays(name, s, c, rng, plan)[0])
    tp, fp = _counts(scores, codes, rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        if plan.metric == "precision_at_recall":
            return tp / (codes == 1).sum(0)
        return np.where(tp + fp > 0, tp / (tp + fp), 0.0)


def _one_class(codes: np.ndarray) -> np.ndarray:
    return ~((codes == 1).any(0) & (codes == 0).any(0))


def _policy(name, scores, codes, rng, plan: TunePlan) -> np.ndarray:
    """(L,) float64 cut-offs of one policy (labels with one class get the fallback)."""
    metric, objective, fallback = plan.metric, plan.objective, plan.fallback
    one_class = _one_class(codes)
    if name == "half":
        th = np.full(scores.shape[1], 0.5)
    elif name == "bagged":
        th = _bagged(scores, codes, rng, plan)
    elif name == "smoothed":
        th = _smoothed(scores, codes, metric, objective)
    else:
        th, best = _exact(scores, codes, plan)
        if name in ("lipton", "shrunk"):
            b2 = objective["beta"] ** 2 if metric == "fbeta" else 1.0
            lipton = np.nan_to_num(best, nan=fallback * (1 + b2)) / (1 + b2)
            if name == "lipton":
                th = lipton
            else:
                n_pos = (codes == 1).sum(0)
                weight = n_pos / (n_pos + SHRINK_PRIOR)
                th = weight * th + (1 - weight) * lipton
    th = np.array(th, dtype=np.float64)
    th[one_class] = fallback
    return th


def _exact(scores, codes, plan: TunePlan):
    """The exact tuner (the primitive): cut-offs and the objective reached."""
    return tune_cutoffs(scores, codes, plan)


def _bagged(scores, codes, rng, plan: TunePlan) -> np.ndarray:
    """Mean of the exact cut-offs over bootstrap resamples (draws where a label has one class
    are left out of its mean)."""
    n = scores.shape[0]
    total = np.zeros(scores.shape[1])
    count = np.zeros(scores.shape[1])
    for _ in range(plan.draws):
        rows = rng.integers(0, n, n)
        th, _ = _exact(scores[rows], codes[rows], plan)
        ok = ~_one_class(codes[rows])
        total += np.where(ok, th, 0.0)
        count += ok
    return np.where(count > 0, total / np.maximum(count, 1), plan.fallback)


def _smoothed(scores, codes, metric, objective) -> np.ndarray:
    """Arg-max of the objective from Gaussian-smoothed counts on a grid of cut-offs per label."""
    n_labels = scores.shape[1]
    th = np.empty(n_labels)
    for j in range(n_labels):
        known = codes[:, j] != UNKNOWN
        s = scores[known, j].astype(np.float64)
        y = codes[known, j] == 1
        if s.size == 0 or y.all() or not y.any():
            th[j] = FALLBACK_THRESHOLD
            continue
        spread = s.std()
        iqr = np.subtract(*np.percentile(s, [75, 25]))
        sigma = 0.9 * min(spread, iqr / 1.34 if iqr > 0 else spread) * s.size ** -0.2
        sigma = max(sigma, 1e-6 * max(1.0, np.abs(s).max()))
        grid = np.linspace(s.min(), s.max(), GRID)
        # P(score + noise >= t) summed over positives and over negatives; the scores are first
        # counted in 4 x GRID bins (their width is far below sigma), so the cost does not grow with N
        edges = np.linspace(s.min(), s.max(), 4 * GRID + 1)
        centre = (edges[:-1] + edges[1:]) / 2
        where = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 4 * GRID - 1)
        pos, neg = np.bincount(where[y], minlength=4 * GRID), np.bincount(where[~y], minlength=4 * GRID)
        above = 0.5 * (1 + _erf((centre[None, :] - grid[:, None]) / (sigma * np.sqrt(2))))
        tp, fp = above @ pos, above @ neg
        value = objective_values(metric, tp[None].copy(), fp[None], np.array([[y.sum()]]), np.array([[(~y).sum()]]),
                                 objective)[0]
        th[j] = grid[int(np.argmax(value))]
    return th


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.erf(torch.from_numpy(x)).numpy()


def _select(scores, codes, rng, plan: TunePlan, folds: int = 5):
    """Per label, the candidate whose out-of-fold cut-offs score best (pooled counts)."""
    metric = plan.metric
    candidates = [c for c in SELECT_FROM if not (c in NEEDS_F_SCORE and metric not in F_SCORES)]
    n = scores.shape[0]
    fold_of = fold_ids(n, max(2, min(folds, n)), rng)
    tp = np.zeros((len(candidates), scores.shape[1]))
    fp = np.zeros_like(tp)
    for k in np.unique(fold_of):
        held = fold_of == k
        for c, name in enumerate(candidates):  # every candidate on the same fold, in turn
            t, f = _counts(scores[held], codes[held], _policy(name, scores[~held], codes[~held], rng, plan))
            tp[c] += t
            fp[c] += f
    n_pos, n_neg = (codes == 1).sum(0), (codes == 0).sum(0)
    value = objective_values(metric, tp.copy(), fp, n_pos[None], n_neg[None], plan.objective)
    best = np.argmax(value, axis=0)  # ties go to the earlier candidate in SELECT_FROM
    per = {name: _policy(name, scores, codes, rng, plan) for name in {candidates[b] for b in best}}
    th = np.array([per[candidates[b]][j] for j, b in enumerate(best)])
    return th, [candidates[b] for b in best]


def _counts(scores: np.ndarray, codes: np.ndarray, thresholds: np.ndarray):
    """(L,) true and false positives of ``scores >= thresholds`` over known targets."""
    pred = scores >= thresholds
    return (pred & (codes == 1)).sum(0).astype(np.float64), (pred & (codes == 0)).sum(0).astype(np.float64)


def objective_at(scores: np.ndarray, codes: np.ndarray, thresholds: np.ndarray, metric: str, *,
                 beta: float = 1.0, min_recall: float = 0.9, min_precision: float = 0.9) -> np.ndarray:
    """(L,) objective of the decisions ``scores >= thresholds`` (constraint objectives give the
    constrained figure when the constraint holds, else a negative number, as the tuner does)."""
    if metric == "global":
        metric = "f1"
    tp, fp = _counts(scores, codes, thresholds)
    n_pos, n_neg = (codes == 1).sum(0).astype(np.float64), (codes == 0).sum(0).astype(np.float64)
    return objective_values(metric, tp, fp, n_pos, n_neg, dict(beta=beta, min_recall=min_recall, min_precision=min_precision))


def _intervals(scores, codes, thresholds, settings: "ThresholdSettings", rng):
    """Bootstrap intervals (L, 2) at fixed ``thresholds`` over resampled images: of the objective
    (for a constraint objective, of the optimised precision / recall whether or not the
    constraint holds in the resample) and, for a constraint objective, of the constrained
    figure (else None). Both from the same resamples.

    Where every resample gives the same value (no true positive at the cut-off, say: a rare
    label under ``half``), the percentile bootstrap cannot say anything (it collapsed to [0, 0]
    and covered the figure on new data 0.06 of the time); such an interval is the Jeffreys
    posterior one instead (confusion counts + 1/2 each, Dirichlet), flagged in the third
    return value (L,) bool."""
    metric, objective, draws, level = settings.metric, settings.plan.objective, settings.bootstrap, settings.level
    n, n_labels = scores.shape
    constrained = metric in CONSTRAINTS
    out = np.full((n_labels, 2), np.nan)
    other = np.full((n_labels, 2), np.nan) if constrained else None
    flat = np.zeros(n_labels, dtype=bool)
    if draws <= 0 or n == 0:
        return out, other, flat
    # resampled images as multinomial counts: every count is a (draws, N) @ (N, l) product,
    # exact in float32 below 2**24 images
    weights = torch.from_numpy(rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float32))
    tail = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    for b in label_blocks(n, n_labels, 1 << 20):
        pred = scores[:, b] >= thresholds[b]
        true, false = codes[:, b] == 1, codes[:, b] == 0
        cells = [pred & true, pred & false, true, false]
        tp, fp, n_pos, n_neg = ((weights @ torch.from_numpy(m.astype(np.float32))).double().numpy() for m in cells)
        value, figure = _figures(metric, objective, tp, fp, n_pos, n_neg)
        out[b] = np.percentile(value, tail, axis=0).T
        if constrained:
            other[b] = np.percentile(figure, tail, axis=0).T
        # the Jeffreys posterior where the bootstrap is flat: cell weights ~ Gamma(count + 1/2)
        tp, fp, fn, tn = (m.sum(0) for m in (cells[0], cells[1], ~pred & true, ~pred & false))
        g_tp, g_fp, g_fn, g_tn = (rng.gamma(c + 0.5, size=(draws, len(c))) for c in (tp, fp, fn, tn))
        value, figure = _figures(metric, objective, g_tp, g_fp, g_tp + g_fn, g_fp + g_tn)
        for interval, draws_of in ((out, value), (other, figure)):
            if interval is None:
                continue
            part = interval[b]
            collapsed = part[:, 0] == part[:, 1]
            part[collapsed] = np.percentile(draws_of[:, collapsed], tail, axis=0).T
            interval[b] = part
            flat[b] |= collapsed
    return out, other, flat


def _figures(metric, objective, tp, fp, n_pos, n_neg):
    """The interval's figures from (draws, l) counts (or any positive multiples of them): the
    objective, or for a constraint objective (optimised figure, constrained figure)."""
    if metric in CONSTRAINTS:
        precision, recall = tp / np.maximum(tp + fp, 1e-300), tp / np.maximum(n_pos, 1e-300)
        return (precision, recall) if metric == "precision_at_recall" else (recall, precision)
    return objective_values("f1" if metric == "global" else metric, tp, fp, n_pos, n_neg, objective), None


def cross_fit_predictions(probs, targets, folds: int = 5, seed: int = 0, policy: str = "argmax",
                          **tune_kwargs) -> torch.Tensor:
    """Out-of-fold thresholds: each image is judged by thresholds chosen on the other folds
    (by the exact tuner, or by a threshold ``policy``).

    Returns (N, L) thresholds (one row per image) to pass to
    :func:`mlabel.evaluate_predictions`; the F1 reached with them is an honest estimate of the
    F1 the in-sample thresholds will reach on new data. Fallback warnings are silenced here.
    """
    scores, codes = as_arrays(probs, targets)
    n = scores.shape[0]
    if folds < 2 or folds > n:
        raise ValueError(f"cross-fitting needs 2 <= folds <= {n} images, got {folds}")
    tune_kwargs.pop("labels", None)
    plan = TunePlan(**tune_kwargs)
    check_metric(plan.metric, **plan.objective)
    fold_of = fold_ids(n, folds, np.random.default_rng(seed))
    if policy == "argmax":
        def choose(s, c):
            return tune_cutoffs(s, c, plan)[0]
    else:
        name = resolve_policy(policy, plan.metric)
        check_scores(policy, name, scores)

        def choose(s, c):  # each fold's policy draws from its own generator of ``seed``
            return choose_on_arrays(name, s, c, np.random.default_rng(seed), plan)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = out_of_fold(scores, codes, fold_of, choose)
    dtype = torch.float64 if scores.dtype == np.float64 else torch.float32
    return torch.from_numpy(rows).to(dtype=dtype, device=probs.device if torch.is_tensor(probs) else "cpu")
