"""Image decoding, albumentations transforms and the DataLoader for one split."""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, Sampler

from . import presets as P
from ..outputs import collate
from ..preprocess import INTERPOLATION, preprocess_image, read_rgb, to_rgb_array
from ..errors import DataError
from .tables import LabelTable

__all__ = ["BoxSafeCrop", "EvalTransform", "ImageDataset", "box_crop", "build_transform", "FileLoader", "LoaderSettings", "make_loader", "read_rgb", "to_rgb_array"]

class EvalTransform:
    """The evaluation preprocessing of :func:`mlabel.preprocess.preprocess_image`, called like
    an albumentations pipeline (``transform(image=array)["image"]`` is a tensor)."""

    def __init__(self, preprocessing: dict):
        self.preprocessing = preprocessing

    def __call__(self, image: np.ndarray) -> dict:
        return {"image": torch.from_numpy(preprocess_image(image, self.preprocessing))}


def augmentation_ops(spec: list[dict]) -> list:
    """``[{name: HorizontalFlip, p: 0.5}, ...]`` -> albumentations transforms, with a clear error
    for an unknown name or argument."""
    ops = []
    for k, item in enumerate(spec):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise DataError(f"data.augment[{k}] must be a mapping with a 'name', like {{name: HorizontalFlip, p: 0.5}}")
        kwargs = {key: value for key, value in item.items() if key != "name"}
        cls = getattr(A, item["name"], None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise DataError(f"data.augment[{k}]: {item['name']!r} is not an albumentations transform "
                            "(names as in albumentations, e.g. HorizontalFlip, ColorJitter, Affine)")
        try:
            with warnings.catch_warnings(record=True) as caught:  # albumentations warns on bad arguments
                warnings.simplefilter("always")
                ops.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise DataError(f"data.augment[{k}] ({item['name']}): {err}") from None
        invalid = [str(w.message) for w in caught if "not valid" in str(w.message)]
        if invalid:
            raise DataError(f"data.augment[{k}] ({item['name']}): {invalid[0]}")
    return ops


class BoxSafeCrop:
    """A random resized crop that keeps every labelled box of its image (``data.box_crops``).

    The region is drawn as timm's ``RandomResizedCrop`` draws it (an area share in ``scale``, a
    log-uniform aspect ratio in ``ratio``, ten tries, else the whole image); then, where the
    region is smaller than the rectangle around the image's boxes, it is widened to that
    rectangle, and it is placed uniformly among the positions that contain it. Augmentation so
    never cuts a labelled object out of the frame while its target still says it is there.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]):
        self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))

    def region(self, height: int, width: int, boxes: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop in a ``height x width`` image with ``boxes`` (K, 4)."""
        h, w = height, width
        for _ in range(10):
            area = height * width * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                h, w = ch, cw
                break
        x0, y0, x1, y1 = width, height, 0, 0  # no box: any position
        if len(boxes):
            x0, y0 = (int(math.floor(min(max(v, 0.0), limit))) for v, limit in
                      ((boxes[:, 0].min(), width), (boxes[:, 1].min(), height)))
            x1, y1 = (int(math.ceil(max(min(v, limit), 0.0))) for v, limit in
                      ((boxes[:, 2].max(), width), (boxes[:, 3].max(), height)))
            w, h = max(w, x1 - x0), max(h, y1 - y0)
        # the positions that keep [x0, x1) x [y0, y1) inside [left, left + w) x [top, top + h)
        left = int(rng.integers(max(0, x1 - w), min(x0, width - w) + 1))
        top = int(rng.integers(max(0, y1 - h), min(y0, height - h) + 1))
        return top, left, h, w

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = self.region(image.shape[0], image.shape[1], boxes, rng)
        return image[top:top + h, left:left + w]


def box_crop(preprocessing: dict, augment) -> BoxSafeCrop | None:
    """The box-keeping crop where the training augmentation crops (a preset with ``resize:
    crop``), else None: ``squish`` and ``none`` keep the whole image anyway, and a list of
    albumentations transforms is the user's own."""
    if augment == "none" or not isinstance(augment, str) or preprocessing.get("resize", "crop") == "squish":
        return None
    return BoxSafeCrop(P.CROP_SCALE[augment], P.CROP_RATIO)


def build_transform(preprocessing: dict, train: bool, augment: str | list = "none", box_safe: bool = False):
    """The pipeline for a model's saved preprocessing.

    Evaluation (and training without augmentation) uses :class:`EvalTransform`: ``crop`` resizes
    the shorter side to ``size / crop_pct`` and centre-crops ``size``; ``squish`` resizes to
    ``size x size``. Training presets (albumentations): a random resized crop (or, with
    ``squish``, a resize) and a horizontal flip; ``flips`` adds vertical flips and 90-degree
    rotations; ``medium`` a wider crop range and colour jitter; ``strong`` adds to ``medium``
    small affine moves, blur or noise, and coarse dropout. A list of transforms replaces the
    preset; the result is resized to the model's size. Normalisation always comes last.
    ``box_safe``: the image arrives cropped by :class:`BoxSafeCrop`, and is resized, not cropped.
    """
    if not train or augment == "none":
        return EvalTransform(preprocessing)
    size = int(preprocessing["image_size"])
    interp = INTERPOLATION.get(preprocessing.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    squish = preprocessing.get("resize", "crop") == "squish"
    if isinstance(augment, list):
        ops = augmentation_ops(augment) + [A.Resize(size, size, interpolation=interp)]
    else:
        ops = [A.Resize(size, size, interpolation=interp) if squish or box_safe
               else A.RandomResizedCrop(size=(size, size), scale=P.CROP_SCALE[augment], ratio=P.CROP_RATIO,
                                        interpolation=interp),
               A.HorizontalFlip(p=0.5)]
        if augment == "flips":  # all 8 flips/rotations: for content without an up (shapes, aerial, cells)
            ops += [A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]
        if augment in ("medium", "strong"):
            ops.append(A.ColorJitter(*P.JITTER, p=P.JITTER_P))
        if augment == "strong":
            ops += [A.Affine(scale=P.AFFINE["scale"], translate_percent=P.AFFINE["translate"],
                             rotate=P.AFFINE["rotate"], p=P.AFFINE["p"]),
                    A.OneOf([A.GaussianBlur(blur_limit=P.BLUR_SIZES, sigma_limit=P.BLUR_SIGMA),
                             A.GaussNoise(std_range=P.NOISE_STD)], p=P.BLUR_OR_NOISE_P),
                    A.CoarseDropout(num_holes_range=P.DROPOUT["holes"], hole_height_range=P.DROPOUT["size"],
                                    hole_width_range=P.DROPOUT["size"], p=P.DROPOUT["p"])]
    ops += [A.Normalize(mean=preprocessing["mean"], std=preprocessing["std"], max_pixel_value=255.0),
            ToTensorV2()]
    return A.Compose(ops)


class ImageDataset(Dataset):
    """(image tensor (3, H, W), target (L,)) pairs of a :class:`LabelTable`."""

    def __init__(self, table: LabelTable, transform, cache=None, crop: BoxSafeCrop | None = None):
        self.table = table
        self.transform = transform
        self.cache = cache  # a DecodedCache: decoded squares instead of the files
        self.crop = crop if table.boxes is not None else None  # boxes are in the files' pixels
        if self.crop is not None and cache is not None:
            raise ValueError("box-keeping crops need the whole decoded image, not the cache's square")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item):
        """``item``: an index, or (index, seed) from :class:`SeededSampler`: the augmentation of
        that sample is then a function of the seed alone, whatever the worker or a resume."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        image = np.asarray(self.cache[index]) if self.cache is not None else self.table.read_image(index)
        if self.crop is not None:
            rng = np.random.default_rng(seed if seed is not None else np.random.randint(2**31))
            image = self.crop(image, self.table.boxes[index], rng)
        tensor = self.transform(image=image)["image"]
        return tensor, self.table.model_targets(index)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SeededSampler(Sampler):
    """Yields (index, seed) pairs: the order (shuffled or not) and one seed per sample drawn from
    ``generator``. Re-seeding the generator before an epoch fixes that epoch's order and every
    sample's augmentation, in any worker, also after a resume.

    Under DDP, rank r takes positions r, r + W, ... : training drops the last ``N mod W``
    positions so every rank has as many samples (and the union of the ranks' k-th batches is
    the single-process k-th batch of W times the size); evaluation pads with the first samples
    so that every image is seen (see :func:`mlabel.distributed.gather_rows`).
    """

    def __init__(self, size: int, generator: torch.Generator, shuffle: bool, rank: int = 0, world: int = 1):
        self.size, self.generator, self.shuffle, self.rank, self.world = size, generator, shuffle, rank, world
        self.positions = (size // world) * world if shuffle else -(-size // world) * world
        self.skip = 0  # samples of this rank to leave out of the next pass (a resume inside an epoch)

    def __len__(self) -> int:
        return self.positions // self.world

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        base = int(torch.randint(0, 2**31 - self.positions, (1,), generator=self.generator))
        mine = range(self.rank, self.positions, self.world)
        skip, self.skip = self.skip, 0
        return iter([(int(order[k % self.size]), base + k) for k in mine][skip:])


@dataclass(frozen=True)
class LoaderSettings:
    """How a split's loader runs, whatever its kind: ``num_workers`` processes (threads for the
    batched loader), the ``seed`` of its order and augmentation, pinned memory, persistent
    workers, and this process's ``rank`` among ``world`` DDP processes."""
    num_workers: int = 0
    seed: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    rank: int = 0
    world: int = 1


