"""Threshold tuning against scikit-learn's curves, which enumerate every achievable cut-off."""
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from sklearn.base import clone

import mlabel
from mlabel.policy import cross_fit_predictions
from mlabel.thresholds import ScoreHistogram, ThresholdTuner


def _data(seed, n=400, labels=6, ties=False, unknown=0.0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < rng.uniform(0.05, 0.5, labels)).astype(np.float32)
    probs = np.clip(targets * 0.3 + rng.random((n, labels)) * 0.7, 0, 1).astype(np.float32)
    if ties:
        probs = np.round(probs, 1)
    if unknown:
        targets[rng.random(targets.shape) < unknown] = -1
    return probs, targets


def _curve(y, s):
    """Precision and recall at every cut-off scikit-learn enumerates (its end point dropped)."""
    precision, recall, _ = skm.precision_recall_curve(y, s)
    return precision[:-1], recall[:-1]


def _fbeta(p, r, beta):
    den = beta**2 * p + r
    return np.where(den > 0, (1 + beta**2) * p * r / np.where(den > 0, den, 1), 0)


# float32 takes the uint32 key path, float64 the argsort path (see mlabel._counting).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed,ties,unknown", [(0, False, 0.0), (1, True, 0.0), (2, True, 0.2)])
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_fbeta_optimum_equals_sklearn_curve(dtype, seed, ties, unknown, beta):
    probs, targets = _data(seed, ties=ties, unknown=unknown)
    metric = "f1" if beta == 1.0 else "fbeta"
    th, best = mlabel.tune_thresholds(probs.astype(dtype), targets, metric, beta=beta, return_scores=True)
    for j in range(probs.shape[1]):
        keep = targets[:, j] >= 0
        y, s = targets[keep, j], probs[keep, j]
        optimum = _fbeta(*_curve(y, s), beta).max()
        achieved = skm.fbeta_score(y, s >= th[j].item(), beta=beta)
        assert achieved == pytest.approx(optimum, abs=1e-12)
        assert best[j].item() == pytest.approx(optimum, abs=1e-6)


def test_logit_scores_give_the_same_decisions_as_probabilities():
    probs, targets = _data(3, ties=True)
    logits = torch.logit(torch.from_numpy(probs).double().clamp(1e-6, 1 - 1e-6))
    th_p = mlabel.tune_thresholds(probs, targets)
    th_l = mlabel.tune_thresholds(logits, targets)
    assert torch.equal(torch.from_numpy(probs) >= th_p, logits >= th_l.double())


@pytest.mark.parametrize("seed,ties", [(4, False), (5, True)])
@pytest.mark.parametrize("min_recall", [0.5, 0.9])
def test_precision_at_recall_equals_sklearn_curve(seed, ties, min_recall):
    probs, targets = _data(seed, ties=ties)
    th, best = mlabel.tune_thresholds(probs, targets, "precision_at_recall", min_recall=min_recall,
                                      return_scores=True)
    for j in range(probs.shape[1]):
        precision, recall = _curve(targets[:, j], probs[:, j])
        optimum = precision[recall >= min_recall].max()
        pred = probs[:, j] >= th[j].item()
        assert skm.recall_score(targets[:, j], pred) >= min_recall
        assert skm.precision_score(targets[:, j], pred) == pytest.approx(optimum, abs=1e-12)
        # Among cut-offs of that precision, the one with the most recall.
        best_recall = recall[(recall >= min_recall) & np.isclose(precision, optimum, rtol=0, atol=1e-12)].max()
        assert skm.recall_score(targets[:, j], pred) == pytest.approx(best_recall, abs=1e-12)
        assert best[j].item() == pytest.approx(optimum, abs=1e-6)


@pytest.mark.parametrize("seed,ties", [(6, False), (7, True)])
def test_recall_at_precision_equals_sklearn_curve_and_flags_unreachable(seed, ties):
    probs, targets = _data(seed, ties=ties)
    min_precision = 0.8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        th, best = mlabel.tune_thresholds(probs, targets, "recall_at_precision",
                                          min_precision=min_precision, return_scores=True)
    for j in range(probs.shape[1]):
        precision, recall = _curve(targets[:, j], probs[:, j])
        pred = probs[:, j] >= th[j].item()
        if (precision >= min_precision).any():
            optimum = recall[precision >= min_precision].max()
            assert skm.recall_score(targets[:, j], pred) == pytest.approx(optimum, abs=1e-12)
            assert skm.precision_score(targets[:, j], pred) >= min_precision
        else:
            assert np.isnan(best[j].item())
            assert skm.precision_score(targets[:, j], pred) == pytest.approx(precision.max(), abs=1e-12)
            assert any("never reach the requested precision" in str(w.message) for w in caught)


