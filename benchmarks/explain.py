"""Are the heat maps right, faithful and cheap? On the quickstart's test scenes (their shapes'
boxes come with the generated set), for a trained model:

- pointing game: for every true-positive (image, label), is the map's maximum inside a box of
  that label? Per method, against a centre-of-image map and a random map in the same run (the
  baselines show the check can fail). A map upsampled from a coarse grid has a plateau of
  maxima, not one: ``argmax`` takes its first pixel (the plateau's top-left corner, which for a
  2 x 2 grid is the image's corner block), so the point scored is the plateau's centre; the
  first pixel's score is printed beside it;
- deletion: the drop in the label's probability when the map's top 10 % of pixels are blanked
  (set to the image mean), against blanking 10 % at random, on the same pairs;
- cost: explaining a batch of 64 as a multiple of a plain forward pass of it (cam: all labels;
  the others: one label per image), one thread, each timed alternately with the forward pass
  (best of the repeats: the machine may be shared);
- agreement: Grad-CAM and HiResCAM written in mlabel against the grad-cam package's on the same
  layer, and HiResCAM on the final map against the rectified CAM (exact for a linear head).

    python benchmarks/explain.py --model runs/quickstart            # the shipped quickstart's run
    python benchmarks/explain.py --model runs/r18 --images 300
    python benchmarks/explain.py --model runs/quickstart --cells 4,6,8 --methods auto   # auto's grid
    python benchmarks/explain.py --report 1000 --report-images 20000   # the report page with heat maps
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mlabel
import mlabel.explain as explain_module
from mlabel.data.synthetic import ensure_scenes, scenes_root
from mlabel.preprocess import preprocess_image, read_rgb


def _load_test(root, model, count: int):
    rows = (root / "test.csv").read_text().splitlines()[1 : count + 1]
    boxes = json.loads((root / "test_boxes.json").read_text())
    paths = [r.split(",")[0] for r in rows]
    targets = np.array([[int(v) for v in r.split(",")[1:]] for r in rows], dtype=np.float32)
    images = torch.from_numpy(np.stack([preprocess_image(read_rgb(root / p), model.preprocessing) for p in paths]))
    return paths, targets, images, boxes


def _pairs(model, images, targets) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(probabilities (N, L), image index, label index) of every true positive."""
    with torch.no_grad():
        probs = model.predict_proba(images)
    keep = (probs.numpy() >= model.thresholds.numpy()) & (targets == 1)
    rows, cols = np.nonzero(keep)
    return probs, rows, cols


def _maps(model, images, rows, cols, method: str) -> np.ndarray:
    """(P, H, W): each pair's map, explained in batches of one label."""
    out = np.zeros((len(rows), *images.shape[2:]), np.float32)
    for j in np.unique(cols):
        where = np.flatnonzero(cols == j)
        for start in range(0, len(where), 64):
            part = where[start : start + 64]
            got = model.explain(images[rows[part]], labels=[model.labels[j]], method=method)
            out[part] = np.stack([m[0] for m in got.maps])
    return out


def _point(heat: np.ndarray, first: bool) -> tuple[float, float]:
    """(x, y) of the map's maximum, in pixel units (a pixel's centre is +0.5): its first pixel, or
    the centre of its plateau (every pixel within 1e-6 of the span of the maximum)."""
    if first:
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        return x + 0.5, y + 0.5
    ys, xs = np.nonzero(heat >= heat.max() - 1e-6 * max(float(np.ptp(heat)), 1e-12))
    return xs.mean() + 0.5, ys.mean() + 0.5


def _hit(point: tuple[float, float], boxes: list, label: str, scale: float) -> bool:
    """Whether ``point`` (on the model's input grid) lies in a box ``[label, x0, y0, x1, y1]`` of
    ``label`` (in the 64 px scene's pixels, times ``scale``)."""
    x, y = point
    return any(b[0] == label and b[1] * scale <= x <= b[3] * scale and b[2] * scale <= y <= b[4] * scale
               for b in boxes)


def pointing(model, maps: np.ndarray, pairs: tuple, paths, boxes) -> dict:
    """Hit rates of ``maps`` (plateau centre and first pixel) and of the two baselines."""
    _, rows, cols = pairs
    size = maps.shape[-1]
    scale = size / 64.0
    rng = np.random.default_rng(0)
    hits = {"map": 0, "first pixel": 0, "centre": 0, "random": 0}
    for heat, i, j in zip(maps, rows, cols):
        drawn, label = boxes[paths[i]], model.labels[j]
        hits["map"] += _hit(_point(heat, False), drawn, label, scale)
        hits["first pixel"] += _hit(_point(heat, True), drawn, label, scale)
        hits["centre"] += _hit((size / 2, size / 2), drawn, label, scale)
        hits["random"] += _hit(_point(rng.random((size, size)), True), drawn, label, scale)
    return {name: count / max(len(rows), 1) for name, count in hits.items()}


