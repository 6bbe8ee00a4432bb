"""Threshold tuning speed: mlabel's exact and streaming tuners against a per-label loop over
scikit-learn's ``precision_recall_curve``, on the same random scores in the same run.

    python benchmarks/thresholds.py                     # 100,000 images x 1,000 labels
    python benchmarks/thresholds.py --samples 20000 --labels 200

Asserts that the F1 the exact tuner's thresholds reach equals scikit-learn's best F1 for every
label, and prints the speed ratios (and the CUDA time when a GPU is present).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve

from mlabel.thresholds import ScoreHistogram, tune_thresholds


def sklearn_loop(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The usual recipe: one precision_recall_curve per label, F1 at each point, argmax."""
    best_f1 = np.empty(probs.shape[1])
    best_th = np.empty(probs.shape[1])
    for j in range(probs.shape[1]):
        precision, recall, thresholds = precision_recall_curve(targets[:, j], probs[:, j])
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
        k = int(np.argmax(f1[:-1]))
        best_f1[j], best_th[j] = f1[k], thresholds[k]
    return best_f1, best_th


def achieved_f1(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """F1 per label of the decisions ``probs >= thresholds``, from counts in float64."""
    pred = probs >= thresholds
    true = targets == 1
    tp = (pred & true).sum(0).astype(np.float64)
    fp = (pred & ~true).sum(0)
    fn = (~pred & true).sum(0)
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--bins", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=10_000, help="rows per streaming update")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    probs = rng.random((args.samples, args.labels), dtype=np.float32)
    rates = rng.uniform(0.01, 0.3, args.labels).astype(np.float32)
    targets = (rng.random((args.samples, args.labels), dtype=np.float32) < rates).astype(np.float32)
    print(f"{args.samples} images x {args.labels} labels, uniform random scores; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    t_sk, (sk_f1, _) = timed(lambda: sklearn_loop(probs, targets))
    p_t, y_t = torch.from_numpy(probs), torch.from_numpy(targets)
    t_exact, exact = timed(lambda: tune_thresholds(p_t, y_t), repeat=2)
    exact_f1 = achieved_f1(probs, targets, exact.numpy())
    gap = np.abs(exact_f1 - sk_f1).max()
    assert gap < 1e-12, f"exact tuner misses scikit-learn's optimum by {gap}"

    def stream():
        hist = ScoreHistogram(args.labels, bins=args.bins)
        for start in range(0, args.samples, args.batch):
            hist.update(p_t[start:start + args.batch], y_t[start:start + args.batch])
        return hist.tune()

    t_hist, streamed = timed(stream, repeat=2)
    hist_gap = (exact_f1 - achieved_f1(probs, targets, streamed.numpy())).max()

    print(f"{'method':<44}{'seconds':>9}{'speed-up':>10}")
    print(f"{'sklearn precision_recall_curve, label loop':<44}{t_sk:>9.2f}{1.0:>10.1f}")
    print(f"{'mlabel exact (CPU)':<44}{t_exact:>9.2f}{t_sk / t_exact:>10.1f}")
    print(f"{f'mlabel streaming, {args.bins} bins (CPU)':<44}{t_hist:>9.2f}{t_sk / t_hist:>10.1f}")
    if torch.cuda.is_available():
        p_c, y_c = p_t.cuda(), y_t.cuda()
        tune_thresholds(p_c, y_c)
        torch.cuda.synchronize()

        def on_gpu():
            th = tune_thresholds(p_c, y_c)
            torch.cuda.synchronize()
            return th

        t_gpu, gpu = timed(on_gpu, repeat=3)
        gpu_gap = np.abs(achieved_f1(probs, targets, gpu.cpu().numpy()) - sk_f1).max()
        assert gpu_gap < 1e-12, f"CUDA tuner misses scikit-learn's optimum by {gpu_gap}"
        print(f"{'mlabel exact (' + torch.cuda.get_device_name() + ')':<44}{t_gpu:>9.3f}{t_sk / t_gpu:>10.1f}")
    print(f"exact: achieved F1 equals scikit-learn's best on all {args.labels} labels (max |diff| {gap:.1e})")
    print(f"streaming: worst per-label F1 below exact {hist_gap:.2e} (goal < 1e-3)")


if __name__ == "__main__":
    main()
