"""Labels at web scale, without images: time and peak memory of what mlabel does with a whole
label table (issue 19).

    python benchmarks/scale.py [--sizes 1e4x100,1e5x1000,1e6x10000] [--positives 10] [--eval-rows N]

For each N images x L labels (generated: about ``--positives`` positives per image, Poisson, on a
Zipf label frequency) it runs, in a fresh process (so that each size's peak RSS is its own):

  table     the sparse table (:class:`mlabel.data.sparse.SparseLabels`) from (image, label) pairs
  split     :func:`mlabel.data.sparse.sparse_split` 80/10/10 (iterative-stratified up to 5e7
            cells, the scalable stratification past them)
  pos_weight :func:`mlabel.data.sparse.sparse_pos_weight`
  sampler   one epoch of :class:`mlabel.data.dataset.SeededSampler` in batches of 256, each turned
            into its dense (256, L) targets
  evaluate  streaming evaluation: a :class:`mlabel.histogram.ScoreHistogram` fed N x L scores in
            batches with their dense batch targets (as the loaders give them; making the scores
            and targets is timed apart), then F1 thresholds and :func:`mlabel.streaming.histogram_metrics`. The scores stand for the
            model's: drawn once per size and reused across batches, positives raised so the
            metrics mean something; making them is timed apart and left out of the rate. Past
            --eval-rows images it scores a prefix of that many rows and reports the rate.

Each stage prints its wall time and the process's peak RSS during it (``VmHWM``, reset before the
stage through ``/proc/self/clear_refs``), and the dense float32 table's size for comparison.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb, reset_peak  # noqa: E402


def _stage(results: dict, name: str, fn):
    reset_peak()
    start = time.perf_counter()
    value = fn()
    results[name] = {"seconds": time.perf_counter() - start, "peak_mb": peak_mb()}
    return value


def one_size(n: int, labels: int, positives: float, eval_rows: int, seed: int = 0) -> dict:
    import numpy as np
    import torch
    sys.path.insert(0, str(ROOT))
    from mlabel.data.dataset import SeededSampler
    from mlabel.data.sparse import SparseLabels, sparse_pos_weight, sparse_split
    from mlabel.streaming import histogram_metrics
    from mlabel.histogram import ScoreHistogram

    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, labels + 1)  # Zipf
    frequency /= frequency.sum()
    per_image = np.maximum(rng.poisson(positives, n), 1)
    rows = np.repeat(np.arange(n), per_image)
    cols = np.searchsorted(np.cumsum(frequency), rng.random(len(rows)), side="right").clip(0, labels - 1)
    results: dict = {"images": n, "labels": labels}
    table = _stage(results, "table", lambda: SparseLabels.from_pairs(rows, cols, n, labels))
    results["positives"] = int(len(table.pos_idx))
    results["table_mb"] = table.nbytes / 2**20
    results["dense_mb"] = n * labels * 4 / 2**20
    _stage(results, "split", lambda: sparse_split(table, [0.8, 0.1, 0.1], seed))
    _stage(results, "pos_weight", lambda: sparse_pos_weight(table))

    def epoch():
        sampler = SeededSampler(n, torch.Generator().manual_seed(seed), shuffle=True)
        batch, seen = [], 0
        for index, _ in sampler:
            batch.append(index)
            if len(batch) == 256:
                seen += len(table.dense(batch))
                batch = []
        return seen + (len(table.dense(batch)) if batch else 0)
    assert _stage(results, "sampler", epoch) == n

    scored = min(n, eval_rows)

    spent = {"generate": 0.0}

    def evaluate():
        histogram = ScoreHistogram(labels, bins=1024)
        chunk = max(1, min(4096, 2**24 // labels))
        base = rng.random((chunk, labels), dtype=np.float32) * 0.7
        for start in range(0, scored, chunk):
            made = time.perf_counter()  # the model's scores: generated, not part of the evaluation's time
            batch = table.subset(np.arange(start, min(scored, start + chunk)))
            scores = base[:len(batch)].copy()
            where = batch._gather(batch.pos_ptr, batch.pos_idx, np.arange(len(batch)))
            scores[where] += 0.3
            targets = batch.dense(np.arange(len(batch)))  # dense rows per batch, as the loaders give them
            spent["generate"] += time.perf_counter() - made
            histogram.update(scores, targets)
        thresholds = histogram.tune("f1")
        return histogram_metrics(histogram, thresholds)
    metrics = _stage(results, "evaluate", evaluate)
    results["evaluate"]["seconds"] -= spent["generate"]
    results["evaluate"]["scores"] = scored * labels
    results["evaluate"]["scores_per_s"] = scored * labels / results["evaluate"]["seconds"]
    results["mAP"] = metrics["mAP"]
    return results


def _size(text: str) -> tuple[int, int]:
    n, labels = text.lower().split("x")
    return int(float(n)), int(float(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4x100,1e4x1000,1e4x10000,1e5x100,1e5x1000,1e5x10000,1e6x100,1e6x1000,1e6x10000")
    parser.add_argument("--positives", type=float, default=10.0)
    parser.add_argument("--eval-rows", type=int, default=10**6)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(*_size(args.one), args.positives, args.eval_rows)))
        return
    stages = ("table", "split", "pos_weight", "sampler", "evaluate")
    print(f"{'N x L':>14}{'positives':>12}{'sparse MB':>11}{'dense MB':>11}  "
          + "".join(f"{s + ' s':>13}{'RSS MB':>8}" for s in stages) + f"{'scores/s':>11}")
    for size in args.sizes.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", size, "--positives", str(args.positives),
                               "--eval-rows", str(args.eval_rows)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{size:>14}  failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{size:>14}{r['positives']:>12,}{r['table_mb']:>11.1f}{r['dense_mb']:>11,.0f}  "
              + "".join(f"{r[s]['seconds']:>13.2f}{r[s]['peak_mb']:>8.0f}" for s in stages)
              + f"{r['evaluate']['scores_per_s']:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
