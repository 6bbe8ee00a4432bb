"""Training augmentation as batched tensor ops on uint8 images, on any device.

The per-sample albumentations pipeline turns every image into float32 in a loader worker, and
the workers then ship four bytes per pixel to the training process. Here the loader ships the
uint8 squares of the decoded cache (or of freshly decoded files) and the augmentation runs as
batched tensor operations: :meth:`TensorAugment.geometric` (random resized crop, flips,
90-degree turns) on uint8, then :meth:`TensorAugment.photometric` (colour jitter, the ``strong``
extras, normalisation) on float32 on the training device. On a GPU both stages run there; on
the CPU the crop runs in the loader workers, which keeps the batch uint8 until the end.

Every random choice of a sample comes from that sample's seed (drawn by
:class:`~mlabel.data.dataset.SeededSampler`), so a batch is the same on any device, with any
number of workers, and after a resume. The presets follow :func:`~mlabel.data.dataset.build_transform`
(same crop scales and ratios, flip and jitter probabilities); the colour jitter applies
brightness, contrast, saturation and hue in that fixed order (albumentations shuffles it).
"""
from __future__ import annotations

import numpy as np
import torch

from ..preprocess import resize_square
from .augment import GRAY, TensorAugment, adjust_hue
from .dataset import LoaderSettings, SeededSampler
from .decode import decode_to_squares
from .presets import PRESETS
from .streams import STREAMS, Streams, random_crop_boxes, uniforms

__all__ = ["PRESETS", "TensorAugment", "BatchImages", "DeviceBatches", "uniforms", "random_crop_boxes", "adjust_hue",
           "decode_to_squares", "STREAMS", "Streams", "GRAY"]


