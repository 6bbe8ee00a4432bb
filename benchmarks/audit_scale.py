"""The audit's steps after the features at scale: time and peak memory of each, as a multiple of
one dense (N, L) float32 array, on random out-of-fold logits.

    python benchmarks/audit_scale.py                          # 100,000 images x 1,000 labels
    python benchmarks/audit_scale.py --images 20000 --labels 200 --heads

Issue 31 asks that 100k images x 1,000 labels rank without dense (N, L) copies beyond one per
block. The audit keeps four (N, L) arrays by contract (the calibrated probabilities, the two
suspicion arrays of ``AuditResult`` and the given labels as int8, a quarter of one); each step
should add at most a block's temporaries (``mlabel.audit.rank.BLOCK_CELLS`` cells) on top of
what it returns. The logits are drawn so that a label is 2 % to 40 % positive, 1 % of the given
labels are unknown and the scores separate the classes about as well as a useful model (AUROC
near 0.9). ``--heads`` also fits the per-fold linear heads on random 256-wide features (slow at
full size on a laptop: 5 folds of full-batch L-BFGS on 1,000 labels).
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb, reset_peak, timed  # noqa: E402


def draw(images: int, labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(given (N, L) int8 with -1 unknown, logits (N, L) float32), built block by block."""
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.02, 0.4, labels)
    given = np.empty((images, labels), np.int8)
    logits = np.empty((images, labels), np.float32)
    for start in range(0, images, 10_000):
        rows = slice(start, min(images, start + 10_000))
        truth = rng.random((rows.stop - start, labels)) < rate
        logits[rows] = rng.normal(np.where(truth, 1.8, -1.8), 1.4).astype(np.float32)
        cell = truth.astype(np.int8)
        cell[rng.random(cell.shape) < 0.01] = -1
        given[rows] = cell
    return given, logits


def main() -> None:
    from mlabel.audit.core import calibrate_per_fold
    from mlabel.audit.oof import HeadSettings, fit_heads, fold_of
    from mlabel.audit.rank import flagged_cells, label_thresholds, noise_rates, suggested_cells, suspicion

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--heads", action="store_true", help="also fit the per-fold heads on 256-wide features")
    args = parser.parse_args()

    given, logits = draw(args.images, args.labels)
    dense = args.images * args.labels * 4 / 2**20
    names = [f"l{j}" for j in range(args.labels)]
    print(f"{args.images:,} images x {args.labels:,} labels; one dense float32 (N, L) array is {dense:.0f} MB")
    print(f"{'step':<22}{'seconds':>9}{'peak MB':>9}{'added MB':>10}{'dense arrays':>14}")

    def step(name: str, fn):
        gc.collect()
        reset_peak()
        before = peak_mb()  # the resident memory now
        value, seconds, peak = timed(fn)
        added = peak - before
        print(f"{name:<22}{seconds:>9.1f}{peak:>9.0f}{added:>10.0f}{added / dense:>14.2f}", flush=True)
        return value

    fold = step("folds", lambda: fold_of(given, args.folds, 0))
    if args.heads:
        features = np.random.default_rng(1).normal(size=(args.images, 256)).astype(np.float32)
        step("heads (random data)", lambda: fit_heads(features, given, fold, HeadSettings(max_iter=20)))
        del features
    probs = step("calibrate", lambda: calibrate_per_fold(logits, given, fold))
    del logits
    gc.collect()
    thresholds = step("thresholds", lambda: label_thresholds(probs, given))
    missing, spurious = step("suspicion", lambda: suspicion(probs, given, "abs", thresholds))
    step("flagged (top 5,000)", lambda: flagged_cells(probs, missing, spurious, thresholds, 5000))
    step("suggested (top 5,000)", lambda: suggested_cells(probs, given, thresholds, 5000))
    step("noise rates", lambda: noise_rates(probs, given, thresholds, names))
    print("added MB: the step's peak above the resident memory before it; a step that returns (N, L) "
          "arrays adds them (calibrate one, suspicion two)")


if __name__ == "__main__":
    main()
