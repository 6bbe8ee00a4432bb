"""Input pipeline: where the time per image goes, and the uncached albumentations loader against
the decoded cache on the same images and settings, in one run.

    python benchmarks/input_pipeline.py --data ../shared/data/miml-scene/images [--size 224] [--workers 2]

The last line prints ``cached/uncached ratio: X`` (training loader, ``light`` augmentation).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlabel.data import ImageDataset, build_transform, make_loader
from mlabel.data.cache import DecodedCache
from mlabel.data.tables import LabelTable
from mlabel.preprocess import IMAGE_EXTENSIONS, read_rgb, resize_square


def stage_times(paths: list[str], pre: dict, augment) -> dict:
    """Milliseconds per image of each stage, single thread."""
    times = {"read file": 0.0, "decode": 0.0, "resize to square": 0.0, "augment + normalise": 0.0}
    import io
    for path in paths:
        t0 = time.perf_counter()
        data = Path(path).read_bytes()
        t1 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
        t2 = time.perf_counter()
        square = resize_square(rgb, pre)
        t3 = time.perf_counter()
        augment(image=square)
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += dt
    return {k: 1000 * v / len(paths) for k, v in times.items()}


def loader_rate(dataset, batch_size: int, workers: int) -> float:
    """Images/s over one pass of the training loader (workers started beforehand)."""
    loader = make_loader(dataset, batch_size, train=True, num_workers=workers, seed=0)
    next(iter(loader))  # start the workers
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/miml-scene/images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1000, help="images used (the first N, sorted)")
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.data).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:args.limit]
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    shapes = [read_rgb(p).shape[:2] for p in paths[:20]]
    pre = {"image_size": args.size, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    augment = build_transform(pre, True, "light")
    table = LabelTable(paths, np.zeros((len(paths), 1), np.float32), ["x"], args.data)
    print(f"{len(paths)} images from {args.data} (e.g. {shapes[0][1]}x{shapes[0][0]}), {args.size} px, "
          f"'light' augmentation, batch {args.batch_size}, {args.workers} workers, torch {torch.__version__}")

    stages = stage_times(paths[:200], pre, augment)
    print("per image, one thread (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    uncached = loader_rate(ImageDataset(table, augment), args.batch_size, args.workers)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = DecodedCache(table, pre, tmp, workers=args.workers)
        build = time.perf_counter() - start
        size_mb = cache.images.nbytes / 1e6
        cached = loader_rate(ImageDataset(table, augment, cache), args.batch_size, args.workers)
        cached_stages = stage_times_cached(cache, augment)
    print(f"cache build: {build:.1f} s ({len(paths) / build:.0f} img/s), {size_mb:.0f} MB on disk")
    print("per image from the cache, one thread (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in cached_stages.items()))
    print(f"{'loader':<44}{'img/s':>8}")
    print(f"{'uncached (decode + albumentations)':<44}{uncached:>8.0f}")
    print(f"{'cached (memory-mapped squares + albumentations)':<44}{cached:>8.0f}")
    print(f"cached/uncached ratio: {cached / uncached:.1f}")


def stage_times_cached(cache: DecodedCache, augment) -> dict:
    n = min(200, len(cache))
    t0 = time.perf_counter()
    squares = [np.asarray(cache.images[i]) for i in range(n)]
    t1 = time.perf_counter()
    for square in squares:
        augment(image=square)
    t2 = time.perf_counter()
    return {"read square": 1000 * (t1 - t0) / n, "augment + normalise": 1000 * (t2 - t1) / n}


if __name__ == "__main__":
    main()
