"""mlabel's defaults against a 20-line hand-written loop, on data no recipe was tuned for.

    python benchmarks/defaults.py [--sets digits,quickstart] [--epochs 12] [--scale 1.0] [--runs loop,defaults]
                                  [--extra "loss.pos_weight=none ..." --name ABLATION]

For each data set it runs, on the same images and splits:
  loop       the hand-written loop of issue 17: timm resnet18 from scratch, BCEWithLogitsLoss
             without pos_weight, AdamW lr 1e-3, no augmentation, images held in memory, batch 64
  defaults   ``mlabel train`` in a fresh process with a recipe that gives only the data section,
             ``model.backbone: resnet18``, ``data.image_size`` and ``train.epochs`` (everything
             else: the defaults; ``--extra`` adds overrides for an ablation)
and prints test mAP, macro F1 (mlabel at its tuned thresholds, the loop at 0.5) and wall time side
by side, with mlabel's differences and ratios to the loop.

Data sets (built under --work, default a temporary folder; reused when already there):
  digits      canvases of real handwritten digits (scikit-learn's 8x8 digits, upscaled), 64x64 RGB,
              1-4 digits anywhere on a noisy coloured background, 10 labels with a skewed frequency;
              each split draws its digits from its own share of the 1,797 originals
  quickstart  mlabel's generated scenes (6 shapes), 64x64
  miml        ../shared/data/miml-scene: 2,000 natural scenes, 5 labels, a seeded stratified
              60/15/25 split (as the shipped recipe's), at 96x96
  catsdogs    ../shared/data/catsdogs, binary (dog = 1): 1,700 train, 300 val (15 % of train/),
              2,000 test, at 96x96

Runs ``recipe`` and ``recipe-scratch`` (``--runs loop,defaults,recipe,recipe-scratch``) add the
shipped recipe of the set (quickstart, miml_scene, dogcat), pretrained and with
``model.pretrained=false``: its own backbone, image size, epochs and split (the same split for
miml; its own generated scenes for the quickstart; its own val carve for catsdogs).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SIZES = {"train": 3000, "val": 800, "test": 1500}


def digit_canvases(folder: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """The multi-object digits set as CSV splits (one-hot columns); returns the recipe's data section."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    pools = dict(zip(("train", "val", "test"), np.split(order, [1000, 1400])))  # disjoint originals
    weights = 1.0 / np.arange(1, 11) ** 0.9  # skewed label frequency
    weights /= weights.sum()
    classes = rng.permutation(10)  # which digit is frequent: not simply 0
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, pool in pools.items():
        by_class = {c: pool[digits.target[pool] == c] for c in range(10)}
        rows = []
        for i in range(int(SIZES[split] * scale)):
            image, present = _canvas(digits.images, by_class, classes, weights, rng)
            name = f"images/{split}{i:05d}.png"
            image.save(folder / name)
            rows.append([name, *present.astype(int)])
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *[f"digit{c}" for c in range(10)]])
            writer.writerows(rows)
    return {"format": "csv", "root": str(folder), "train": "train.csv", "val": "val.csv", "test": "test.csv"}


def _canvas(images, by_class, classes, weights, rng) -> tuple[Image.Image, np.ndarray]:
    size = 64
    background = rng.integers(0, 120, 3)
    canvas = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255)
    present = np.zeros(10, bool)
    for _ in range(rng.integers(1, 5)):
        label = classes[rng.choice(10, p=weights)]
        if not len(by_class[label]):
            continue
        glyph = images[rng.choice(by_class[label])] / 16.0
        side = int(rng.integers(16, 27))
        glyph = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)) / 255.0
        y, x = rng.integers(0, size - side + 1, 2)
        colour = rng.integers(130, 256, 3)
        patch = canvas[y:y + side, x:x + side]
        canvas[y:y + side, x:x + side] = patch * (1 - glyph[..., None]) + colour * glyph[..., None]
        present[label] = True
    return Image.fromarray(canvas.astype(np.uint8)), present