def deletion(model, images, maps: np.ndarray, pairs: tuple, share: float = 0.1) -> tuple[float, float]:
    """Mean probability drop of the pairs' labels: blanking the map's top ``share`` of pixels
    (set to the image's mean), and blanking as many random pixels."""
    probs, rows, cols = pairs
    rng = np.random.default_rng(0)
    pixels = maps[0].size
    count = int(share * pixels)
    drops = {"map": [], "random": []}
    for start in range(0, len(rows), 256):
        part = slice(start, start + 256)
        chosen = images[rows[part]].flatten(2)  # (P, 3, H*W)
        mean = chosen.mean(2, keepdim=True).expand(-1, -1, count)
        top = torch.from_numpy(np.argsort(-maps[part].reshape(len(chosen), -1), axis=1, kind="stable")[:, :count])
        chance = torch.from_numpy(np.stack([rng.choice(pixels, count, replace=False) for _ in range(len(chosen))]))
        for name, index in (("map", top), ("random", chance)):
            blanked = chosen.clone().scatter_(2, index[:, None].expand(-1, 3, -1), mean).view(-1, *images.shape[1:])
            with torch.no_grad():
                after = model.predict_proba(blanked)[torch.arange(len(chosen)), torch.from_numpy(cols[part])]
            drops[name].append(probs[rows[part], cols[part]] - after)
    return float(torch.cat(drops["map"]).mean()), float(torch.cat(drops["random"]).mean())


def cost(model, images, methods: list[str], repeats: int = 5) -> dict:
    """Per method, explaining ``images`` (cam: all labels; else one) over a plain forward pass
    timed just before it (best of ``repeats`` each: a shared machine's busy moments and a cold
    allocator after a big run fall on both alike)."""
    def timed(run) -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started

    def plain():
        with torch.no_grad():
            model(images)
    ratios = {}
    for method in methods:
        labels = model.labels if method in ("cam", "csra") else model.labels[:1]
        run = lambda: model.explain(images, labels=labels, method=method)  # noqa: E731
        pairs = [(timed(plain), timed(run)) for _ in range(repeats)]
        ratios[method] = min(t for _, t in pairs) / min(p for p, _ in pairs)
    return ratios


def agreement(model, images) -> dict:
    """Max abs differences: mlabel's Grad-CAM and HiResCAM against the grad-cam package's on the
    final feature map, and HiResCAM against the rectified CAM (a linear head's exact map)."""
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mlabel.explain import _Forward, _scaled
    forward = _Forward(model)
    found = {}
    for name, cls in (("gradcam", GradCAM), ("hirescam", HiResCAM)):
        ours = np.stack([m[0] for m in model.explain(images, labels=model.labels[:1], method=name).maps])
        with cls(model=forward, target_layers=[forward.features]) as cam:
            theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(0)] * len(images))
        found[f"{name} against grad-cam's"] = float(np.abs(ours - theirs).max())
    try:
        with torch.no_grad():
            raw = explain_module._cam(model, images)[:, :1].clamp_min(0)
        rectified = np.stack([m[0] for m in _scaled(list(raw), tuple(images.shape[2:]))])
        ours = np.stack([m[0] for m in model.explain(images, labels=model.labels[:1], method="hirescam").maps])
        found["hirescam against the rectified cam"] = float(np.abs(ours - rectified).max())
    except ValueError:  # no exact cam for this model
        pass
    return found


