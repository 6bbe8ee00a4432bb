"""The streamed path (ScoreHistogram, histogram_metrics) against scikit-learn and brute force.

Per case class, the histogram figures are compared with the exact ones on the same scores:
F1 (and every objective) at the tuned threshold must equal the brute-force figure of
``scores >= threshold`` exactly; AP is the expectation over the orders the histogram cannot see,
so its error is bounded per class by what was measured (benchmarks/streaming_error.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mlabel
from mlabel.streaming import histogram_metrics
from mlabel.thresholds import ScoreHistogram, ThresholdTuner


def _f1(y, predicted):
    tp = (predicted & (y == 1)).sum()
    return 2 * tp / max(2 * tp + (predicted & (y == 0)).sum() + (~predicted & (y == 1)).sum(), 1)


# --- regressions named in issue 27, section 2 --------------------------------------------------

def test_metrics_at_the_tuned_threshold_of_a_non_power_of_two_histogram():
    h = ScoreHistogram(1, bins=100)
    h.update(np.float32([[.05], [.099], [.105], [.5]]), np.float32([[0], [0], [1], [1]]))
    assert histogram_metrics(h, h.tune("f1").numpy())["f1"][0] == 1.0  # p >= 0.1 separates them


@pytest.mark.parametrize("scores, targets, bins", [
    ([.81, .08, .18, .23, .18, .8], [1, 1, 0, 0, 0, 0], 100),
    ([-3.0000000001, .3, .7], [1, 0, 1], 2048),
])
def test_histogram_thresholds_of_float64_scores_keep_their_decisions(scores, targets, bins):
    """The tuned threshold is a float64 for float64 scores, and the F1 reported is the F1 of
    ``scores >= threshold`` (a float32 threshold rounded past the scores it separates)."""
    s, y = np.array(scores, np.float64)[:, None], np.array(targets, np.float32)[:, None]
    h = ScoreHistogram(1, bins=bins).update(s, y)
    tuner = ThresholdTuner(mode="histogram", bins=bins).partial_fit(s, y)
    for th, value in (h.tune("f1", return_scores=True), (tuner.thresholds_, tuner.scores_)):
        assert th.dtype in (torch.float64, np.float64)
        assert float(value[0]) == pytest.approx(_f1(y[:, 0], s[:, 0] >= th[0].item()), abs=1e-12)


def test_update_sparse_bins_float64_scores_as_update_does():
    from mlabel.data.sparse import SparseLabels
    values = np.array([np.nextafter(.5, 0), .5, np.nextafter(.25, 1), 1 / 3, np.nextafter(1.0, 0), 1e-300])
    scores = np.repeat(values[:, None], 3, 1)
    dense = np.zeros((len(values), 3), np.float32)
    dense[::2, 1] = 1
    a = ScoreHistogram(3, bins=2048).update(scores, dense)
    b = ScoreHistogram(3, bins=2048).update_sparse(scores, SparseLabels.from_dense(dense))
    assert torch.equal(a.counts, b.counts) and torch.equal(a.lowest, b.lowest)
    assert a.counts[0, 1023].sum() == 1 and a.counts[0, 1024].sum() == 1  # nextafter(.5, 0) < .5


def _histogram_of_counts(neg, pos):
    """A one-label histogram holding the given ascending per-bin counts."""
    h = ScoreHistogram(1, bins=len(neg))
    h.counts[0, :, 0], h.counts[0, :, 1] = torch.as_tensor(neg), torch.as_tensor(pos)
    return h


def _orders(neg, pos):
    """Every distinct order of the targets inside each bin (bins from the top down)."""
    from itertools import permutations, product
    per_bin = [sorted(set(permutations([1] * p + [0] * n))) for n, p in zip(neg[::-1], pos[::-1])]
    for parts in product(*per_bin):
        yield np.concatenate([np.array(part, dtype=np.int64) for part in parts])


@pytest.mark.parametrize("seed", range(12))
def test_histogram_ap_is_the_mean_ap_over_every_order_inside_the_bins(seed):
    """The closed form against brute force: scikit-learn's AP of every order the histogram
    cannot tell apart (distinct scores), averaged."""
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(1, 5)) + 1
    neg, pos = rng.integers(0, 4, bins), rng.integers(0, 3, bins)
    pos[rng.integers(bins)] += 1
    aps = [average_precision_score(y, -np.arange(len(y))) for y in _orders(neg, pos)]
    got = histogram_metrics(_histogram_of_counts(neg, pos))["ap"][0]
    assert got == pytest.approx(np.mean(aps), abs=1e-12)


def test_rare_label_ap_is_not_biased_low():
    """With 10^5 images, labels of 1 and 3 positives (issue 27: 1 positive gave 0.0043 for an
    exact 0.0114, every error negative): errors of both signs, mean and worst small."""
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    n, labels = 100_000, 24
    targets = np.zeros((n, labels), np.float32)
    for j in range(labels):
        targets[rng.choice(n, 1 + 2 * (j % 2), replace=False), j] = 1
    probs = (1 / (1 + np.exp(-(rng.normal(0, 1, (n, labels)) + 2.5 * targets - 3)))).astype(np.float32)
    got = histogram_metrics(ScoreHistogram(labels).update(probs, targets))["ap"]
    exact = np.array([average_precision_score(targets[:, j], probs[:, j]) for j in range(labels)])
    error = got - exact
    assert np.abs(error).max() < 2e-3 and abs(error.mean()) < 3e-4 and (error > 0).any()


def test_a_streamed_split_fits_the_calibration_on_the_logits_behind_saturated_probabilities():
    """stream_tune's pass (SplitStream with logits): a tenth of the float32 probabilities are
    exactly 1, yet the fit follows the fit on the logits themselves (and not without them)."""
    from mlabel.calibration import fit_calibration, fit_calibration_from_histogram
    from mlabel.streaming import SplitStream
    rng = np.random.default_rng(4)
    targets = (rng.random((20_000, 4)) < 0.2).astype(np.float32)
    logits = torch.from_numpy(rng.normal(0, 12, targets.shape) + 8 * targets).float()
    given, derived = SplitStream(4, logits=True), SplitStream(4, logits=True)
    for rows in np.array_split(np.arange(len(logits)), 3):
        given.update(torch.sigmoid(logits[rows]), targets[rows], logits=logits[rows])
        derived.update(torch.sigmoid(logits[rows]), targets[rows])
    assert (torch.sigmoid(logits) == 1).float().mean() > 0.1
    scale, bias = fit_calibration(logits, targets)
    got_scale, got_bias = fit_calibration_from_histogram(given.histogram)
    assert (got_scale - scale).abs().max() < 1e-3 and (got_bias - bias).abs().max() < 1e-3
    capped_scale, capped_bias = fit_calibration_from_histogram(derived.histogram)  # logit(1.0) taken as 16.6
    assert max((capped_scale - scale).abs().max(), (capped_bias - bias).abs().max()) > 1e-2
