"""Differential tests of the metric and threshold core against scikit-learn, torchmetrics and
brute force, over seeded random cases: N from 1, L from 1, ties, exact 0/1, float16/32/64,
negative and > 1 scores, unknown targets (elements, whole labels, whole images), labels with no
positives or only positives. The default run takes a few hundred cases; ``-m slow`` thousands.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import mlabel
from mlabel.thresholds import OBJECTIVES

DTYPES = (np.float16, np.float32, np.float64)


def make_case(seed: int):
    """A random (scores, targets) pair drawing every awkward feature with some probability."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3, 5, rng.integers(6, 60), rng.integers(60, 300)]))
    labels = int(rng.choice([1, 2, rng.integers(3, 9)]))
    targets = (rng.random((n, labels)) < rng.uniform(0.02, 0.7, labels)).astype(np.float64)
    kind = rng.choice(["uniform", "ties", "binary", "logits", "close"])
    if kind == "uniform":
        scores = np.clip(targets * rng.uniform(0, 0.5) + rng.random((n, labels)), 0, 1)
    elif kind == "ties":
        scores = np.round(rng.random((n, labels)) * 0.6 + targets * 0.4, 1)
    elif kind == "binary":
        scores = (rng.random((n, labels)) < 0.3 + 0.4 * targets).astype(np.float64)
    elif kind == "logits":
        scores = rng.normal(0, 5, (n, labels)) + targets * 3
    else:  # scores 1e-9 apart: float32 cannot tell them apart, float64 can
        scores = 0.5 + rng.integers(0, 30, (n, labels)) * 1e-9
    dtype = DTYPES[rng.integers(0, 3)]
    if kind == "close":
        dtype = np.float64
    scores = scores.astype(dtype)
    if rng.random() < 0.4:
        targets[rng.random(targets.shape) < 0.15] = -1
    if rng.random() < 0.15:
        targets[:, rng.integers(labels)] = -1  # a wholly unknown label
    if rng.random() < 0.15:
        targets[rng.integers(n)] = -1  # a wholly unknown image
    if rng.random() < 0.15:
        targets[:, rng.integers(labels)] = 0  # no positives
    if rng.random() < 0.1:
        targets[:, rng.integers(labels)] = 1  # only positives
    return scores, targets


def _close(got, want, tol=1e-9):
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None or (isinstance(got, float) and math.isnan(got))
    return got is not None and abs(got - want) <= tol