class BatchImages:
    """The images of a split by whole batches: ``load(items)`` takes a list of (index, seed)
    and returns uint8 images with each sample's augmentation parameters.

    Images come from the decoded cache (one ``take`` from the memory map), or are decoded here
    and reduced to the cache's square, or (``encoded=True``) JPEG files are passed on as bytes
    to be decoded on the device. ``crop=True`` runs :meth:`TensorAugment.geometric` here, so the
    batch is ``size`` pixels wide instead of ``S``; ``pin=True`` puts the batch in pinned memory
    for an asynchronous copy to the GPU.
    """

    def __init__(self, table, preprocessing: dict, augment: TensorAugment, cache=None, crop: bool = False,
                 encoded: bool = False, pin: bool = False):
        self.table, self.preprocessing, self.augment, self.cache = table, preprocessing, augment, cache
        self.encoded = encoded and cache is None
        self.crop, self.pin = crop and not self.encoded, pin

    def __len__(self) -> int:
        return len(self.table)

    def _empty(self, shape: tuple) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)

    def load(self, items) -> dict:
        indices = np.fromiter((i for i, _ in items), np.int64, len(items))
        params = self.augment.draw([s for _, s in items])
        targets = self.table.model_targets(indices)
        batch = {"targets": targets, "params": params, "stage": "squares"}
        if self.encoded:
            batch["encoded"], batch["decoded"] = self._read_encoded(indices)
            batch["stage"] = "encoded"
            return batch
        side, size = self.augment.side, self.augment.size
        if self.crop and self.cache is not None:  # crops resized straight from the memory map
            batch["images"] = self.augment.crop_rows(self.cache.images, self.cache.rows[indices], params,
                                                     self._empty((len(indices), size, size, 3)))
            batch["stage"] = "cropped"
            return batch
        squares = torch.empty((len(indices), side, side, 3), dtype=torch.uint8) if self.crop else \
            self._empty((len(indices), side, side, 3))
        if self.cache is not None:
            np.take(self.cache.images, self.cache.rows[indices], axis=0, out=squares.numpy())
        else:
            array = squares.numpy()
            for k, i in enumerate(indices):
                array[k] = resize_square(self.table.read_image(i), self.preprocessing)
        squares = squares.permute(0, 3, 1, 2)
        if self.crop:
            out = self._empty((len(indices), size, size, 3))
            batch["images"], batch["stage"] = self.augment.geometric(squares, params, out), "cropped"
        else:
            batch["images"] = squares
        return batch

    def _read_encoded(self, indices):
        """JPEG files as bytes; other formats decoded to squares here: {position: square}."""
        encoded, decoded = [], {}
        for k, i in enumerate(indices):
            data = self.table.read_bytes(i)
            if data[:3] == b"\xff\xd8\xff":
                encoded.append((k, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
            else:
                decoded[k] = torch.from_numpy(np.array(resize_square(self.table.read_image(i), self.preprocessing)))
        return encoded, decoded


class DeviceBatches:
    """The training loader of the batched path: yields (images, targets) on ``device``, like a
    DataLoader, from :class:`BatchImages`.

    Batches are loaded by ``workers`` threads, not processes: the work (``take`` from the
    memory map, OpenCV resizes, Pillow decoding, torch ops) releases the GIL, and a thread's
    batch needs no copy into shared memory and no pickling, which on this project's 2-core CPU
    cost more than the augmentation itself. Up to ``2 * workers`` batches are in flight and
    come out in sampler order. On the CPU the thread also runs the photometric stage; on a GPU
    the main thread copies the uint8 batch there and runs the stages that remain (JPEG
    decoding, crop, jitter, normalisation).

    The order, and each sample's seed, come from a ``BatchSampler`` over
    :class:`~mlabel.data.dataset.SeededSampler` sharing ``generator``: reseed it per epoch.
    """

    def __init__(self, images: BatchImages, batch_size: int, *, device: torch.device, train: bool,
                 settings: LoaderSettings = LoaderSettings(num_workers=2)):
        from torch.utils.data import BatchSampler
        self.images, self.augment, self.device, self.workers = images, images.augment, device, settings.num_workers
        self.dataset = images
        self.generator = torch.Generator().manual_seed(settings.seed)
        sampler = SeededSampler(len(images), self.generator, train, settings.rank, settings.world)
        self.batches = BatchSampler(sampler, batch_size, drop_last=train and len(images) > batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, seed: int) -> None:
        """Reseed before a pass: the seed fixes the epoch's order and every sample's augmentation."""
        self.generator.manual_seed(seed)

    def skip_steps(self, steps: int) -> None:
        """Make the next pass leave out its first ``steps`` batches (a resume inside an epoch)."""
        self.batches.sampler.skip = steps * self.batches.batch_size

    def resume_start(self) -> None:
        """Nothing to do: the threads draw no seed of their own."""

    def finish(self, batch: dict):
        """(images, targets) on the device from a batch of :meth:`BatchImages.load` (the shard
        stream's whole batches are finished here)."""
        return self._ready(batch)

    def _load(self, items) -> dict:
        batch = self.images.load(items)
        if self.device.type == "cpu":
            return {"images": self._finish(batch), "targets": batch["targets"], "stage": "done"}
        return batch

    def _finish(self, batch: dict) -> torch.Tensor:
        params, device = batch["params"], self.device
        if batch["stage"] == "encoded":
            n = len(batch["encoded"]) + len(batch["decoded"])
            squares = torch.empty((n, 3, self.augment.side, self.augment.side), dtype=torch.uint8, device=device)
            if batch["encoded"]:
                positions = [k for k, _ in batch["encoded"]]
                squares[positions] = decode_to_squares([data for _, data in batch["encoded"]],
                                                       self.images.preprocessing, device)
            for k, square in batch["decoded"].items():
                squares[k] = square.to(device).permute(2, 0, 1)
            images = self.augment.geometric(squares, params)
        elif batch["stage"] == "squares":
            images = self.augment.geometric(batch["images"].to(device, non_blocking=True), params)
        else:
            images = batch["images"].to(device, non_blocking=True)
        return self.augment.photometric(images, params)

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        # a DataLoader draws its workers' base seed from the generator before the first batch;
        # drawing it too keeps the epoch's order that of the per-sample loader
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        import cv2
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # the loader threads are the parallelism: OpenCV's pool would contend (restored after)
        try:
            if self.workers <= 0:
                for items in self.batches:
                    yield self._ready(self._load(items))
                return
            with ThreadPoolExecutor(self.workers, thread_name_prefix="mlabel-batches") as pool:
                pending = deque()
                for items in self.batches:
                    pending.append(pool.submit(self._load, items))
                    if len(pending) >= 2 * self.workers:
                        yield self._ready(pending.popleft().result())
                while pending:
                    yield self._ready(pending.popleft().result())
        finally:
            cv2.setNumThreads(threads)

    def _ready(self, batch: dict):
        images = batch["images"] if batch["stage"] == "done" else self._finish(batch)
        return images, batch["targets"].to(self.device, non_blocking=True)