class FileLoader(DataLoader):
    """The per-image loader (a :class:`~torch.utils.data.DataLoader` over a
    :class:`SeededSampler`) with the training loaders' interface: :meth:`set_epoch`,
    :meth:`skip_steps`, :meth:`resume_start` and ``len()`` (batches per epoch)."""

    def set_epoch(self, seed: int) -> None:
        """Reseed before a pass: the seed fixes the epoch's order and every sample's augmentation."""
        self.generator.manual_seed(seed)

    def skip_steps(self, steps: int) -> None:
        """Make the next pass leave out its first ``steps`` batches (a resume inside an epoch)."""
        self.sampler.skip = steps * self.batch_size

    def resume_start(self) -> None:
        """A resumed run starts its loader as the interrupted run had it: a DataLoader with
        persistent workers draws its workers' base seed from the shared generator when its first
        iterator is made (epoch 1), not in later epochs, so a process resuming at a later epoch
        makes its iterator now, before the epoch's reseed; the epoch then orders its samples as
        the uninterrupted run."""
        if self.persistent_workers and self.num_workers > 0:
            iter(self)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool,
                settings: LoaderSettings = LoaderSettings()) -> FileLoader:
    """Seeded shuffling and worker seeding (each worker's NumPy and ``random`` seeded from
    torch's per-worker seed), so a run is reproducible for a given seed and worker count."""
    s = settings
    generator = torch.Generator().manual_seed(s.seed)
    return FileLoader(dataset, batch_size=batch_size, sampler=SeededSampler(len(dataset), generator, train, s.rank, s.world),
                      drop_last=train and len(dataset) > batch_size, num_workers=s.num_workers,
                      pin_memory=s.pin_memory, generator=generator, worker_init_fn=_seed_worker, collate_fn=collate,
                      persistent_workers=s.persistent_workers and s.num_workers > 0)