def quickstart_scenes(folder: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """mlabel's scene generator into CSV splits of the issue's sizes."""
    from mlabel.data.synthetic import SCENE_LABELS, draw_scene
    rng = np.random.default_rng(seed + 1)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, count in SIZES.items():
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *SCENE_LABELS])
            for i in range(int(count * scale)):
                image, target = draw_scene(rng)
                name = f"images/{split}{i:05d}.png"
                image.save(folder / name)
                writer.writerow([name, *target.astype(int)])
    return {"format": "csv", "root": str(folder), "train": "train.csv", "val": "val.csv", "test": "test.csv"}


def _write_splits(folder: Path, root: Path, header: list[str], rows: list[list], folds: np.ndarray) -> dict:
    """CSV splits in ``folder`` (never in the data's own folder) of images under ``root``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(("train", "val", "test")):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(row for row, fold in zip(rows, folds) if fold == index)
    return {"format": "csv", "root": str(root), **{s: str(folder / f"{s}.csv") for s in ("train", "val", "test")}}


def miml_scenes(folder: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """../shared/data/miml-scene (2,000 photos, 5 labels) in a seeded stratified 60/15/25 split, as
    the shipped recipe carves it."""
    from mlabel.data.split import iterative_split
    source = SHARED / "miml-scene"
    with (source / "labels.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, rows = rows[0], rows[1:int(1 + (len(rows) - 1) * scale)]
    folds = iterative_split(np.array([[int(v) for v in r[1:]] for r in rows]), [0.6, 0.15, 0.25], seed)
    return _write_splits(folder, source / "images", ["image", *header[1:]], rows, folds)


def cats_dogs(folder: Path, scale: float = 1.0, seed: int = 0) -> dict:
    """../shared/data/catsdogs as a binary task (one column, ``dog``): val is 15 % of train/
    (stratified, seeded), test is test/."""
    source = SHARED / "catsdogs"
    rng = np.random.default_rng(seed)
    rows, folds = [], []
    for split in ("train", "test"):
        for animal in ("cat", "dog"):
            names = sorted((source / split / animal).glob("*.jpg"))
            names = [names[i] for i in sorted(rng.permutation(len(names))[:int(len(names) * scale)])]
            val = set(rng.permutation(len(names))[:round(0.15 * len(names))]) if split == "train" else set()
            rows += [[str(n.relative_to(source)), int(animal == "dog")] for n in names]
            folds += [2 if split == "test" else (1 if i in val else 0) for i in range(len(names))]
    return _write_splits(folder, source, ["image", "dog"], rows, np.array(folds))


def read_split(data: dict, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    with open(Path(data["root"]) / data[split], newline="") as handle:  # an absolute path stays itself
        rows = list(csv.reader(handle))
    return ([str(Path(data["root"]) / r[0]) for r in rows[1:]],
            np.array([[float(v) for v in r[1:]] for r in rows[1:]], np.float32), rows[0][1:])


def hand_loop(data: dict, image_size: int, epochs: int, seed: int = 0) -> dict:
    """The 20-line loop a user writes instead of mlabel (issue 17's baseline)."""
    import timm
    import torch
    import mlabel
    torch.manual_seed(seed)
    start = time.perf_counter()

    def tensors(split):
        paths, targets, _ = read_split(data, split)
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size))) for p in paths])
        x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
        return x, torch.from_numpy(targets)

    (x, y), (xt, yt) = tensors("train"), tensors("test")
    model = timm.create_model("resnet18", pretrained=False, num_classes=y.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(b)) for b in xt.split(256)])
    report = mlabel.evaluate_predictions(probs, yt)
    return {"mAP": report["mAP"], "macro_f1": report["macro_f1"], "seconds": time.perf_counter() - start}


