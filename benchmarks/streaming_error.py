"""Error of the streamed metrics against scikit-learn, by images N and positives per label.

For each N and each count of positives, ``--labels`` labels with exactly that many positives
(logits ``normal + separation x target + offset``, separation drawn per label, float32
probabilities) go through a :class:`mlabel.thresholds.ScoreHistogram` (``--bins``); the table
gives, per cell, the histogram AP minus scikit-learn's ``average_precision_score`` (mean and
worst), the worst AUROC error against ``roc_auc_score``, and how far the F1 at the histogram's
tuned thresholds lies below the exact tuner's optimum (worst), as a markdown table::

    python benchmarks/streaming_error.py                 # N 2e3, 1e4, 1e5; positives 1..1000
    python benchmarks/streaming_error.py --n 100000 --positives 1 3 --labels 200
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from mlabel.streaming import histogram_metrics
from mlabel.thresholds import ScoreHistogram, tune_thresholds


def draw(n: int, positives: int, labels: int, rng: np.random.Generator):
    """(n, labels) float32 probabilities and targets, each label with exactly ``positives``."""
    targets = np.zeros((n, labels), np.float32)
    for j in range(labels):
        targets[rng.choice(n, positives, replace=False), j] = 1
    separation = rng.uniform(0.5, 3.0, labels)
    logits = rng.normal(0, 1, (n, labels)) + separation * targets - 3.0
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets


def cell(n: int, positives: int, labels: int, bins: int, rng: np.random.Generator) -> dict:
    probs, targets = draw(n, positives, labels, rng)
    histogram = ScoreHistogram(labels, bins).update(probs, targets)
    thresholds = histogram.tune("f1").numpy()
    got = histogram_metrics(histogram, thresholds)
    ap = np.array([average_precision_score(targets[:, j], probs[:, j]) for j in range(labels)])
    roc = np.array([roc_auc_score(targets[:, j], probs[:, j]) for j in range(labels)])
    best_f1 = tune_thresholds(probs, targets, "f1", return_scores=True)[1].numpy()
    ap_error = got["ap"] - ap
    return {"ap_mean": ap_error.mean(), "ap_worst": ap_error[np.abs(ap_error).argmax()],
            "auroc_worst": np.abs(got["auroc"] - roc).max(), "f1_gap": (best_f1 - got["f1"]).max()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2_000, 10_000, 100_000])
    parser.add_argument("--positives", type=int, nargs="+", default=[1, 3, 10, 100, 1000])
    parser.add_argument("--labels", type=int, default=40, help="labels per cell")
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"bins {args.bins}, {args.labels} labels per cell, seed {args.seed}\n")
    print("| N | positives | AP error mean | AP error worst | AUROC worst abs error | F1 below exact optimum, worst |")
    print("|---|---|---|---|---|---|")
    start = time.perf_counter()
    for n in args.n:
        for positives in args.positives:
            if positives >= n // 2:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = cell(n, positives, args.labels, args.bins, np.random.default_rng([args.seed, n, positives]))
            print(f"| {n:,} | {positives} | {r['ap_mean']:+.1e} | {r['ap_worst']:+.1e} | {r['auroc_worst']:.1e} | "
                  f"{r['f1_gap']:.1e} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
