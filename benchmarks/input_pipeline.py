"""Input pipeline: where the time per image goes, and the uncached albumentations loader against
the decoded cache on the same images and settings, in one run.

    python benchmarks/input_pipeline.py --data ../shared/data/miml-scene/images [--size 224] [--workers 2]

Loaders, each one pass over the same images with ``light`` augmentation (random resized crop,
flip, normalise) and the same batch size and workers:

- uncached: files decoded and augmented per image by albumentations in the workers (float32
  batches), the loader mlabel uses without ``data.cache``;
- cached, albumentations: the same per-image pipeline reading decoded squares from the cache;
- cached, batched: ``data.cache`` with ``data.augment_on=device`` (the default with the cache):
  uint8 batches from the memory map, crop and flip on uint8, normalisation as a batched tensor
  op on the device; the time includes that device stage.

The last line prints ``cached/uncached ratio: X`` (cached batched against uncached).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as mlabel.train sets it, for every loader alike

import numpy as np
import torch
from PIL import Image

from mlabel.data import ImageDataset, build_transform, make_loader
from mlabel.data.dataset import LoaderSettings
from mlabel.data.batched import BatchImages, DeviceBatches, TensorAugment
from mlabel.data.cache import DecodedCache
from mlabel.data.tables import LabelTable
from mlabel.preprocess import IMAGE_EXTENSIONS, read_rgb, resize_square


def stage_times(paths: list[str], pre: dict, augment, device: torch.device, batch: int = 32) -> dict:
    """Milliseconds per image of each stage of the per-image loader, single thread; collate is
    the stacking of ``batch`` float32 images, host-to-device their copy (pinned) to a GPU."""
    import io
    times = {"read file": 0.0, "decode": 0.0, "resize to square": 0.0, "augment + normalise": 0.0}
    tensors = []
    for path in paths:
        t0 = time.perf_counter()
        data = Path(path).read_bytes()
        t1 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
        t2 = time.perf_counter()
        square = resize_square(rgb, pre)
        t3 = time.perf_counter()
        tensors.append(augment(image=square)["image"])
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += dt
    times = {k: 1000 * v / len(paths) for k, v in times.items()}
    n = len(tensors) // batch * batch
    start = time.perf_counter()
    stacked = [torch.stack(tensors[k:k + batch]) for k in range(0, n, batch)]
    times["collate"] = 1000 * (time.perf_counter() - start) / n
    if device.type == "cuda":
        pinned = [t.pin_memory() for t in stacked]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for t in pinned:
            t.to(device, non_blocking=True)
        torch.cuda.synchronize()
        times["host-to-device"] = 1000 * (time.perf_counter() - start) / n
    return times


def loader_rate(dataset, batch_size: int, workers: int, device: torch.device, passes: int = 2) -> float:
    """Images/s of the training loader over ``passes`` epochs, the batches moved to ``device``.
    A per-image dataset goes through mlabel's DataLoader (persistent worker processes, started
    beforehand); :class:`BatchImages` through :class:`DeviceBatches` (threads), whose time
    includes the stages it runs on the device."""
    if isinstance(dataset, BatchImages):
        batches = DeviceBatches(dataset, batch_size, device=device, train=True,
                                settings=LoaderSettings(num_workers=workers))
        generator = batches.generator
    else:
        batches = make_loader(dataset, batch_size, train=True,
                              settings=LoaderSettings(num_workers=workers, pin_memory=device.type == "cuda"))
        generator = batches.generator
        next(iter(batches))  # start the workers
    seen, start = 0, time.perf_counter()
    for epoch in range(passes):
        generator.manual_seed(epoch)
        for images, _ in batches:
            images = images.to(device, non_blocking=True)
            seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


class Steps:
    """``steps`` batches from ``batches`` (epochs repeated, reseeded), or the same synthetic batch
    already on the device when ``batches`` is None: the ceiling no input pipeline can beat."""

    def __init__(self, batches, steps: int, synthetic=None):
        self.batches, self.steps, self.synthetic = batches, steps, synthetic

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.batches is None:
            for _ in range(self.steps):
                yield self.synthetic
            return
        done, epoch = 0, 0
        while True:
            self.batches.generator.manual_seed(epoch)
            for batch in self.batches:
                yield batch
                done += 1
                if done == self.steps:
                    return
            epoch += 1


def train_rates(cache, table, pre: dict, args, device: torch.device) -> dict:
    """Training images/s of ``args.backbone`` (bf16 autocast on CUDA, channels_last) fed by the
    cached batched loader, and on one synthetic batch kept on the device, in the same run."""
    import mlabel
    from mlabel.engine import Stepper, build_optimizer, build_scheduler, train_one_epoch
    from mlabel.losses import BCEWithLogits
    batch = args.train_batch_size
    rates = {}
    for name in ("synthetic batch on the device (ceiling)", "cached batched loader (data.cache, augment_on=device)"):
        torch.manual_seed(0)
        model = mlabel.create_model(args.backbone, ["a"], pretrained=False, image_size=args.size).to(device)
        model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, 1e-3, 0.05)
        scheduler = build_scheduler(optimizer, 10 * args.train_steps, 0)
        if name.startswith("synthetic"):
            images = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
            source = lambda steps: Steps(None, steps, (images, torch.zeros(batch, 1, device=device)))  # noqa: E731
        else:
            loader = DeviceBatches(BatchImages(table, pre, TensorAugment(pre, "light"), cache, crop=device.type == "cpu",
                                               pin=device.type == "cuda"), batch, device=device, train=True,
                                   settings=LoaderSettings(num_workers=args.workers))
            source = lambda steps: Steps(loader, steps)  # noqa: E731
        stepper = Stepper(optimizer, scheduler, channels_last=True, precision="auto")
        train_one_epoch(model, source(max(2, args.train_steps // 5)), BCEWithLogits(), stepper,
                        device, 1, quiet=True)  # warm-up: cuDNN autotuning, allocator, loader threads
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(model, source(args.train_steps), BCEWithLogits(), stepper, device, 2, quiet=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = args.train_steps * batch / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/miml-scene/images")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=1000, help="images used (the first N, sorted)")
    parser.add_argument("--train", action="store_true", help="also training throughput (default on CUDA)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--train-batch-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=50)
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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensor_augment = TensorAugment(pre, "light")

    stages = stage_times(paths[:200], pre, augment, device)
    print("per image, one thread (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    rates = {"uncached: decode + albumentations in workers":
             loader_rate(ImageDataset(table, augment), args.batch_size, args.workers, device=device)}
    if device.type == "cuda":
        rates["uncached: JPEG bytes decoded on the GPU, batched augmentation"] = loader_rate(
            BatchImages(table, pre, tensor_augment, encoded=True, pin=True), args.batch_size, args.workers, device)
    else:
        rates["uncached: decode in workers, batched augmentation"] = loader_rate(
            BatchImages(table, pre, tensor_augment, crop=True), args.batch_size, args.workers, device)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = DecodedCache(table, pre, tmp, workers=args.workers)
        build = time.perf_counter() - start
        size_mb = cache.images.nbytes / 1e6
        rates["cached: albumentations in workers"] = loader_rate(
            ImageDataset(table, augment, cache), args.batch_size, args.workers, device=device)
        rates["cached: batched augmentation (data.augment_on=device)"] = loader_rate(
            BatchImages(table, pre, tensor_augment, cache, crop=device.type == "cpu", pin=device.type == "cuda"),
            args.batch_size, args.workers, device)
        cached_stages = stage_times_cached(cache, augment, tensor_augment)
        training = train_rates(cache, table, pre, args, device) if args.train or device.type == "cuda" else {}
    print(f"cache build: {build:.1f} s ({len(paths) / build:.0f} img/s), {size_mb:.0f} MB on disk")
    print("per image from the cache, one thread (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in cached_stages.items()))
    print(f"{'training loader, ' + device.type:<64}{'img/s':>8}")
    for name, rate in rates.items():
        print(f"{name:<64}{rate:>8.0f}")
    uncached, cached = rates["uncached: decode + albumentations in workers"], rates[
        "cached: batched augmentation (data.augment_on=device)"]
    if training:
        print(f"{'training ' + args.backbone + f' at {args.size} px, batch {args.train_batch_size}':<64}{'img/s':>8}")
        for name, rate in training.items():
            print(f"{name:<64}{rate:>8.0f}")
        ceiling, fed = training.values()
        print(f"cached loader / synthetic ceiling: {fed / ceiling:.0%}")
    print(f"cached/uncached ratio: {cached / uncached:.1f}")


def stage_times_cached(cache: DecodedCache, augment, tensor_augment: TensorAugment, batch: int = 32) -> dict:
    n = min(200, len(cache)) // batch * batch
    t0 = time.perf_counter()
    squares = [np.asarray(cache.images[i]) for i in range(n)]
    t1 = time.perf_counter()
    for square in squares:
        augment(image=square)
    t2 = time.perf_counter()
    times = {"read square": t1 - t0, "albumentations augment + normalise": t2 - t1,
             "batched: gather": 0.0, "draw": 0.0, "crop + flip (uint8)": 0.0, "to float + normalise": 0.0}
    for start in range(0, n, batch):
        t0 = time.perf_counter()
        images = torch.from_numpy(np.array(cache.images[start:start + batch])).permute(0, 3, 1, 2)
        t1 = time.perf_counter()
        params = tensor_augment.draw(range(start, start + batch))
        t2 = time.perf_counter()
        cropped = tensor_augment.geometric(images, params)
        t3 = time.perf_counter()
        tensor_augment.photometric(cropped, params)
        t4 = time.perf_counter()
        for key, dt in zip(list(times)[2:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += dt
    return {k: 1000 * v / n for k, v in times.items()}


if __name__ == "__main__":
    main()