def report_size(n_labels: int, n_images: int) -> None:
    """The report page of benchmarks/report.py's generated scores (``n_labels`` x ``n_images`` per
    split, noise JPEGs) without and with a heat map on every gallery tile, explained by a
    test_resnet of ``n_labels`` labels at 224 px (``auto``; noise JPEGs compress worst)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _images import noise_jpegs
    from report import generated

    from mlabel.models import create_model
    from mlabel.report import write_report
    from mlabel.report.gallery import heat_map_thumbnails
    rng = np.random.default_rng(1)
    labels = [f"label_{j:05d}" for j in range(n_labels)]
    torch.manual_seed(0)
    model = create_model("test_resnet", labels, False, image_size=224).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = noise_jpegs(tmp, 200, 240, 320, rng, quality=85)
        splits = {split: generated(n_images, n_labels, rng) for split in ("val", "test")}
        thresholds = rng.uniform(0.3, 0.7, n_labels)
        metrics = {split: mlabel.evaluate_predictions(p, t, thresholds=thresholds, labels=labels)
                   for split, (p, t) in splits.items()}
        counts = {split: {"images": len(t)} | {name: {"positive": int(t[:, j].sum())} for j, name in enumerate(labels)}
                  for split, (_, t) in splits.items()}
        history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_mAP": 0.5, "lr": 1e-3} for e in (1, 2)]
        paths = {split: [files[i % len(files)] for i in range(n_images)] for split in splits}
        sizes = {}
        for name, explain in (("without", None), ("with", heat_map_thumbnails(model))):
            started = time.perf_counter()
            folder = write_report(Path(tmp) / name, metrics, history, splits, labels, thresholds, counts, paths=paths,
                                  explain=explain)
            sizes[name] = ((folder / "report.html").stat().st_size, time.perf_counter() - started)
    added = sizes["with"][0] - sizes["without"][0]
    print(f"report of {n_labels:,} labels x {n_images:,} images: {sizes['without'][0] / 1e6:.2f} MB without heat maps, "
          f"{sizes['with'][0] / 1e6:.2f} MB with them (+{added / 1e6:.2f} MB; budget 10 MB); built in "
          f"{sizes['without'][1]:.0f} s and {sizes['with'][1]:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained quickstart run or model directory")
    parser.add_argument("--images", type=int, default=1000, help="test scenes to score")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir of the generated scenes")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method the model takes)")
    parser.add_argument("--cells", default=None, help="auto's least cells a side, comma-separated: a sweep")
    parser.add_argument("--report", type=int, metavar="LABELS", help="instead: the report page's size with heat maps")
    parser.add_argument("--report-images", type=int, default=20000, help="with --report: images per split")
    args = parser.parse_args()
    if args.report:
        return report_size(args.report, args.report_images)
    if not args.model:
        parser.error("--model is needed (or --report)")
    torch.set_num_threads(1)  # ratios on one thread: the same work for the forward pass and the methods
    model = mlabel.load(args.model).eval()
    root = ensure_scenes(scenes_root(".", args.cache_dir))
    paths, targets, images, boxes = _load_test(root, model, args.images)
    linear = type(model.head).__name__ == "LinearHead"
    methods = args.methods.split(",") if args.methods else (
        ["auto", "cam", "gradcam", "hirescam", "gradcam++"] if linear else ["auto", "gradcam", "hirescam"])
    pairs = _pairs(model, images, targets)
    print(f"model {args.model}: {model.backbone_name}, head {model.head_name}; {len(images)} test scenes, "
          f"{len(pairs[1])} true positives")
    runs = [(m, None) for m in methods] if not args.cells else [("auto", int(c)) for c in args.cells.split(",")]
    for method, cells in runs:
        if cells:
            explain_module._MIN_CELLS = cells
        try:
            maps = _maps(model, images, *pairs[1:], method)
        except ValueError as err:
            print(f"{method}: {err}")
            continue
        got = model.explain(images[:1], labels=model.labels[:1], method=method)
        hits = pointing(model, maps, pairs, paths, boxes)
        by_map, by_chance = deletion(model, images, maps, pairs)
        where = f" ({got.extra['layer']} at {got.extra['input_size'][0]} px)" if got.extra else ""
        print(f"{method + (f' {cells} cells' if cells else ''):>12}{where}: pointing game {hits['map']:.3f} "
              f"(first pixel {hits['first pixel']:.3f}; centre {hits['centre']:.3f}, random {hits['random']:.3f}); "
              f"deletion of the top 10 %: probability -{by_map:.3f} (random 10 %: -{by_chance:.3f})", flush=True)
    if not args.cells:
        ratios = cost(model, images[:64], [m for m in methods if m != "csra" or not linear])
        print("cost over a forward pass of 64 images (one thread): " + ", ".join(
            f"{m} {r:.2f}x ({'all labels' if m in ('cam', 'csra') else 'one label'})" for m, r in ratios.items()))
        print("max abs difference: " + ", ".join(f"{k} {v:.1e}" for k, v in agreement(model, images[:16]).items()))


if __name__ == "__main__":
    main()
