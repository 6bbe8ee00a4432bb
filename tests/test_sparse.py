"""Sparse label tables and histogram metrics (issue 19) against the dense references."""
import numpy as np
import pytest
import torch

from mlabel.data.sparse import SparseLabels, sparse_pos_weight, sparse_split
from mlabel.data.split import iterative_split
from mlabel.losses import pos_weight_from_targets
from mlabel.metrics import average_precision, auroc, calibration_error
from mlabel.streaming import histogram_metrics
from mlabel.thresholds import ScoreHistogram, tune_thresholds


def _dense(rng, n=300, labels=12, unknown=0.05, default=0.0):
    frequency = 0.4 / np.arange(1, labels + 1)
    targets = (rng.random((n, labels)) < frequency).astype(np.float32)
    other = -1.0 if default == 0.0 else 0.0
    targets[(rng.random((n, labels)) < unknown) & (targets == 0)] = other
    if default == -1.0:  # partial labels: most entries unknown, a few verified negatives
        targets[(targets == 0) & (rng.random((n, labels)) < 0.9)] = -1.0
        targets[(targets == -1.0) & (rng.random((n, labels)) < 0.02)] = 0.0
    return targets


@pytest.mark.parametrize("default", [0.0, -1.0])
def test_sparse_rows_counts_and_pos_weight_equal_the_dense_table(default):
    rng = np.random.default_rng(1)
    targets = _dense(rng, default=default)
    table = SparseLabels.from_dense(targets, default=default)
    rows = rng.permutation(len(targets))[:77]
    np.testing.assert_array_equal(table.dense(rows), targets[rows])
    np.testing.assert_array_equal(table.dense(np.arange(len(targets))), targets)
    np.testing.assert_array_equal(table.subset(rows).dense(np.arange(77)), targets[rows])
    counts = table.counts()
    for name, value in (("positive", 1), ("negative", 0), ("unknown", -1)):
        np.testing.assert_array_equal(counts[name], (targets == value).sum(0))
    torch.testing.assert_close(sparse_pos_weight(table, 10.0), pos_weight_from_targets(torch.from_numpy(targets), 10.0))
    listed = (targets == 1).sum() + (targets == (-1.0 if default == 0.0 else 0.0)).sum()
    assert table.nbytes == 2 * 8 * (len(targets) + 1) + 4 * listed  # grows with the listed labels only