def mlabel_run(data: dict, image_size: int, epochs: int, work: Path, name: str, extra: list[str] = ()) -> dict:
    """``mlabel train`` in a fresh process (as a user runs it) with only the data section and a backbone."""
    recipe = work / f"{name}.yaml"
    recipe.write_text(json.dumps({"out_dir": str(work / "runs" / name), "data": {**data, "image_size": image_size},
                                  "model": {"backbone": "resnet18"}, "train": {"epochs": epochs}}))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlabel.train", str(recipe), "overwrite=true", *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())["test"]
    chosen = [line for line in done.stdout.splitlines() if line.startswith("defaults:")]
    return {"mAP": metrics["mAP"], "macro_f1": metrics["macro_f1"], "seconds": seconds, "chosen": chosen}


def recipe_run(name: str, work: Path, scratch: bool) -> dict | None:
    """The shipped recipe of data set ``name`` (pretrained, or ``model.pretrained=false``), on its
    own split and settings, in a fresh process; None where no recipe exists."""
    if name not in RECIPES:
        return None
    recipe, extra = RECIPES[name]
    out = work / "runs" / f"{name}-recipe{'-scratch' if scratch else ''}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlabel.train", recipe, f"out_dir={out}", "overwrite=true", *extra,
                           *(["model.pretrained=false"] if scratch else [])], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"recipe {recipe} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    accuracy = [f"test accuracy {metrics['accuracy']:.4f}"] if metrics.get("accuracy") is not None else []
    return {"mAP": metrics["mAP"], "macro_f1": metrics["macro_f1"], "seconds": seconds, "chosen": accuracy}


RECIPES = {"quickstart": ("quickstart", []),  # its own generated scenes (not the benchmark's)
           "miml": ("miml_scene", [f"data.root={SHARED / 'miml-scene' / 'images'}"]),  # the same split as here
           "catsdogs": ("dogcat", [f"data.root={SHARED / 'catsdogs'}"])}  # val carved by the recipe
SETS = {"digits": (digit_canvases, 64), "quickstart": (quickstart_scenes, 64),
        "miml": (miml_scenes, 96), "catsdogs": (cats_dogs, 96)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="digits,quickstart")
    parser.add_argument("--runs", default="loop,defaults")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--scale", type=float, default=1.0, help="share of the issue's split sizes (3000/800/1500)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--extra", default="", help="overrides for the mlabel runs, space-separated (an ablation)")
    parser.add_argument("--name", default=None, help="the ablation's name (default: the run's)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlabel-defaults-"))
    print(f"{'data set':<12}{'run':<12}{'test mAP':>10}{'macro F1':>10}{'wall':>9}{'mAP - loop':>12}{'time / loop':>13}")
    for name in args.sets.split(","):
        build, size = SETS[name]
        folder = work / name
        data = json.loads((folder / "data.json").read_text()) if (folder / "data.json").is_file() else None
        if data is None:
            data = build(folder, args.scale)
            (folder / "data.json").write_text(json.dumps(data))
        results = {}
        for run in args.runs.split(","):
            if run == "loop":
                results[run] = hand_loop(data, size, args.epochs)
            elif run in ("recipe", "recipe-scratch"):
                found = recipe_run(name, work, scratch=run == "recipe-scratch")
                if found is None:
                    continue
                results[run] = found
            else:
                results[run] = mlabel_run(data, size, args.epochs, work, f"{name}-{args.name or run}",
                                          args.extra.split() if args.extra else [])
            r, base = results[run], results.get("loop")
            versus = f"{r['mAP'] - base['mAP']:>+12.3f}{r['seconds'] / base['seconds']:>13.2f}" if base else ""
            print(f"{name:<12}{args.name or run:<12}{r['mAP']:>10.3f}{r['macro_f1']:>10.3f}{r['seconds']:>8.0f}s{versus}", flush=True)
            for line in r.get("chosen", []):
                print(f"{'':<24}{line}")


if __name__ == "__main__":
    main()
