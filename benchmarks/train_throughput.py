"""Training throughput: mlabel's trainer against a timm-style loop on the same images, model,
batch size, resolution and precision, in one run.

    python benchmarks/train_throughput.py [--images 256] [--backbone tf_efficientnet_lite0] [--size 160]

The issue asks for timm's own ``train.py``; that script lives in timm's git repository and is
not part of the installed package (neither the wheel nor the sdist ship it), and nothing may be
fetched here. The baseline is therefore the loop ``train.py`` runs per step, built from the
installed timm's public pieces: ``timm.data.create_transform`` (its training transform: random
resized crop, flip, colour jitter, PIL), a torch DataLoader, ``timm.optim.create_optimizer_v2``
(AdamW) and ``BCEWithLogitsLoss`` (train.py's BCE mode). mlabel runs ``train_one_epoch`` with its
own loader (OpenCV/albumentations ``light`` preset, seeded sampler). One warm-up epoch each, then
one timed epoch each; images/s counts every image the optimizer saw.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset

import mlabel
from _images import noise_jpegs
from mlabel.data import ImageDataset, build_transform, make_loader
from mlabel.data.dataset import LoaderSettings
from mlabel.data.tables import LabelTable
from mlabel.engine import Stepper, build_optimizer, build_scheduler, train_one_epoch
from mlabel.losses import BCEWithLogits

LABELS = ["a", "b", "c", "d", "e"]


class PILDataset(Dataset):
    def __init__(self, paths, targets, transform):
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), torch.from_numpy(self.targets[i])


def timm_style_epoch(model, loader, optimizer, loss_fn) -> int:
    model.train()
    seen = 0
    for images, targets in loader:
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = noise_jpegs(tmp, args.images, 240, 320, rng)
        targets = (rng.random((args.images, len(LABELS))) < 0.3).astype(np.float32)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"{args.images} JPEGs 320x240, {args.backbone} at {args.size}px, batch {args.batch_size}, "
              f"{args.workers} loader workers, fp32, {device}, {torch.get_num_threads()} threads")

        # mlabel
        torch.manual_seed(0)
        model = mlabel.create_model(args.backbone, LABELS, image_size=args.size, resize="crop").to(device)
        loader = make_loader(ImageDataset(LabelTable(paths, targets, LABELS, "bench"),
                                          build_transform(model.preprocessing, True, "light")),
                             args.batch_size, train=True, settings=LoaderSettings(num_workers=args.workers))
        optimizer = build_optimizer(model, 1e-3, 0.05)
        scheduler = build_scheduler(optimizer, 2 * len(loader), 0)
        rates = []
        for epoch in (1, 2):
            row = train_one_epoch(model, loader, BCEWithLogits(), Stepper(optimizer, scheduler), device, epoch,
                                  quiet=True)
            rates.append(row["images_per_s"])
        ours = rates[-1]

        # timm-style loop
        torch.manual_seed(0)
        model = timm.create_model(args.backbone, num_classes=len(LABELS)).to(device)
        transform = create_transform(args.size, is_training=True, color_jitter=0.4)
        loader = DataLoader(PILDataset(paths, targets, transform), batch_size=args.batch_size, shuffle=True,
                            num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        timm_style_epoch(model, loader, optimizer, loss_fn)
        start = time.perf_counter()
        seen = timm_style_epoch(model, loader, optimizer, loss_fn)
        theirs = seen / (time.perf_counter() - start)

        print(f"{'trainer':<58}{'img/s':>8}")
        print(f"{'timm-style loop (create_transform, create_optimizer_v2, BCE)':<58}{theirs:>8.1f}")
        print(f"{'mlabel train_one_epoch (light preset)':<58}{ours:>8.1f}")
        print(f"ratio mlabel / timm-style: {ours / theirs:.2f} (goal >= 1.0 on CPU)")


if __name__ == "__main__":
    main()
