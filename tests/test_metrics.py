import numpy as np
import pytest
import torch
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


@pytest.mark.parametrize("seed,ties", [(8, False), (9, True), (10, True)])
def test_tuned_f1_equals_best_f1_on_sklearn_pr_curve(seed, ties):
    probs, targets = _data(seed, n=400, labels=6, ties=ties)
    th, best = mlabel.tune_thresholds(probs, targets, return_scores=True)
    for j in range(probs.shape[1]):
        precision, recall, _ = skm.precision_recall_curve(targets[:, j], probs[:, j])
        denom = precision + recall
        optimum = np.max(np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0))
        achieved = skm.f1_score(targets[:, j], probs[:, j] >= th[j].item())
        assert achieved == pytest.approx(optimum, abs=1e-9)
        assert best[j].item() == pytest.approx(optimum, abs=1e-6)


def test_tuning_warns_and_falls_back_without_positives():
    probs, targets = _data(11, labels=3)
    targets[:, 1] = 0
    with pytest.warns(UserWarning, match="no positive example"):
        th = mlabel.tune_thresholds(torch.from_numpy(probs), torch.from_numpy(targets), labels=["x", "y", "z"])
    assert th[1].item() == 0.5
