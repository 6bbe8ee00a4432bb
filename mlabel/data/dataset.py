"""Image decoding, albumentations transforms and the DataLoader for one split."""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset

from ..preprocess import INTERPOLATION, preprocess_image, read_rgb, to_rgb_array
from .tables import LabelTable

__all__ = ["EvalTransform", "ImageDataset", "build_transform", "make_loader", "read_rgb", "to_rgb_array"]

class EvalTransform:
    """The evaluation preprocessing of :func:`mlabel.preprocess.preprocess_image`, called like
    an albumentations pipeline (``transform(image=array)["image"]`` is a tensor)."""

    def __init__(self, preprocessing: dict):
        self.preprocessing = preprocessing

    def __call__(self, image: np.ndarray) -> dict:
        return {"image": torch.from_numpy(preprocess_image(image, self.preprocessing))}


def build_transform(preprocessing: dict, train: bool, augment: str = "none"):
    """The pipeline for a model's saved preprocessing.

    Evaluation (and training without augmentation) uses :class:`EvalTransform`: ``crop`` resizes
    the shorter side to ``size / crop_pct`` and centre-crops ``size``; ``squish`` resizes to
    ``size x size``. Training with augmentation is an albumentations pipeline: a random resized
    crop (or a squish) and a horizontal flip; ``flips`` adds vertical flips and 90-degree
    rotations, ``medium`` a wider crop range and colour jitter.
    """
    if not train or augment == "none":
        return EvalTransform(preprocessing)
    size = int(preprocessing["image_size"])
    interp = INTERPOLATION.get(preprocessing.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    squish = preprocessing.get("resize", "crop") == "squish"
    scale = (0.6, 1.0) if augment in ("light", "flips") else (0.35, 1.0)
    ops = [A.Resize(size, size, interpolation=interp) if squish
           else A.RandomResizedCrop(size=(size, size), scale=scale, interpolation=interp),
           A.HorizontalFlip(p=0.5)]
    if augment == "flips":  # all 8 flips/rotations: for content without an up (shapes, aerial, cells)
        ops += [A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]
    if augment == "medium":
        ops.append(A.ColorJitter(0.3, 0.3, 0.3, 0.05, p=0.8))
    ops += [A.Normalize(mean=preprocessing["mean"], std=preprocessing["std"], max_pixel_value=255.0),
            ToTensorV2()]
    return A.Compose(ops)


class ImageDataset(Dataset):
    """(image tensor (3, H, W), target (L,)) pairs of a :class:`LabelTable`."""

    def __init__(self, table: LabelTable, transform: A.Compose):
        self.table = table
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        image = read_rgb(self.table.paths[index])
        tensor = self.transform(image=image)["image"]
        target = self.table.targets[index]
        if self.table.regression is not None:  # classification targets, then regression targets
            target = np.concatenate([target, self.table.regression[index]])
        return tensor, torch.from_numpy(target)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, num_workers: int,
                seed: int, pin_memory: bool = False) -> DataLoader:
    """Seeded shuffling and worker seeding, so a run is reproducible for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train and len(dataset) > batch_size,
                      num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                      worker_init_fn=_seed_worker, persistent_workers=num_workers > 0)