def _reference_metrics(scores, targets, th):
    """Every figure from scikit-learn on each label's / image's known targets."""
    s64 = scores.astype(np.float64)
    known = targets >= 0
    ref = {"per_label": []}
    for j in range(targets.shape[1]):
        k = known[:, j]
        y, s = targets[k, j], s64[k, j]
        pred = s >= th[j]
        row = {"ap": skm.average_precision_score(y, s) if (y == 1).any() else None,
               "auroc": skm.roc_auc_score(y, s) if (y == 1).any() and (y == 0).any() else None}
        if k.any():
            row.update(f1=skm.f1_score(y, pred, zero_division=0),
                       precision=skm.precision_score(y, pred, zero_division=0),
                       recall=skm.recall_score(y, pred, zero_division=0))
        else:
            row.update(f1=None, precision=None, recall=None)
        ref["per_label"].append(row)

    def mean(key):
        vals = [r[key] for r in ref["per_label"] if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    ref["mAP"], ref["macro_auroc"], ref["macro_f1"] = mean("ap"), mean("auroc"), mean("f1")
    y, s = targets[known], s64[known]
    pred_all = s64 >= th
    ref["micro_ap"] = skm.average_precision_score(y, s) if (y == 1).any() else None
    ref["micro_auroc"] = skm.roc_auc_score(y, s) if (y == 1).any() and (y == 0).any() else None
    ref["micro_f1"] = skm.f1_score(y, pred_all[known], zero_division=0) if known.any() else None
    ref["hamming_loss"] = skm.hamming_loss(y, pred_all[known]) if known.any() else None
    rows = [i for i in range(len(targets)) if known[i].any()]
    f1s, exact, cover, lrap = [], [], [], []
    for i in rows:
        k = known[i]
        yi, pi, si = targets[i, k], pred_all[i, k], s64[i, k]
        f1s.append(skm.f1_score(yi, pi, zero_division=0))
        exact.append(float(np.array_equal(yi == 1, pi)))
        cover.append(_coverage(yi, si) if len(yi) == 1 else skm.coverage_error(yi[None], si[None]))
        lrap.append(_lrap(yi, si) if len(yi) == 1 else skm.label_ranking_average_precision_score(yi[None], si[None]))
    ref["samples_f1"] = float(np.mean(f1s)) if rows else None
    ref["subset_accuracy"] = float(np.mean(exact)) if rows else None
    ref["coverage_error"] = float(np.mean(cover)) if rows else None
    ref["label_ranking_ap"] = float(np.mean(lrap)) if rows else None
    return ref


def _coverage(y, s):
    """scikit-learn's definition for one image (its function refuses a single column)."""
    return max([(s >= s[j]).sum() for j in np.flatnonzero(y == 1)], default=0)


def _lrap(y, s):
    relevant = np.flatnonzero(y == 1)
    if relevant.size in (0, len(y)):
        return 1.0
    return float(np.mean([((s >= s[j]) & (y == 1)).sum() / (s >= s[j]).sum() for j in relevant]))


def check_metrics(seed):
    scores, targets = make_case(seed)
    rng = np.random.default_rng(seed + 1)
    th = rng.uniform(scores.min(), scores.max() + 1e-3, scores.shape[1]).astype(np.float64)
    got = mlabel.evaluate_predictions(scores, targets, thresholds=th)
    ref = _reference_metrics(scores, targets, th)
    for key in ("mAP", "macro_auroc", "macro_f1", "micro_ap", "micro_auroc", "micro_f1",
                "hamming_loss", "samples_f1", "subset_accuracy", "coverage_error", "label_ranking_ap"):
        assert _close(got[key], ref[key]), (seed, key, got[key], ref[key])
    for j, row in enumerate(ref["per_label"]):
        mine = got["per_label"][str(j)]
        for key, value in row.items():
            assert _close(mine[key], value), (seed, j, key, mine[key], value)
    return scores, targets


def _brute_force(scores, targets, metric, beta=1.0, min_recall=0.9, min_precision=0.9):
    """The best objective over every cut-off ``score >= v`` at a distinct known score."""
    y, s = targets[targets >= 0], scores[targets >= 0].astype(np.float64)
    n_pos, n_neg = (y == 1).sum(), (y == 0).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    pred = s[None, :] >= np.unique(s)[:, None]  # one row per candidate cut-off
    return max(_objective_at(y, row, metric, n_pos, n_neg, beta, min_recall, min_precision) for row in pred)


def _objective_at(y, pred, metric, n_pos, n_neg, beta, min_recall, min_precision):
    tp, fp = float((pred & (y == 1)).sum()), float((pred & (y == 0)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos
    if metric in ("f1", "fbeta", "global"):
        b2 = beta * beta if metric == "fbeta" else 1.0
        return (1 + b2) * tp / (tp + fp + b2 * n_pos)
    if metric == "precision_at_recall":
        return precision if recall >= min_recall else -1.0
    if metric == "recall_at_precision":
        return recall if precision >= min_precision else precision - 2.0
    return recall - fp / n_neg  # youden


def check_thresholds(seed, mode="exact"):
    scores, targets = make_case(seed)
    rng = np.random.default_rng(seed + 2)
    metric = OBJECTIVES[rng.integers(len(OBJECTIVES))]
    kwargs = dict(beta=float(rng.choice([0.5, 1.0, 2.0])), min_recall=float(rng.uniform(0.3, 1.0)),
                  min_precision=float(rng.uniform(0.3, 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        th, value = mlabel.tune_thresholds(scores, targets, metric, mode=mode, return_scores=True, **kwargs)
    th = th.numpy().astype(np.float64)
    assert th.dtype == np.float64
    if metric == "global":
        known = targets >= 0
        want = _brute_force(scores[known], targets[known], "f1")
        if want is None:
            assert np.all(th == 0.5), seed
            return
        y, s = targets[known], scores[known].astype(np.float64)
        got = _objective_at(y, s >= th[0], "f1", (y == 1).sum(), (y == 0).sum(), 1.0, 0, 0)
        assert got == pytest.approx(want, abs=1e-12), (seed, metric)
        return
    for j in range(scores.shape[1]):
        want = _brute_force(scores[:, j], targets[:, j], metric, **kwargs)
        if want is None:
            assert th[j] == 0.5 and math.isnan(value[j]), (seed, j)
            continue
        k = targets[:, j] >= 0
        y, s = targets[k, j], scores[k, j].astype(np.float64)
        got = _objective_at(y, s >= th[j], metric, (y == 1).sum(), (y == 0).sum(), **kwargs)
        assert got == pytest.approx(want, abs=1e-12), (seed, metric, j, got, want, th[j])
        if want >= 0 or metric not in ("precision_at_recall", "recall_at_precision"):
            assert float(value[j]) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", range(200))
def test_metrics_equal_sklearn(seed):
    check_metrics(seed)


@pytest.mark.parametrize("seed", range(200))
def test_thresholds_reach_the_brute_force_optimum(seed):
    check_thresholds(seed)


@pytest.mark.parametrize("seed", range(60))
def test_histogram_mode_reaches_the_brute_force_optimum(seed):
    check_thresholds(seed, mode="histogram")


@pytest.mark.slow
@pytest.mark.parametrize("block", range(20))
def test_thousands_of_cases(block):
    for seed in range(1000 + block * 150, 1000 + (block + 1) * 150):
        check_metrics(seed)
        check_thresholds(seed)
        check_thresholds(seed, mode="histogram")


@pytest.mark.parametrize("seed", range(30))
def test_per_label_ap_and_auroc_equal_torchmetrics(seed):
    """torchmetrics' exact (unbinned) AP and AUROC on each label's known targets, both classes present."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    scores, targets = make_case(seed)
    scores = scores.astype(np.float32)
    got = mlabel.evaluate_predictions(scores, targets)["per_label"]
    for j in range(scores.shape[1]):
        known = targets[:, j] >= 0
        y, s = torch.from_numpy(targets[known, j]).long(), torch.from_numpy(scores[known, j])
        if (y == 1).any() and (y == 0).any():
            assert got[str(j)]["ap"] == pytest.approx(float(tm.binary_average_precision(s, y)), abs=1e-5)
            assert got[str(j)]["auroc"] == pytest.approx(float(tm.binary_auroc(s, y)), abs=1e-5)


# --- the nine defects of issue 14, one named test each ------------------------------------


def test_1_float64_scores_keep_the_predict_everything_optimum():
    th, f1 = mlabel.tune_thresholds(np.array([[0.1], [0.2], [0.3]]), np.array([[1], [1], [0]]),
                                    return_scores=True)
    assert th.dtype == torch.float64 and th.item() <= 0.1
    assert f1.item() == pytest.approx(0.8)
    rng = np.random.default_rng(1)
    scores = 0.5 + rng.integers(0, 1000, (200, 116)) * 1e-9
    targets = (rng.random((200, 116)) < 0.5).astype(float)
    th = mlabel.tune_thresholds(scores, targets).numpy()
    for j in range(116):
        want = _brute_force(scores[:, j], targets[:, j], "f1")
        got = skm.f1_score(targets[:, j], scores[:, j] >= th[j])
        assert got == pytest.approx(want, abs=1e-12), j


def test_2_float32_scores_of_two_and_more_sort_exactly():
    th, f1 = mlabel.tune_thresholds(np.array([[3], [5], [1]], np.float32), np.array([[1], [1], [0]]),
                                    return_scores=True)
    assert 1 < th.item() <= 3 and f1.item() == 1.0
    logits = np.array([[-7.5], [2.25], [1e30], [-1e-30], [0.0]], np.float32)
    th = mlabel.tune_thresholds(logits, np.array([[0], [1], [1], [0], [0]]))
    assert 0.0 < th.item() <= 2.25


def test_3_no_known_target_at_all_gives_nulls_not_an_error():
    scores, targets = np.random.default_rng(3).random((5, 3)), -np.ones((5, 3))
    report = mlabel.evaluate_predictions(scores, targets)
    assert report["mAP"] is None and report["macro_f1"] is None and report["micro_f1"] is None
    assert report["samples_f1"] is None and report["hamming_loss"] is None
    with pytest.warns(UserWarning, match="no positive or no negative"):
        th = mlabel.tune_thresholds(scores, targets, "global")
    assert torch.all(th == 0.5)


def test_4_binary_accuracy_leaves_unknown_images_out():
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.6, 0.4, 0.3])
    targets = np.array([1, 0, 0, 1, -1, -1, -1, -1])
    report = mlabel.evaluate_predictions(scores, targets)
    assert report["accuracy"] == pytest.approx(0.5)  # 2 of the 4 known images


def test_5_platt_fits_each_label_to_its_own_optimum():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(5)
    n, labels = 300, 187
    logits = rng.normal(0, rng.uniform(0.5, 8, labels), (n, labels))
    prob = 1 / (1 + np.exp(-(logits * rng.uniform(0.05, 3, labels) + rng.uniform(-4, 4, labels))))
    targets = (rng.random((n, labels)) < prob).astype(np.float32)
    targets[:, 0] = logits[:, 0] > 0  # perfectly separable
    scale, bias = mlabel.fit_calibration(torch.from_numpy(logits).float(), torch.from_numpy(targets))
    assert torch.isfinite(scale).all() and torch.isfinite(bias).all() and (scale > 0).all()
    x = torch.from_numpy(logits).float().double().numpy()
    for j in range(1, labels):
        if targets[:, j].min() == targets[:, j].max():
            continue
        ref = LogisticRegression(C=1e12, tol=1e-12, max_iter=10000).fit(x[:, j:j + 1], targets[:, j])
        if ref.coef_[0, 0] <= 0:  # the map is kept increasing: compare only where it can match
            continue
        mine = skm.log_loss(targets[:, j], 1 / (1 + np.exp(-(x[:, j] * scale[j].item() + bias[j].item()))))
        theirs = skm.log_loss(targets[:, j], ref.predict_proba(x[:, j:j + 1])[:, 1])
        assert mine <= theirs + 1e-6, j


def test_6_hamming_loss_is_exact():
    targets = np.array([[1, 0, 0]] * 7)
    scores = np.array([[0.9, 0.9, 0.1]] * 7)  # one wrong decision of 3 per image
    report = mlabel.evaluate_predictions(scores, targets)
    assert report["hamming_loss"] == 1 / 3


@pytest.mark.parametrize("case", ["crowded", "poles", "small"])
def test_7_histogram_mode_is_exact_and_the_stream_states_its_bound(case):
    rng = np.random.default_rng(7)
    n = 1000 if case != "small" else 120
    targets = (rng.random((n, 4)) < 0.2).astype(np.float32)
    if case == "crowded":  # every score within 1e-4
        scores = 0.5 + (rng.random((n, 4)) * 5e-5 + targets * 4e-5)
    elif case == "poles":  # piled up at 0 and 1
        scores = np.where(rng.random((n, 4)) < 0.5, rng.random((n, 4)) * 1e-5, 1 - rng.random((n, 4)) * 1e-5)
        scores = np.where(targets == 1, np.maximum(scores, rng.random((n, 4)) * 1e-5 + 0.99999), scores)
    else:
        scores = np.clip(rng.normal(0.3 + 0.3 * targets, 0.2), 0, 1)
    scores = scores.astype(np.float32)
    exact = mlabel.tune_thresholds(scores, targets, return_scores=True)[1].numpy()
    hist = mlabel.tune_thresholds(scores, targets, mode="histogram", return_scores=True)[1].numpy()
    np.testing.assert_allclose(hist, exact, atol=1e-7)
    stream = mlabel.ThresholdTuner(mode="histogram").partial_fit(scores, targets)
    assert np.all(exact <= stream.scores_ + stream.gap_bound_ + 1e-6)


def test_8_images_with_every_target_unknown_leave_the_per_image_metrics():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.9]])
    targets = np.array([[1, 0], [0, 1], [-1, -1]])
    report = mlabel.evaluate_predictions(scores, targets)
    assert report["samples_f1"] == 1.0 and report["subset_accuracy"] == 1.0
    assert report["label_ranking_ap"] == 1.0 and report["coverage_error"] == 1.0


def _official_asl(logits, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    """The published ASL formula with the focusing weight outside the graph (the official
    training's disable_torch_grad_focal_loss=True), written from the paper for comparison."""
    p = torch.sigmoid(logits)
    p_neg = (1 - p + clip).clamp(max=1)
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(p_neg.clamp(min=eps))
    with torch.no_grad():
        pt = p * y + p_neg * (1 - y)
        weight = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * weight).sum()


def test_9_asl_has_no_gradient_through_the_focusing_weight_by_default():
    from mlabel.losses import AsymmetricLoss
    rng = np.random.default_rng(9)
    logits = torch.from_numpy(rng.normal(0, 3, (16, 5))).requires_grad_()
    y = torch.from_numpy((rng.random((16, 5)) < 0.3).astype(np.float64))
    AsymmetricLoss(reduction="sum", gamma_pos=1.0)(logits, y).backward()
    mine, logits.grad = logits.grad.clone(), None
    _official_asl(logits, y, gamma_pos=1.0).backward()
    torch.testing.assert_close(mine, logits.grad, rtol=1e-6, atol=1e-9)
    logits.grad = None
    AsymmetricLoss(reduction="sum", gamma_pos=1.0, focal_grad=True)(logits, y).backward()
    assert not torch.allclose(logits.grad, mine)


@pytest.mark.parametrize("seed", range(10))
def test_micro_ranking_counted_in_chunks_equals_one_pass(seed):
    """Chunks end where runs of equal scores end, so any chunk size gives the same sums."""
    from mlabel._counting import codes_of, micro_sums
    scores, targets = make_case(seed + 500)
    scores = np.round(scores.astype(np.float64), 1).astype(scores.dtype)  # many ties
    codes = codes_of(targets)
    whole = micro_sums(scores, codes)
    for chunk in (1, 2, 7, 64):
        part = micro_sums(scores, codes, chunk=chunk)
        np.testing.assert_allclose([part.ap[0], part.auc[0]], [whole.ap[0], whole.auc[0]], rtol=1e-12)


@pytest.mark.parametrize("metric", ["youden", "f1", "fbeta"])
def test_histogram_bottom_edge_predicts_scores_below_zero(metric):
    """Bin 0 also holds the scores below 0: its lower edge must predict them (it was 0.0,
    which left every negative logit out; found by the slow differential cases, seed 1007)."""
    scores = np.array([2.5422106, -1.207813, 2.3177197, -1.2436802, 2.9278274, 3.4884782,
                       12.120625, -0.67415947], dtype=np.float32)[:, None]
    targets = np.array([-1, 0, 1, 1, -1, 0, 0, 1], dtype=np.float32)[:, None]
    from mlabel.thresholds import ScoreHistogram
    known = targets[:, 0] >= 0
    y, s = targets[known, 0], scores[known, 0].astype(np.float64)
    want = _brute_force(scores[:, 0], targets[:, 0], metric)
    for th in (mlabel.tune_thresholds(scores, targets, metric, mode="histogram").numpy(),
               mlabel.ThresholdTuner(metric, mode="histogram").partial_fit(scores, targets).thresholds_,
               ScoreHistogram(1).update(scores, targets).tune(metric).numpy()):
        got = _objective_at(y, s >= float(th[0]), metric, (y == 1).sum(), (y == 0).sum(), 1.0, 0.9, 0.9)
        assert got == pytest.approx(want, abs=1e-12), (metric, th)
