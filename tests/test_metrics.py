import numpy as np
import pytest
from sklearn import metrics as skm

import mlabel
from mlabel.metrics import auroc, average_precision


def _data(seed, n=300, labels=5, ties=False):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < rng.uniform(0.05, 0.5, labels)).astype(np.float32)
    probs = np.clip(targets * 0.3 + rng.random((n, labels)) * 0.7, 0, 1)
    if ties:
        probs = np.round(probs, 1)  # many equal scores
    return probs.astype(np.float32), targets


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_ap_and_auroc_equal_sklearn(seed, ties):
    probs, targets = _data(seed, ties=ties)
    ap = average_precision(probs, targets).numpy()
    roc = auroc(probs, targets).numpy()
    for j in range(probs.shape[1]):
        assert ap[j] == pytest.approx(skm.average_precision_score(targets[:, j], probs[:, j]), abs=1e-9)
        assert roc[j] == pytest.approx(skm.roc_auc_score(targets[:, j], probs[:, j]), abs=1e-9)


@pytest.mark.parametrize("seed,ties", [(3, False), (4, True)])
def test_summary_metrics_equal_sklearn(seed, ties):
    probs, targets = _data(seed, ties=ties)
    th = np.array([0.3, 0.5, 0.62, 0.45, 0.7], dtype=np.float32)
    report = mlabel.evaluate_predictions(probs, targets, thresholds=th, labels=list("abcde"))
    pred = (probs >= th).astype(int)
    half = (probs >= 0.5).astype(int)
    assert report["mAP"] == pytest.approx(skm.average_precision_score(targets, probs, average="macro"))
    assert report["macro_auroc"] == pytest.approx(skm.roc_auc_score(targets, probs, average="macro"))
    for avg in ("macro", "micro", "samples"):
        assert report[f"{avg}_f1"] == pytest.approx(skm.f1_score(targets, pred, average=avg, zero_division=0))
        assert report[f"{avg}_f1@0.5"] == pytest.approx(skm.f1_score(targets, half, average=avg, zero_division=0))
    for avg in ("macro", "micro"):
        assert report[f"{avg}_precision"] == pytest.approx(skm.precision_score(targets, pred, average=avg, zero_division=0))
        assert report[f"{avg}_recall"] == pytest.approx(skm.recall_score(targets, pred, average=avg, zero_division=0))
    assert report["hamming_loss"] == pytest.approx(skm.hamming_loss(targets, pred))
    assert report["subset_accuracy"] == pytest.approx(skm.accuracy_score(targets, pred))
    f1s = skm.f1_score(targets, pred, average=None, zero_division=0)
    for j, name in enumerate("abcde"):
        row = report["per_label"][name]
        assert row["f1"] == pytest.approx(f1s[j])
        assert row["support"] == int(targets[:, j].sum())
        assert row["threshold"] == pytest.approx(float(th[j]))


def test_label_without_positives_is_left_out_of_map():
    probs, targets = _data(5)
    targets[:, 2] = 0
    report = mlabel.evaluate_predictions(probs, targets, labels=list("abcde"))
    assert report["per_label"]["c"]["ap"] is None
    keep = [0, 1, 3, 4]
    assert report["mAP"] == pytest.approx(skm.average_precision_score(targets[:, keep], probs[:, keep], average="macro"))


def test_unknown_targets_are_ignored_per_label():
    probs, targets = _data(6)
    unknown = np.random.default_rng(6).random(targets.shape) < 0.2
    masked = np.where(unknown, -1, targets)
    ap = average_precision(probs, masked).numpy()
    for j in range(targets.shape[1]):
        keep = ~unknown[:, j]
        assert ap[j] == pytest.approx(skm.average_precision_score(targets[keep, j], probs[keep, j]))