def test_lists_with_repeats_and_conflicts_keep_the_positive():
    table = SparseLabels.from_lists([[3, 1, 3], [], [0]], 4, others=[[1, 2], [2], [0, 0]])
    np.testing.assert_array_equal(table.dense([0, 1, 2]), [[0, 1, -1, 1], [0, 0, -1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="outside"):
        SparseLabels.from_lists([[4]], 4)
    with pytest.raises(ValueError, match="default"):
        SparseLabels.from_lists([[1]], 4, default=0.5)


def test_small_tables_split_exactly_as_the_dense_iterative_split():
    targets = _dense(np.random.default_rng(2))
    folds = sparse_split(SparseLabels.from_dense(targets), [0.6, 0.2, 0.2], seed=3)
    np.testing.assert_array_equal(folds, iterative_split(targets, [0.6, 0.2, 0.2], seed=3))


def test_the_scalable_split_spreads_every_label_in_proportion(monkeypatch):
    import mlabel.data.sparse as sparse
    monkeypatch.setattr(sparse, "DENSE_SPLIT_LIMIT", 0)
    rng = np.random.default_rng(4)
    n, labels = 20_000, 400
    frequency = 1.0 / np.arange(1, labels + 1) ** 1.1
    draws = rng.choice(labels, size=n * 3, p=frequency / frequency.sum())
    table = SparseLabels.from_pairs(np.repeat(np.arange(n), 3), draws, n, labels)
    fractions = np.array([0.7, 0.1, 0.2])
    folds = sparse.sparse_split(table, fractions, seed=0)
    assert np.allclose(np.bincount(folds, minlength=3) / n, fractions, atol=0.005)
    positives = table.dense(np.arange(n)) == 1
    per_fold = np.stack([positives[folds == k].sum(0) for k in range(3)], 1)  # (L, 3)
    expected = positives.sum(0)[:, None] * fractions
    random = rng.choice(3, size=n, p=fractions)  # the reference: a plain seeded random split
    per_fold_random = np.stack([positives[random == k].sum(0) for k in range(3)], 1)
    rare = positives.sum(0) <= 60
    ours, theirs = np.abs(per_fold - expected)[rare], np.abs(per_fold_random - expected)[rare]
    assert rare.sum() > 100 and ours.max() <= 6 and ours.mean() < 0.6 * theirs.mean()
    assert np.abs(per_fold - expected).mean() < 0.8 * np.abs(per_fold_random - expected).mean()


def _scores(rng, n=40_000, labels=20):
    prevalence = rng.uniform(0.01, 0.3, labels)
    targets = (rng.random((n, labels)) < prevalence).astype(np.float32)
    targets[rng.random((n, labels)) < 0.02] = -1
    logits = rng.normal(0, 1, (n, labels)) + (targets == 1) * rng.uniform(0.5, 3, labels) + np.log(prevalence / (1 - prevalence))
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets


def test_histogram_metrics_match_the_exact_ones_within_the_stated_error():
    probs, targets = _scores(np.random.default_rng(5))
    histogram = ScoreHistogram(probs.shape[1])
    for rows in np.array_split(np.arange(len(probs)), 7):  # streamed in batches
        histogram.update(probs[rows], targets[rows])
    thresholds = histogram.tune("f1").numpy()
    got = histogram_metrics(histogram, thresholds)
    assert np.abs(got["ap"] - average_precision(probs, targets).numpy()).max() < 2e-3
    assert np.abs(got["auroc"] - auroc(probs, targets).numpy()).max() < 1e-3
    assert np.abs(got["ece"] - calibration_error(probs, targets).numpy()).max() < 1e-3
    predicted = probs >= thresholds
    tp = (predicted & (targets == 1)).sum(0)
    fp = (predicted & (targets == 0)).sum(0)
    fn = (~predicted & (targets == 1)).sum(0)
    np.testing.assert_allclose(got["f1"], 2 * tp / (2 * tp + fp + fn), atol=1e-12)  # exact at edges
    exact = tune_thresholds(probs, targets, "f1", return_scores=True)[1].numpy()  # the exact tuner's F1
    assert np.abs(got["f1"] - exact).max() < 1e-3 and (got["f1"] <= exact + 1e-12).all()


@pytest.mark.parametrize("default", [0.0, -1.0])
def test_rows_reorder_and_the_label_table_on_sparse_targets(default):
    from mlabel.data.tables import LabelTable
    rng = np.random.default_rng(2)
    other = 0.0 if default == -1.0 else -1.0
    dense = np.where(rng.random((40, 6)) < 0.2, 1.0, np.where(rng.random((40, 6)) < 0.1, other, default)).astype(np.float32)
    table = SparseLabels.from_dense(dense, default=default)
    np.testing.assert_array_equal(table.rows(7), dense[7])
    np.testing.assert_array_equal(table.rows([3, 1, 3]), dense[[3, 1, 3]])
    order = [4, 0, 5, 1, 3, 2]
    np.testing.assert_array_equal(table.reorder(order).dense(np.arange(40)), dense[:, order])
    with pytest.raises(ValueError):
        table.reorder([0, 0, 1, 2, 3, 4])
    names = list("abcdef")
    sparse_table = LabelTable([f"{i}.png" for i in range(40)], table, names, "t")
    dense_table = LabelTable([f"{i}.png" for i in range(40)], dense, names, "t")
    for key, value in dense_table.label_stats().items():
        np.testing.assert_array_equal(sparse_table.label_stats()[key], value)
    part = sparse_table.subset([5, 2, 9], "part")
    assert part.sparse and part.paths == ["5.png", "2.png", "9.png"]
    np.testing.assert_array_equal(part.model_targets([2, 0]).labels.numpy(), dense[[9, 5]])


def _split_stream(probs, targets, thresholds, batches=5):
    from mlabel.streaming import SplitStream
    stream = SplitStream(probs.shape[1], 2048, thresholds)
    for rows in np.array_split(np.arange(len(probs)), batches):
        stream.update(probs[rows], targets[rows])
    return stream


def test_a_streamed_split_gives_the_exact_cutoff_metrics_and_close_ranking_ones():
    """SplitStream (histograms and decision counts, batch by batch) against evaluate_predictions
    on the whole (N, L) table: every cut-off figure equal, the ranking ones within the stated error."""
    from mlabel.metrics import evaluate_predictions
    probs, targets = _scores(np.random.default_rng(11), n=20_000, labels=12)
    thresholds = np.random.default_rng(1).uniform(0.2, 0.8, 12)
    names = [f"l{j}" for j in range(12)]
    got = _split_stream(probs, targets, thresholds).metrics(names, binary=False)
    exact = evaluate_predictions(probs, targets, thresholds, names)
    cutoff = [k for k in exact if k.split("@")[0] in ("macro_f1", "micro_f1", "samples_f1", "weighted_f1",
              "hamming_loss", "subset_accuracy", "CP", "CR", "CF1", "OP", "OR", "OF1", "macro_precision",
              "macro_recall", "micro_precision", "micro_recall")]
    assert len(cutoff) == 32
    for key in cutoff:
        assert got[key] == pytest.approx(exact[key], abs=1e-12), key
    for name in names:
        for key in ("f1", "precision", "recall", "tp", "fp", "fn", "tn", "support", "threshold", "f1@0.5"):
            assert got["per_label"][name][key] == pytest.approx(exact["per_label"][name][key], abs=1e-12), key
        assert abs(got["per_label"][name]["ap"] - exact["per_label"][name]["ap"]) < 2e-3
        assert abs(got["per_label"][name]["auroc"] - exact["per_label"][name]["auroc"]) < 1e-3
    assert abs(got["mAP"] - exact["mAP"]) < 1e-3 and abs(got["macro_ece"] - exact["macro_ece"]) < 1e-3
    assert got["n_images"] == 20_000 and got["micro_ap"] is None


def _stream_rank(rank, world, port, out):
    import os
    from mlabel.distributed import World
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        probs, targets = _scores(np.random.default_rng(11), n=6_000, labels=7)
        mine = np.arange(rank, len(probs), world)
        stream = _split_stream(probs[mine], targets[mine], np.full(7, 0.4), batches=3)
        stream.all_reduce(World(rank, world, rank))
        if rank == 0:
            import json
            from pathlib import Path
            Path(out).write_text(json.dumps(stream.metrics([str(j) for j in range(7)], False)))
    finally:
        torch.distributed.destroy_process_group()


def test_streams_of_two_gloo_ranks_sum_to_the_whole_split(tmp_path):
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stream_rank, args=(2, port, str(tmp_path / "m.json")), nprocs=2)
    got = json.loads((tmp_path / "m.json").read_text())
    probs, targets = _scores(np.random.default_rng(11), n=6_000, labels=7)
    whole = json.loads(json.dumps(_split_stream(probs, targets, np.full(7, 0.4)).metrics([str(j) for j in range(7)], False)))
    assert got == whole


def test_list_readers_keep_large_tables_sparse_with_the_same_targets(monkeypatch, tmp_path, scene_csv):
    """Past SPARSE_FROM cells the csv name column, jsonl, voc and coco readers return index lists:
    the same targets, counts, split and pos_weight as the dense table they return below it."""
    import json
    from mlabel.data import build_splits, tables
    from mlabel.data.formats import read_jsonl_table
    from mlabel.config import load_config
    (tmp_path / "a.png").write_bytes((scene_csv / "images" / "train0.png").read_bytes())
    lines = [{"image": "a.png", "labels": ["x", "y"], "unknown": ["z"]}, {"image": "a.png", "labels": ["z"]},
             {"image": "a.png", "labels": [], "unknown": ["x", "y"]}, {"image": "a.png", "labels": ["y"], "unknown": ["y"]}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    dense = read_jsonl_table(tmp_path / "t.jsonl", tmp_path)
    monkeypatch.setattr(tables, "SPARSE_FROM", 0)
    sparse = read_jsonl_table(tmp_path / "t.jsonl", tmp_path)
    assert sparse.sparse and not dense.sparse
    np.testing.assert_array_equal(sparse.dense_targets(), dense.targets)
    assert dense.targets.tolist() == [[1, 1, -1], [0, 0, 1], [-1, -1, 0], [0, 1, 0]]
    # a whole recipe's splits (csv name column carved into val), dense and sparse
    (tmp_path / "names.csv").write_text("image,tags\n" + "".join(
        f"images/train{i}.png,{' '.join(n for n, t in zip('abcdef', row) if t == 1)}\n"
        for i, row in enumerate(np.random.default_rng(0).random((48, 6)) < 0.3)))
    cfg = load_config("quickstart", [f"data.root={scene_csv}", "data.generate=null", f"data.train={tmp_path / 'names.csv'}",
                                     "data.labels_column=tags", "data.val=null", "data.test=null", "data.val_fraction=0.25"])
    sparse_splits = build_splits(cfg.data, "auto", 0)
    monkeypatch.setattr(tables, "SPARSE_FROM", 10**12)
    dense_splits = build_splits(cfg.data, "auto", 0)
    assert sparse_splits.train.sparse and not dense_splits.train.sparse
    for name in ("train", "val"):
        a, b = getattr(sparse_splits, name), getattr(dense_splits, name)
        assert a.paths == b.paths
        np.testing.assert_array_equal(a.dense_targets(), b.targets)
        for key, value in b.label_stats().items():
            np.testing.assert_array_equal(a.label_stats()[key], value)


def test_training_on_a_sparse_table_repeats_the_dense_run(monkeypatch, tmp_path, scene_csv):
    """The trainer reads targets through the table: index lists train exactly as the dense table."""
    import json
    from mlabel.data import tables
    from mlabel.train import main as train_main
    (tmp_path / "names.csv").write_text("image,tags\n" + "".join(
        f"images/train{i}.png,{' '.join(n for n, t in zip('abcdef', row) if t == 1)}\n"
        for i, row in enumerate(np.random.default_rng(0).random((48, 6)) < 0.3)))

    def run(name):
        assert train_main(["quickstart", f"out_dir={tmp_path / name}", f"data.root={scene_csv}", "data.generate=null",
                           f"data.train={tmp_path / 'names.csv'}", "data.labels_column=tags", "data.val=null",
                           "data.test=null", "data.val_fraction=0.25", "model.backbone=test_resnet",
                           "model.pretrained=false", "data.image_size=32", "data.num_workers=0", "train.epochs=2",
                           "train.precision=fp32", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
                           "loss.pos_weight=auto", "--quiet"]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())["val"]
    dense = run("dense")
    monkeypatch.setattr(tables, "SPARSE_FROM", 0)
    sparse = run("sparse")
    for key in ("mAP", "macro_f1", "micro_f1", "samples_f1"):
        assert sparse[key] == dense[key], key


# platt at every seed; x4, x10 and temperature at three seeds (all ten with -m slow)
CALIBRATION_CASES = [pytest.param(method, seed, scale, marks=[pytest.mark.slow] if seed > 2 and (
    scale > 1 or method == "temperature") else []) for method in ("platt", "temperature")
    for scale in (1, 4, 10) for seed in range(10)]


@pytest.mark.parametrize("method, seed, scale", CALIBRATION_CASES)
def test_calibration_fitted_on_histograms_matches_the_fit_on_the_scores(method, seed, scale):
    """The bins' logit moments against the fit on every score, for every seed and for logits
    scaled x4 and x10 (a third of the scores then in the probability histogram's end bins)."""
    from mlabel.calibration import apply_calibration, fit_calibration, fit_calibration_from_histogram
    probs, targets = _scores(np.random.default_rng(seed), n=40_000, labels=20)
    logits = (np.log(probs) - np.log1p(-probs)).astype(np.float64) * scale
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    scale_, bias = fit_calibration(logits, targets, method)
    histogram = ScoreHistogram(20, logits=True)
    for rows in np.array_split(np.arange(len(probs)), 4):
        histogram.update(probs[rows], targets[rows], logits=logits[rows])
    got_scale, got_bias = fit_calibration_from_histogram(histogram, method, block=7)  # blocks of labels
    assert (got_scale - scale_).abs().max() < 1e-3 and (got_bias - bias).abs().max() < 1e-3
    exact = calibration_error(apply_calibration(torch.from_numpy(logits), scale_, bias), targets).numpy()
    binned = calibration_error(apply_calibration(torch.from_numpy(logits), got_scale, got_bias), targets).numpy()
    assert np.abs(exact - binned).max() < 1e-3


def test_calibration_from_a_histogram_without_logits_fits_at_the_bin_centres():
    """Without logit moments the fit counts each bin at its centre (close for logits inside
    the end bins' reach) and the moments' logits default to logit(probs)."""
    from mlabel.calibration import fit_calibration, fit_calibration_from_histogram
    probs, targets = _scores(np.random.default_rng(3), n=20_000, labels=5)
    logits = np.log(probs.astype(np.float64)) - np.log1p(-probs.astype(np.float64))
    scale, bias = fit_calibration(logits, targets)
    plain = fit_calibration_from_histogram(ScoreHistogram(5).update(probs, targets))
    own = fit_calibration_from_histogram(ScoreHistogram(5, logits=True).update(probs, targets))
    assert (plain[0] - scale).abs().max() < 2e-3 and (plain[1] - bias).abs().max() < 5e-3
    assert (own[0] - scale).abs().max() < 1e-3 and (own[1] - bias).abs().max() < 1e-3


INDICES = [7, -1, -40, np.int64(3), slice(0, 2), slice(None, None, -3), slice(5, 2), slice(-5, None), [3, 1, 3],
           [-1, 0], np.array([[1, 2], [3, -4]]), np.array([True, False, True] + [False] * 37), np.zeros(40, bool),
           [], np.array([], np.int64)]


@pytest.mark.parametrize("index", INDICES, ids=[f"{type(i).__name__}{k}" for k, i in enumerate(INDICES)])
def test_rows_index_as_the_dense_table_does(index):
    rng = np.random.default_rng(6)
    dense = np.where(rng.random((40, 5)) < 0.3, 1.0, np.where(rng.random((40, 5)) < 0.1, -1.0, 0.0)).astype(np.float32)
    got = SparseLabels.from_dense(dense).rows(index)
    assert got.shape == dense[index].shape
    np.testing.assert_array_equal(got, dense[index])


@pytest.mark.parametrize("index", [40, -41, [0, 40], np.array([True, False]), 1.5, np.array([0.0]), (1, 2), None,
                                   Ellipsis, True])
def test_rows_refuse_what_the_dense_table_refuses_or_does_not_mean(index):
    """Out of range, a mask of the wrong length, floats, label indices and numpy's extras (None,
    ..., a lone bool) are refused with IndexError, not read as other rows."""
    table = SparseLabels.from_dense(np.zeros((40, 5), np.float32))
    with pytest.raises(IndexError, match="rows"):
        table.rows(index)