@pytest.mark.parametrize("seed,ties", [(8, False), (9, True)])
def test_youden_equals_sklearn_roc_curve(seed, ties):
    probs, targets = _data(seed, ties=ties)
    th, best = mlabel.tune_thresholds(probs, targets, "youden", return_scores=True)
    for j in range(probs.shape[1]):
        fpr, tpr, _ = skm.roc_curve(targets[:, j], probs[:, j], drop_intermediate=False)
        optimum = (tpr - fpr)[1:].max()  # sklearn's first point predicts nothing
        pred = probs[:, j] >= th[j].item()
        achieved = skm.recall_score(targets[:, j], pred) - (pred & (targets[:, j] == 0)).sum() / (targets[:, j] == 0).sum()
        assert achieved == pytest.approx(optimum, abs=1e-12)
        assert best[j].item() == pytest.approx(optimum, abs=1e-6)


def test_global_threshold_maximises_micro_f1_over_every_candidate():
    probs, targets = _data(10, n=150, labels=4, ties=True, unknown=0.1)
    th, best = mlabel.tune_thresholds(probs, targets, "global", return_scores=True)
    assert torch.unique(th).numel() == 1
    known = targets >= 0
    y, s = targets[known], probs[known]
    brute = max(skm.f1_score(y, s >= c) for c in np.unique(s))
    assert skm.f1_score(y, s >= th[0].item()) == pytest.approx(brute, abs=1e-12)
    assert best[0].item() == pytest.approx(brute, abs=1e-6)


@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_single_class_labels_fall_back_with_a_warning_naming_them(mode):
    probs, targets = _data(11, labels=3)
    targets[:, 1] = 0
    targets[:, 2] = 1
    with pytest.warns(UserWarning, match=r"\['y', 'z'\] have no positive or no negative"):
        th, best = mlabel.tune_thresholds(torch.from_numpy(probs), torch.from_numpy(targets), mode=mode,
                                          labels=["x", "y", "z"], return_scores=True)
    assert th[1].item() == th[2].item() == 0.5
    assert np.isnan(best[1].item()) and np.isnan(best[2].item()) and not np.isnan(best[0].item())


