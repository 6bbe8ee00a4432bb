"""The loaders of a training run, built from the resolved ``data`` section: the training loader
(per image from the files, batched from the decoded cache, or streamed from wds shards) and the
evaluation loaders of val and test.

Every training loader has one interface, whatever its kind (:class:`TrainLoader`): ``len()``
(batches per epoch), :meth:`~TrainLoader.set_epoch` (the reseed that fixes an epoch's order and
augmentation), :meth:`~TrainLoader.skip_steps` (a resume inside an epoch) and
:meth:`~TrainLoader.resume_start` (a resumed process starts its loader as the interrupted one
had it). The epoch loop (:mod:`mlabel.loop`) calls only these.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from ..outputs import collate
from .dataset import ImageDataset, LoaderSettings, box_crop, build_transform, make_loader

__all__ = ["TrainLoader", "augment_on", "build_loaders", "train_box_crop"]


class TrainLoader(Protocol):
    """What the epoch loop asks of a training loader (:class:`~mlabel.data.dataset.FileLoader`,
    :class:`~mlabel.data.batched.DeviceBatches`, :class:`~mlabel.data.shards.ShardLoader`)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator: ...

    def set_epoch(self, seed: int) -> None: ...

    def skip_steps(self, steps: int) -> None: ...

    def resume_start(self) -> None: ...


def train_box_crop(data, splits, preprocessing: dict):
    """The crop that keeps every labelled box of a training image (``data.box_crops`` with
    boxes in the annotations and an augmentation that crops), else None."""
    if data.box_crops is not True or splits.train.boxes is None:
        return None
    return box_crop(preprocessing, data.augment)


def augment_on(data, device: torch.device) -> str:
    """``data.augment_on`` decided (``device`` or ``workers``; :func:`mlabel.resolve.resolve`
    asks): auto means on the device when the images come from the cache and the augmentation is
    a preset: on a GPU any preset; on the CPU those without colour jitter (as tensor ops it costs
    about 2.5 ms per image there, several times albumentations' uint8 jitter;
    docs/INPUT_PIPELINE.md). An albumentations list always runs in the workers."""
    if data.augment_on != "auto":
        return data.augment_on
    cheap = device.type == "cuda" or data.augment in ("none", "light", "flips")
    return "device" if bool(data.cache) and isinstance(data.augment, str) and cheap else "workers"


def build_loaders(data, splits, preprocessing: dict, device: torch.device, world, caches: dict, seed: int):
    """(training loader, {"val": loader, "test": loader}) of ``splits`` under the ``data``
    section (a :class:`~mlabel.config.DataConfig`), for this process of ``world``; ``caches``:
    the decoded caches by split name (empty without ``data.cache``)."""
    pin = device.type == "cuda" if data.pin_memory is None else data.pin_memory
    settings = LoaderSettings(num_workers=data.num_workers, seed=seed, pin_memory=pin,
                              persistent_workers=data.persistent_workers, rank=world.rank, world=world.size)
    batched = _Batched(data, preprocessing, device, settings)
    train = _train_loader(data, splits, preprocessing, caches, batched)
    evaluate = {}
    for name, table in (("val", splits.val), ("test", splits.test)):
        if table is None:
            continue
        if batched.on_device and name in caches:  # the centre crop of the cached square: the same pixels, batched
            evaluate[name] = batched.loader(table, caches[name], "none", False)
        else:
            evaluate[name] = make_loader(ImageDataset(table, build_transform(preprocessing, False), caches.get(name)),
                                         data.batch_size, train=False, settings=settings)
    return train, evaluate


class _Batched:
    """Makes the batched loaders (:class:`~mlabel.data.batched.DeviceBatches`) of one run."""

    def __init__(self, data, preprocessing: dict, device: torch.device, settings: LoaderSettings):
        self.data, self.preprocessing, self.device, self.settings = data, preprocessing, device, settings
        self.on_device = data.augment_on == "device"

    def images(self, table, cache, augment: str, train: bool):
        from .batched import BatchImages, TensorAugment
        kind = self.device.type
        return BatchImages(table, self.preprocessing, TensorAugment(self.preprocessing, augment), cache,
                           crop=kind == "cpu", encoded=train and kind == "cuda", pin=self.settings.pin_memory)

    def loader(self, table, cache, augment: str, train: bool, images=None):
        from .batched import DeviceBatches
        images = images if images is not None else self.images(table, cache, augment, train)
        return DeviceBatches(images, self.data.batch_size, device=self.device, train=train, settings=self.settings)


def _train_loader(data, splits, preprocessing: dict, caches: dict, batched: _Batched):
    crop = train_box_crop(data, splits, preprocessing)
    if splits.train.members is not None:  # wds: streamed from the shards
        return _shard_loader(data, splits.train, preprocessing, batched)
    if batched.on_device and crop is None:
        return batched.loader(splits.train, caches.get("train"), data.augment, True)
    # box-keeping crops cut the whole decoded image: per image, from the files
    dataset = ImageDataset(splits.train, build_transform(preprocessing, True, data.augment, crop is not None),
                           caches.get("train"), crop)
    return make_loader(dataset, data.batch_size, train=True, settings=batched.settings)


def _shard_loader(data, table, preprocessing: dict, batched: _Batched):
    from .shards import ShardLoader, ShardStream, StreamOptions
    s = batched.settings
    finish, whole = None, None
    if batched.on_device:  # batches of uint8 squares (or JPEG bytes on CUDA) finished on the device
        from .batched import BatchImages, TensorAugment
        kind = batched.device.type
        whole = BatchImages(table, preprocessing, TensorAugment(preprocessing, data.augment), None,
                            crop=kind == "cpu", encoded=kind == "cuda")
        finish = batched.loader(table, None, data.augment, True, images=whole).finish
    options = StreamOptions(rank=s.rank, world=s.world, shuffle_buffer=data.shuffle_buffer,
                            skip_bad=data.on_bad_image == "skip")
    stream = ShardStream(table, build_transform(preprocessing, True, data.augment), data.batch_size,
                         options=options, collate=collate, batch_images=whole)
    return ShardLoader(stream, num_workers=s.num_workers, seed=s.seed, pin_memory=s.pin_memory, finish=finish)
