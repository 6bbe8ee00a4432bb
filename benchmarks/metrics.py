"""Metric and threshold core at scale: mlabel against scikit-learn and torchmetrics.

    python benchmarks/metrics.py                      # 100,000 x 1,000 and 20,000 x 100
    python benchmarks/metrics.py --sizes 20000x100    # one size
    python benchmarks/metrics.py --skip torchmetrics  # leave a tool out

Each measurement runs in its own process on the same generated data (float32 scores, int8
targets with 1 % unknown, label prevalence from 0.1 % to 30 %), so its peak RSS is its own:
"peak above inputs" is the process's peak resident memory minus its memory once the inputs
were made. The last lines print the ratios the issue sets goals for:
- ``evaluate_predictions`` (every metric of metrics.json) against scikit-learn's macro
  ``average_precision_score`` alone (goal: at most 1/3 of its time, peak <= 1 GiB above inputs);
- the exact tuner against a scikit-learn loop of ``precision_recall_curve`` + best F1 per
  label (goal: >= 5x).
Times on a 2-core machine move +-10 % between runs: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

TASKS = ("mlabel_evaluate", "mlabel_ap", "sklearn_ap", "torchmetrics_ap", "mlabel_tune", "sklearn_tune")


def make_data(n: int, labels: int, seed: int = 0):
    """Scores and targets built in chunks so that making them does not raise the peak RSS."""
    rng = np.random.default_rng(seed)
    prevalence = np.exp(rng.uniform(np.log(1e-3), np.log(0.3), labels))
    scores = np.empty((n, labels), np.float32)
    targets = np.empty((n, labels), np.int8)
    for start in range(0, n, 5000):
        rows = slice(start, min(start + 5000, n))
        m = rows.stop - rows.start
        t = (rng.random((m, labels), dtype=np.float32) < prevalence).astype(np.int8)
        t[rng.random((m, labels), dtype=np.float32) < 0.01] = -1
        z = rng.standard_normal((m, labels), dtype=np.float32) * 1.5 - 2.0 + 2.5 * (t == 1)
        scores[rows] = 1 / (1 + np.exp(-z))
        targets[rows] = t
    return scores, targets


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_task(task: str, n: int, labels: int) -> dict:
    scores, targets = make_data(n, labels)
    prepared = _prepare(task, scores, targets)
    base = rss_mib()
    start = time.perf_counter()
    result = _run(task, scores, targets, prepared)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"task": task, "seconds": seconds, "peak_above_inputs_mib": peak - base, "result": result}


def _prepare(task, scores, targets):
    """Imports and input conversions, outside the timed region and before the RSS baseline."""
    if task.startswith("mlabel"):
        import mlabel.metrics
        import mlabel.thresholds  # noqa: F401
    if task == "torchmetrics_ap":
        import torchmetrics.functional.classification  # noqa: F401
        import torch
        return torch.from_numpy(scores), torch.from_numpy(targets.astype(np.int64))
    if task.startswith("sklearn"):
        known = targets >= 0
        return known
    return None


def _run(task, scores, targets, prepared):
    if task == "mlabel_evaluate":
        import mlabel
        return mlabel.evaluate_predictions(scores, targets)["mAP"]
    if task == "mlabel_ap":
        from mlabel.metrics import average_precision
        ap = average_precision(scores, targets).numpy()
        return float(np.nanmean(ap))
    if task == "mlabel_tune":
        import mlabel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, f1 = mlabel.tune_thresholds(scores, targets, return_scores=True)
        return float(np.nanmean(f1.numpy()))
    if task == "sklearn_ap":  # unknown targets left out per label, as mlabel does
        from sklearn.metrics import average_precision_score
        aps = [average_precision_score(targets[k, j], scores[k, j]) for j in range(scores.shape[1])
               for k in [prepared[:, j]] if (targets[k, j] == 1).any()]
        return float(np.mean(aps))
    if task == "sklearn_tune":
        from sklearn.metrics import precision_recall_curve
        best = []
        for j in range(scores.shape[1]):
            k = prepared[:, j]
            y = targets[k, j]
            if not ((y == 1).any() and (y == 0).any()):
                continue
            p, r, _ = precision_recall_curve(y, scores[k, j])
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0)[:-1]
            best.append(f1.max())
        return float(np.mean(best))
    if task == "torchmetrics_ap":
        from torchmetrics.functional.classification import multilabel_average_precision
        s, t = prepared
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ap = multilabel_average_precision(s, t, num_labels=s.shape[1], average=None, ignore_index=-1)
        # torchmetrics scores a label without positives 0 and keeps it in its macro mean; leave
        # such labels out here so the figure is comparable with the others
        has_pos = (t == 1).any(0).numpy()
        return float(ap.numpy()[has_pos].mean())
    raise ValueError(task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100000x1000", "20000x100"])
    parser.add_argument("--skip", nargs="*", default=[], choices=TASKS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        n, labels = map(int, args.sizes[0].split("x"))
        print(json.dumps(run_task(args.task, n, labels)))
        return
    summary = []
    for size in args.sizes:
        n, labels = map(int, size.split("x"))
        rows = {}
        for task in TASKS:
            if task in args.skip:
                continue
            out = subprocess.run([sys.executable, __file__, "--task", task, "--sizes", size],
                                 capture_output=True, text=True, check=True)
            rows[task] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[task]
            print(f"{size:>12}  {task:<16} {r['seconds']:8.2f} s  peak above inputs "
                  f"{r['peak_above_inputs_mib']:7.0f} MiB  (result {r['result']:.6f})", flush=True)
        summary.append((size, rows))
    print()
    for size, rows in summary:
        ev, ap = rows.get("mlabel_evaluate"), rows.get("sklearn_ap")
        if ev and ap:
            print(f"{size}: evaluate_predictions (all metrics) is {ap['seconds'] / ev['seconds']:.2f}x faster "
                  f"than scikit-learn macro AP alone (goal >= 3); peak above inputs "
                  f"{ev['peak_above_inputs_mib']:.0f} MiB (goal <= 1024)")
        if rows.get("mlabel_ap") and ap:
            print(f"{size}: mlabel AP {ap['seconds'] / rows['mlabel_ap']['seconds']:.2f}x scikit-learn AP")
        if rows.get("torchmetrics_ap") and ev:
            print(f"{size}: evaluate_predictions is {rows['torchmetrics_ap']['seconds'] / ev['seconds']:.2f}x "
                  f"faster than torchmetrics multilabel AP alone")
        tune, loop = rows.get("mlabel_tune"), rows.get("sklearn_tune")
        if tune and loop:
            print(f"{size}: exact tuner {loop['seconds'] / tune['seconds']:.2f}x the scikit-learn loop (goal >= 5)")


if __name__ == "__main__":
    main()
