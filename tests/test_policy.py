"""Threshold policies (mlabel.policy) against a known truth, and their edge cases."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from mlabel.policy import POLICIES, choose_thresholds, objective_at, resolve_policy

SHAPES = [(0.6, 2.5), (1.0, 6.0), (0.4, 8.0)]  # Beta(a, b) probabilities: prevalence 19 %, 14 %, 5 %


def calibrated(n: int, seed: int):
    """Calibrated probabilities (y ~ Bernoulli(p)) for three labels of different prevalence."""
    rng = np.random.default_rng(seed)
    p = np.stack([rng.beta(a, b, n) for a, b in SHAPES], axis=1)
    return p, (rng.random(p.shape) < p).astype(np.float32)


@pytest.fixture(scope="module")
def truth():
    """Population F1 as a function of the cut-off, per label, from 4 million draws of p: with
    calibrated p, E[tp] = sum p 1(p >= t), so F1(t) = 2 E[p; p >= t] / (E[p] + P(p >= t))."""
    rng = np.random.default_rng(123)
    grid = np.linspace(0.0, 1.0, 2001)
    curves = []
    for a, b in SHAPES:
        p = np.sort(rng.beta(a, b, 4_000_000))[::-1]
        mass_above = np.concatenate([[0.0], np.cumsum(p)])
        count = len(p) - np.searchsorted(p[::-1], grid, side="left")  # p >= t
        curves.append(2 * mass_above[count] / (p.sum() + count))
    curves = np.array(curves)
    return grid, curves


def population_f1(truth, thresholds):
    grid, curves = truth
    return np.array([np.interp(t, grid, c) for t, c in zip(thresholds, curves)])


def test_lipton_rule_holds_for_the_generated_truth(truth):
    grid, curves = truth
    best = curves.max(1)
    t_star = grid[curves.argmax(1)]
    np.testing.assert_allclose(t_star, best / 2, atol=1e-3)  # the fact the lipton policy rests on


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "half"])
def test_policies_reach_the_population_optimum_as_n_grows(truth, policy):
    grid, curves = truth
    best = curves.max(1)
    for n, tolerance in ((1000, 0.01), (10_000, 0.004), (30_000, 0.0015)):
        gaps = []
        for seed in range(3):
            p, y = calibrated(n, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                th = choose_thresholds(p, y, policy, seed=seed, bootstrap=0).thresholds
            gaps.append(best - population_f1(truth, th))
        assert np.mean(gaps) < tolerance, (policy, n, np.mean(gaps, 0))


def test_half_is_the_calibrated_bayes_cut_off():
    p, y = calibrated(500, 0)
    assert np.all(choose_thresholds(p, y, "half", bootstrap=0).thresholds == 0.5)


def test_value_is_the_val_objective_and_the_interval_covers_it():
    p, y = calibrated(800, 1)
    choice = choose_thresholds(p, y, "argmax", bootstrap=300, seed=2)
    # independent reference: F1 from counts
    pred = p >= choice.thresholds
    tp = (pred & (y == 1)).sum(0)
    f1 = 2 * tp / (pred.sum(0) + (y == 1).sum(0))
    np.testing.assert_allclose(choice.value, f1, rtol=1e-12)
    assert np.all(choice.interval[:, 0] <= choice.value) and np.all(choice.value <= choice.interval[:, 1])
    width = choice.interval[:, 1] - choice.interval[:, 0]
    assert np.all(width > 0.01) and np.all(width < 0.3)
    wider = choose_thresholds(p[:200], y[:200], "argmax", bootstrap=300, seed=2).interval
    assert np.all(wider[:, 1] - wider[:, 0] > width)  # fewer images, less certainty


def test_unknown_targets_and_one_class_labels_keep_working():
    p, y = calibrated(600, 3)
    y[::3, 0] = -1  # a third unknown
    y[:, 1] = 0     # no positives in val
    y[:, 2] = -1    # nothing known
    for policy in POLICIES:
        with pytest.warns(UserWarning, match="no positive or no negative"):
            choice = choose_thresholds(p, y, policy, labels=["a", "b", "c"], bootstrap=50)
        assert choice.thresholds[1] == choice.thresholds[2] == 0.5
        assert np.isnan(choice.value[1:]).all() and np.isnan(choice.interval[1:]).all()
        known = y[:, 0] >= 0
        reference = choose_thresholds(p[known, :1], y[known, :1], policy, bootstrap=0, seed=0).thresholds[0]
        if policy in ("argmax", "half", "lipton", "shrunk", "smoothed"):  # no resampling: identical
            assert choice.thresholds[0] == reference
        record = json.loads(json.dumps(choice.to_dict(["a", "b", "c"])))
        assert record["per_label"]["c"]["val_f1"] is None


def test_constraint_objectives_report_whether_the_target_holds_out_of_sample():
    p, y = calibrated(3000, 4)
    choice = choose_thresholds(p, y, "auto", "precision_at_recall", min_recall=0.8, bootstrap=100)
    row = choice.to_dict(["a", "b", "c"])["per_label"]["a"]
    assert 0 < row["cross_fit_recall"] <= 1
    pred, true = p[:, 0] >= choice.thresholds[0], y[:, 0] == 1
    val_recall, val_precision = (pred & true).sum() / true.sum(), (pred & true).sum() / pred.sum()
    assert val_recall >= 0.8 and row["val_precision_at_recall"] == pytest.approx(val_precision)
    low, high = row["recall_interval_90"]
    assert low <= val_recall <= high and high - low < 0.2
    assert row["interval_90"][0] <= val_precision <= row["interval_90"][1]
    assert row["holds_out_of_sample"] == (row["cross_fit_recall"] >= 0.8)
    with pytest.raises(ValueError, match="needs an F-score objective"):
        choose_thresholds(p, y, "lipton", "precision_at_recall")


def test_policy_names_are_checked():
    with pytest.raises(ValueError, match="unknown threshold policy"):
        resolve_policy("median", "f1")
    with pytest.raises(ValueError, match="keeps one"):
        resolve_policy("select", "global")
    assert resolve_policy("auto", "fbeta") in POLICIES


def test_objective_at_matches_counts():
    p, y = calibrated(300, 5)
    th = np.array([0.3, 0.2, 0.1])
    pred = p >= th
    tp = (pred & (y == 1)).sum(0)
    np.testing.assert_allclose(objective_at(p, (y == 1).astype(np.uint8), th, "f1"),
                               2 * tp / (pred.sum(0) + (y == 1).sum(0)))


@pytest.mark.parametrize("override, message", [
    ("thresholds.policy=lipton thresholds.metric=precision_at_recall", "needs an F-score"),
    ("thresholds.policy=select thresholds.metric=global", "keeps one"),
    ("thresholds.bootstrap=-1", "thresholds.bootstrap"),
    ("thresholds.min_recall=5 thresholds.metric=precision_at_recall", "min_recall"),
    ("thresholds.bins=0", "thresholds.bins"),
    ("thresholds.fallback=7", "thresholds.fallback"),
])
def test_threshold_settings_are_refused_before_training(override, message):
    from mlabel.checks import load_checked
    from mlabel.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        load_checked("quickstart", override.split())


@pytest.mark.parametrize("policy", ["half", "lipton", "auto", "shrunk", "select"])
def test_policies_that_read_probabilities_refuse_logits(policy):
    """half, lipton (and auto, which is lipton for F-scores), shrunk and select (whose candidates
    include half and lipton) take the scores as calibrated probabilities: logits are refused
    with the reason and the key, in choose_thresholds and in cross-fitting."""
    from mlabel.policy import cross_fit_predictions
    p, y = calibrated(400, 6)
    logits = np.log(p) - np.log1p(-p)
    with pytest.raises(ValueError, match=r"probabilities.*thresholds\.policy"):
        choose_thresholds(logits, y, policy, bootstrap=0)
    with pytest.raises(ValueError, match=r"probabilities.*thresholds\.policy"):
        cross_fit_predictions(logits, y, folds=3, policy=policy)
    choose_thresholds(p, y, policy, bootstrap=0)  # probabilities, 0 and 1 included, pass
    choose_thresholds(np.clip(np.round(p), 0, 1), y, policy, bootstrap=0)


@pytest.mark.parametrize("policy, metric", [("argmax", "f1"), ("bagged", "f1"), ("smoothed", "f1"),
                                            ("auto", "precision_at_recall")])
def test_policies_for_any_score_still_take_logits(policy, metric):
    p, y = calibrated(400, 7)
    logits = np.log(p) - np.log1p(-p)
    on_logits = choose_thresholds(logits, y, policy, metric, bootstrap=0, check_constraint=False).thresholds
    on_probs = choose_thresholds(p, y, policy, metric, bootstrap=0, check_constraint=False).thresholds
    if policy == "argmax":  # the same decisions: the cut-offs map through the sigmoid
        np.testing.assert_array_equal(logits >= on_logits, p >= on_probs)


def _population_f1(t, a, b):
    """F1 on new data at cut-off t of calibrated p ~ Beta(a, b): 2 E[p; p >= t] / (E[p] + P(p >= t))."""
    from scipy.special import betainc
    mean = a / (a + b)
    return 2 * mean * (1 - betainc(a + 1, b, t)) / (mean + 1 - betainc(a, b, t))


def test_a_flat_bootstrap_gives_the_posterior_interval_and_says_so():
    """half on a rare label (prevalence 5 %, 300 images): almost no true positive at 0.5, so every
    resample scored 0 and the interval was [0, 0], covering the F1 on new data 0.1 of the time.
    The interval is then the Jeffreys posterior one; over seeded draws it covers it about 0.9."""
    a, b = 0.4, 8.0
    covered, flagged = [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        p = rng.beta(a, b, (300, 1))
        y = (rng.random(p.shape) < p).astype(np.float32)
        choice = choose_thresholds(p, y, "half", bootstrap=200, seed=seed)
        low, high = choice.interval[0]
        covered.append(low <= _population_f1(0.5, a, b) <= high)
        record = choice.to_dict(["rare"])["per_label"]["rare"]
        flagged.append("interval_note" in record)
        assert ("interval_note" in record) == bool(choice.posterior[0])
        if flagged[-1]:
            assert high > low and "Jeffreys" in record["interval_note"]
    assert np.mean(flagged) > 0.5 and np.mean(covered) >= 0.8
    p, y = calibrated(800, 1)  # a common label: the bootstrap is kept, without a note
    choice = choose_thresholds(p, y, "argmax", bootstrap=200, seed=2)
    assert not choice.posterior.any() and "interval_note" not in json.dumps(choice.to_dict(["a", "b", "c"]))