def _realistic(seed, n=20_000, labels=8, unknown=0.0):
    """Sigmoid of separated normal logits: scores piled up near 0 like a trained model's."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, labels)) < rng.uniform(0.01, 0.3, labels)).astype(np.float32)
    logits = rng.normal(-3.0, 1.5, (n, labels)) + targets * rng.uniform(1.5, 4.0, labels)
    if unknown:
        targets[rng.random(targets.shape) < unknown] = -1
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets


@pytest.mark.parametrize("metric", ["f1", "youden"])
def test_histogram_mode_reaches_the_exact_optimum(metric):
    probs, targets = _realistic(12, unknown=0.05)
    exact = mlabel.tune_thresholds(probs, targets, metric)
    streamed = mlabel.tune_thresholds(probs, targets, metric, mode="histogram", bins=2048)
    for j in range(probs.shape[1]):
        keep = targets[:, j] >= 0
        y, s = targets[keep, j], probs[keep, j]
        if metric == "f1":
            a, b = skm.f1_score(y, s >= exact[j].item()), skm.f1_score(y, s >= streamed[j].item())
        else:
            a, b = (skm.balanced_accuracy_score(y, s >= t[j].item()) for t in (exact, streamed))
        assert b == pytest.approx(a, abs=1e-12)


def test_histograms_merge_by_summation():
    probs, targets = _realistic(13, n=3000, unknown=0.1)
    whole = ScoreHistogram(8, bins=256).update(probs, targets)
    parts = [ScoreHistogram(8, bins=256).update(probs[i::3], targets[i::3]) for i in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.counts, whole.counts)
    assert int(whole.counts.sum()) == int((targets >= 0).sum())
    assert torch.equal(merged.tune(), whole.tune())


def _ddp_worker(rank, world, port, probs, targets, result):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        hist = ScoreHistogram(probs.shape[1], bins=128).update(probs[rank::world], targets[rank::world])
        hist.all_reduce()
        if rank == 0:
            result.copy_(hist.counts)
    finally:
        dist.destroy_process_group()


def test_histograms_all_reduce_across_two_gloo_ranks():
    import socket
    import torch.multiprocessing as mp
    probs, targets = _realistic(14, n=1000, labels=3)
    result = torch.zeros(3, 128, 2, dtype=torch.int64).share_memory_()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, torch.from_numpy(probs), torch.from_numpy(targets), result), nprocs=2)
    assert torch.equal(result, ScoreHistogram(3, bins=128).update(probs, targets).counts)


def test_cross_fitted_thresholds_come_from_the_other_folds_and_are_less_optimistic():
    rng = np.random.default_rng(15)
    probs = rng.random((300, 10)).astype(np.float32)  # pure noise: any F1 gain is optimism
    targets = (rng.random((300, 10)) < 0.2).astype(np.float32)
    rows = cross_fit_predictions(probs, targets, folds=5, seed=0)
    # Rebuild fold 0 of the same permutation and compare its thresholds.
    order = np.random.default_rng(0).permutation(300)
    held = np.zeros(300, bool)
    held[order[0::5]] = True
    expected = mlabel.tune_thresholds(probs[~held], targets[~held])
    assert torch.equal(rows[torch.from_numpy(held)], expected.expand(int(held.sum()), -1))
    in_sample = mlabel.evaluate_predictions(probs, targets, mlabel.tune_thresholds(probs, targets))
    crossed = mlabel.evaluate_predictions(probs, targets, rows)
    assert crossed["macro_f1"] < in_sample["macro_f1"] - 0.02


def test_tuner_follows_the_sklearn_estimator_contract():
    probs, targets = _data(16)
    tuner = ThresholdTuner("fbeta", beta=2.0)
    assert tuner.fit(probs, targets, labels=list("abcdef")) is tuner
    assert np.array_equal(tuner.thresholds_, mlabel.tune_thresholds(probs, targets, "fbeta", beta=2.0).numpy())
    assert np.array_equal(tuner.predict(probs), probs >= tuner.thresholds_)
    twin = clone(tuner)
    assert twin.get_params() == tuner.get_params() and not hasattr(twin, "thresholds_")
    restored = ThresholdTuner.from_dict(tuner.to_dict())
    assert restored.get_params() == tuner.get_params() and restored.labels_ == list("abcdef")
    assert np.array_equal(restored.thresholds_, tuner.thresholds_)
    assert np.array_equal(restored.predict(probs), tuner.predict(probs))
    assert set(tuner.to_dict()["thresholds"]) == set("abcdef")
    with pytest.raises(RuntimeError, match="not fitted"):
        ThresholdTuner().predict(probs)


def test_tuner_partial_fit_streams_batches_into_one_histogram():
    probs, targets = _realistic(17, n=4000)
    streamed = ThresholdTuner(mode="histogram", bins=512)
    for start in range(0, 4000, 1000):
        streamed.partial_fit(probs[start:start + 1000], targets[start:start + 1000])
    whole = ScoreHistogram(probs.shape[1], bins=512).update(probs, targets).tune()
    assert np.array_equal(streamed.thresholds_, whole.numpy())
    # The streamed tuner states how far its objective may lie below the exact optimum.
    exact = mlabel.tune_thresholds(probs, targets, return_scores=True)[1].numpy()
    assert np.all(exact <= streamed.scores_ + streamed.gap_bound_ + 1e-6)
    with pytest.raises(ValueError, match="partial_fit needs mode='histogram'"):
        ThresholdTuner().partial_fit(probs, targets)


def test_bad_arguments_name_the_valid_choices():
    probs, targets = _data(18)
    with pytest.raises(ValueError, match="available"):
        mlabel.tune_thresholds(probs, targets, "accuracy")
    with pytest.raises(ValueError, match="min_recall"):
        mlabel.tune_thresholds(probs, targets, "precision_at_recall", min_recall=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tuning_equals_cpu():
    probs, targets = _data(19, n=5000, labels=20, ties=True, unknown=0.1)
    cpu = mlabel.tune_thresholds(probs, targets)
    gpu = mlabel.tune_thresholds(torch.from_numpy(probs).cuda(), torch.from_numpy(targets).cuda())
    assert torch.equal(cpu, gpu.cpu())
