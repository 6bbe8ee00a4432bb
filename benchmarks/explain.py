"""Are the heat maps right, faithful and cheap? On the quickstart's test scenes (their shapes'
boxes come with the generated set), for a trained model:

- pointing game: for every true-positive (image, label), is the map's maximum inside a box of
  that label? Per method, against a centre-of-image map and a random map in the same run (the
  baselines show the check can fail);
- deletion: the drop in the label's probability when the map's top 10 % of pixels are blanked
  (set to the image mean), against blanking 10 % at random;
- cost: explaining a batch as a multiple of a plain forward pass of it (cam: all labels;
  gradcam: one label per image);
- agreement: for a linear head over average pooling, Grad-CAM (the grad-cam package) is the
  rectified CAM; the max abs difference between the two maps is printed.

    python benchmarks/explain.py --model runs/quickstart            # the shipped quickstart's run
    python benchmarks/explain.py --model runs/r18 --images 300
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import mlabel
from mlabel.data.synthetic import ensure_scenes, scenes_root
from mlabel.preprocess import preprocess_image, read_rgb


def _load_test(root, model, count: int):
    rows = (root / "test.csv").read_text().splitlines()[1 : count + 1]
    boxes = json.loads((root / "test_boxes.json").read_text())
    paths = [r.split(",")[0] for r in rows]
    targets = np.array([[int(v) for v in r.split(",")[1:]] for r in rows], dtype=np.float32)
    images = torch.from_numpy(np.stack([preprocess_image(read_rgb(root / p), model.preprocessing) for p in paths]))
    return paths, targets, images, boxes


def _hit(heat: np.ndarray, boxes: list, label: str, size: int) -> bool:
    """Whether ``heat``'s maximum (on the model's input grid) lies in a box of ``label`` (in the
    64 px scene's pixels, scaled to the input)."""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    scale = size / 64.0
    return any(b[0] == label and b[1] * scale <= x + 0.5 <= b[3] * scale and b[2] * scale <= y + 0.5 <= b[4] * scale
               for b in boxes)


def pointing(model, images, targets, paths, boxes, method: str, rng) -> dict:
    probs = model.predict_proba(images).numpy()
    keep = (probs >= model.thresholds.numpy()) & (targets == 1)
    size = images.shape[-1]
    hits = {method: 0, "centre": 0, "random": 0}
    total = 0
    centre = np.zeros((size, size), np.float32)
    centre[size // 2, size // 2] = 1
    for i in range(len(images)):
        wanted = [model.labels[j] for j in np.flatnonzero(keep[i])]
        if not wanted:
            continue
        got = model.explain(images[i : i + 1], labels=wanted, method=method)
        for k, label in enumerate(wanted):
            total += 1
            hits[method] += _hit(got.maps[0][k], boxes[paths[i]], label, size)
            hits["centre"] += _hit(centre, boxes[paths[i]], label, size)
            hits["random"] += _hit(rng.random((size, size)), boxes[paths[i]], label, size)
    return {name: count / max(total, 1) for name, count in hits.items()} | {"pairs": total}


def deletion(model, images, targets, method: str, rng, share: float = 0.1) -> tuple[float, float]:
    """Mean probability drop of true-positive labels: blanking the map's top ``share`` of pixels,
    and blanking as many random pixels."""
    probs = model.predict_proba(images)
    keep = (probs.numpy() >= model.thresholds.numpy()) & (targets == 1)
    drops = {"map": [], "random": []}
    for i in np.flatnonzero(keep.any(1)):
        labels = [model.labels[j] for j in np.flatnonzero(keep[i])]
        got = model.explain(images[i : i + 1], labels=labels, method=method)
        for k, label in enumerate(labels):
            j = model.labels.index(label)
            flat = got.maps[0][k].ravel()
            count = int(share * flat.size)
            for name, index in (("map", np.argsort(-flat)[:count]), ("random", rng.choice(flat.size, count, replace=False))):
                blanked = images[i].clone().flatten(1)
                blanked[:, torch.from_numpy(index)] = images[i].flatten(1).mean(1, keepdim=True)
                after = model.predict_proba(blanked.view_as(images[i])[None])[0, j]
                drops[name].append(float(probs[i, j] - after))
    return float(np.mean(drops["map"])), float(np.mean(drops["random"]))


def cost(model, images, method: str, repeats: int = 3) -> float:
    def best(fn):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)
    with torch.no_grad():
        plain = best(lambda: model(images))
    labels = model.labels if method == "cam" else model.labels[:1]
    return best(lambda: model.explain(images, labels=labels, method=method)) / plain


def agreement(model, images) -> float:
    """Max abs difference between the package's Grad-CAM and the rectified CAM, both scaled to [0, 1]."""
    label = model.labels[:1]
    cam = model.explain(images, labels=label, method="cam")
    grad = model.explain(images, labels=label, method="gradcam")
    worst = 0.0
    for i in range(len(images)):
        # recompute the rectified CAM from the raw map: the scaled CAM's zero is its minimum, not 0
        with torch.no_grad():
            from mlabel.explain import _cam, _scaled
            raw = _cam(model, images[i : i + 1])[0, :1].clamp_min(0)
        rectified = _scaled(raw, tuple(images.shape[2:]))[0]
        worst = max(worst, float(np.abs(rectified - grad.maps[i][0]).max()))
    del cam
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained quickstart run or model directory")
    parser.add_argument("--images", type=int, default=1000, help="test scenes to score")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir of the generated scenes")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = mlabel.load(args.model).eval()
    root = ensure_scenes(scenes_root(".", args.cache_dir))
    paths, targets, images, boxes = _load_test(root, model, args.images)
    rng = np.random.default_rng(0)
    methods = ["cam", "gradcam", "gradcam++"] if type(model.head).__name__ == "LinearHead" else ["auto", "gradcam"]
    print(f"model {args.model}: {model.backbone_name}, head {model.head_name}; {len(images)} test scenes")
    for method in methods:
        try:
            scores = pointing(model, images, targets, paths, boxes, method, rng)
        except ValueError as err:
            print(f"{method}: {err}")
            continue
        by_map, by_chance = deletion(model, images[:200], targets[:200], method, rng)
        print(f"{method:>9}: pointing game {scores[method]:.3f} over {scores['pairs']} true positives "
              f"(centre {scores['centre']:.3f}, random {scores['random']:.3f}); deletion of the top 10 %: "
              f"probability -{by_map:.3f} (random 10 %: -{by_chance:.3f}); cost {cost(model, images[:64], method):.2f}x "
              f"a forward pass of 64 images ({'all labels' if method == 'cam' else 'one label'})")
    if "cam" in methods:
        print(f"grad-cam's Grad-CAM against the rectified CAM: max abs difference {agreement(model, images[:16]):.2e}")


if __name__ == "__main__":
    main()