def test_binary_reports_accuracy():
    probs, targets = _data(7, labels=1)
    report = mlabel.evaluate_predictions(probs, targets, thresholds=[0.4])
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(targets[:, 0], probs[:, 0] >= 0.4))
    assert report["accuracy@0.5"] == pytest.approx(skm.accuracy_score(targets[:, 0], probs[:, 0] >= 0.5))


@pytest.mark.parametrize("seed,ties", [(12, False), (13, True)])
def test_more_metrics_equal_sklearn(seed, ties):
    probs, targets = _data(seed, n=250, labels=6, ties=ties)
    targets[:3] = 0  # images without any positive label
    targets[:, 5] = 0  # a label without any positive image
    th = np.linspace(0.3, 0.7, 6).astype(np.float32)
    report = mlabel.evaluate_predictions(probs, targets, thresholds=th)
    pred = (probs >= th).astype(int)
    assert report["weighted_f1"] == pytest.approx(skm.f1_score(targets, pred, average="weighted", zero_division=0))
    cp = skm.precision_score(targets, pred, average="macro", zero_division=0)
    cr = skm.recall_score(targets, pred, average="macro", zero_division=0)
    op = skm.precision_score(targets, pred, average="micro", zero_division=0)
    orr = skm.recall_score(targets, pred, average="micro", zero_division=0)
    assert (report["CP"], report["CR"], report["OP"], report["OR"]) == pytest.approx((cp, cr, op, orr))
    assert report["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert report["OF1"] == pytest.approx(skm.f1_score(targets, pred, average="micro"))
    assert report["micro_auroc"] == pytest.approx(skm.roc_auc_score(targets, probs, average="micro"))
    assert report["micro_ap"] == pytest.approx(skm.average_precision_score(targets, probs, average="micro"))
    assert report["coverage_error"] == pytest.approx(skm.coverage_error(targets, probs))
    assert report["label_ranking_ap"] == pytest.approx(skm.label_ranking_average_precision_score(targets, probs))


def test_ranking_metrics_leave_unknown_labels_out_of_each_image():
    probs, targets = _data(14, n=120, labels=7, ties=True)
    unknown = np.random.default_rng(14).random(targets.shape) < 0.25
    masked = np.where(unknown, -1, targets)
    report = mlabel.evaluate_predictions(probs, masked)
    coverage, lrap = [], []
    for i in range(len(probs)):
        keep = ~unknown[i]
        y, s = targets[i, keep][None], probs[i, keep][None]
        coverage.append(skm.coverage_error(y, s) if keep.any() else 0.0)
        lrap.append(skm.label_ranking_average_precision_score(y, s) if keep.sum() > 1 else 1.0)
    assert report["coverage_error"] == pytest.approx(np.mean(coverage))
    assert report["label_ranking_ap"] == pytest.approx(np.mean(lrap))
    known = ~unknown
    assert report["micro_auroc"] == pytest.approx(skm.roc_auc_score(targets[known], probs[known]))


def test_calibration_error_matches_a_direct_loop():
    probs, targets = _data(15, n=500, labels=3)
    ece = mlabel.metrics.calibration_error(probs, targets, bins=10).numpy()
    for j in range(3):
        total = 0.0
        for b in range(10):
            inside = (probs[:, j] >= b / 10) & ((probs[:, j] < (b + 1) / 10) | (b == 9))
            if inside.any():
                total += inside.sum() / len(probs) * abs(probs[inside, j].mean() - targets[inside, j].mean())
        assert ece[j] == pytest.approx(total, abs=1e-6)


def test_per_image_thresholds_equal_the_same_cutoff_applied_row_by_row():
    probs, targets = _data(16, n=60, labels=4)
    rows = np.random.default_rng(16).uniform(0.2, 0.8, probs.shape).astype(np.float32)
    report = mlabel.evaluate_predictions(probs, targets, thresholds=rows)
    pred = (probs >= rows).astype(int)
    assert report["macro_f1"] == pytest.approx(skm.f1_score(targets, pred, average="macro", zero_division=0))
    assert report["per_label"]["0"]["threshold"] is None  # no single threshold to report
