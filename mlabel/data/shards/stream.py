"""Streaming a split of shards to training: a seeded shard order per epoch cut into contiguous
ranges per rank and loader worker, so every sample is read once, with a shuffle buffer and a
resume inside an epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...errors import DataError
from ..tables import LabelTable
from ..members import read_member

__all__ = ["ShardLoader", "ShardStream", "StreamOptions", "StreamProblem", "stream_plan"]


def stream_plan(shard_sizes: Sequence[int], order: Sequence[int], batch_size: int, rank: int, world: int,
                worker: int, workers: int) -> tuple[int, int, list[int], int]:
    """Which samples worker ``worker`` of rank ``rank`` streams in an epoch whose shard order is
    ``order``: (first, stop) positions in the epoch's sequence of samples (the shards
    concatenated in that order), the sizes of its batches, and the steps every rank takes.

    The N samples are cut into ``world`` contiguous ranges of N // W or N // W + 1 samples; every
    rank takes the same number of steps S = ceil(ceil(N / W) / batch_size) (at most N // W, so no
    batch is empty: batch_size 1 with N mod W > 0 then gives some batches of 2) with batches as
    even as possible, so no sample is dropped or repeated and DDP never waits on a rank that ran
    out. A DataLoader takes batch k from worker k mod workers, so worker w streams the
    contiguous run of samples of the batches w, w + workers, ..."""
    total = int(sum(shard_sizes[s] for s in order))
    if total < world:
        raise DataError(f"{total} samples cannot feed {world} processes: give more data or fewer processes")
    start, stop = rank * total // world, (rank + 1) * total // world
    steps = min(math.ceil(math.ceil(total / world) / batch_size), total // world)
    mine = stop - start
    sizes = [mine // steps + (k < mine % steps) for k in range(steps)]
    before = sum(sum(sizes[k] for k in range(w, steps, workers)) for w in range(worker))
    own = [sizes[k] for k in range(worker, steps, workers)]
    return start + before, start + before + sum(own), own, steps


@dataclass(frozen=True)
class StreamOptions:
    """How a :class:`ShardStream` reads: this process's ``rank`` among ``world``, the size of the
    shuffle buffer, and whether images that do not decode are left out (``skip_bad``) or stop
    training."""
    rank: int = 0
    world: int = 1
    shuffle_buffer: int = 1000
    skip_bad: bool = False


class ShardStream(IterableDataset):
    """Batches of a :class:`LabelTable` read from its shards: each epoch a seeded shard order, a
    contiguous range of it per rank and loader worker (:func:`stream_plan`: every sample exactly
    once across ranks and workers), samples read in shard order and mixed in a seeded shuffle
    buffer, each image's augmentation seeded by its place in the epoch (the same after a resume).
    ``skip_steps`` (a resume inside an epoch) skips the first steps' samples without decoding them.
    """

    def __init__(self, table: LabelTable, transform, batch_size: int, *, options: StreamOptions = StreamOptions(),
                 collate=None, batch_images=None):
        if table.members is None:
            raise ValueError("a ShardStream reads tables of wds shards")
        self.table, self.transform, self.batch_size = table, transform, batch_size
        # data.augment_on=device: a BatchImages loads whole batches (uint8 squares, or JPEG bytes
        # to decode on the GPU) and the training process finishes them on the device
        self.batch_images = batch_images
        self.rank, self.world = options.rank, options.world
        self.shuffle_buffer, self.skip_bad = options.shuffle_buffer, options.skip_bad
        self.collate = collate
        order = np.argsort(table.members.shard_of, kind="stable")  # rows grouped by shard, in table order
        bounds = np.flatnonzero(np.diff(table.members.shard_of[order])) + 1
        self.shard_rows = [part for part in np.split(order, bounds) if len(part)]
        self.epoch_seed, self.skip_steps = 0, 0

    def __len__(self) -> int:  # this rank's samples
        total = len(self.table)
        return (self.rank + 1) * total // self.world - self.rank * total // self.world

    @property
    def steps(self) -> int:
        return stream_plan([len(r) for r in self.shard_rows], range(len(self.shard_rows)), self.batch_size,
                           0, self.world, 0, 1)[3]

    def epoch_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's rows, shard after shard in its seeded shard order, and that order."""
        order = np.random.default_rng(self.epoch_seed).permutation(len(self.shard_rows))
        return np.concatenate([self.shard_rows[s] for s in order]), order

    def worker_rows(self, worker: int, workers: int) -> tuple[list[tuple[int, int]], list[int]]:
        """((position in the epoch, row) in the order this worker emits them, its batch sizes)."""
        rows, order = self.epoch_rows()
        first, stop, sizes, _ = stream_plan([len(r) for r in self.shard_rows], order, self.batch_size,
                                            self.rank, self.world, worker, workers)
        mine = rows[first:stop]
        rng = np.random.default_rng([self.epoch_seed, self.rank, worker])
        buffer, emitted = [], []
        for position, row in enumerate(mine):  # a shuffle buffer: what streaming sees, not a full permutation
            buffer.append((first + position, int(row)))
            if len(buffer) >= self.shuffle_buffer:
                emitted.append(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            emitted.append(buffer.pop(int(rng.integers(len(buffer)))))
        return emitted, sizes

    def __iter__(self):
        """Called in the worker (or, without workers, when the loader's iterator is made): the
        epoch's seed and skip are taken now, not when the first batch is asked for."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the loader asks worker 0 first: after a resume at step k it plays the part of the worker
        # that served batch k, so every batch holds the samples it held in the uninterrupted epoch
        worker = (worker + self.skip_steps) % workers
        emitted, sizes = self.worker_rows(worker, workers)
        skip = len(range(worker, self.skip_steps, workers))  # this worker's batches already trained
        return self._batches(emitted, sizes, skip)

    def sample(self, row: int, position: int, image: np.ndarray):
        """(image tensor, targets) of table row ``row``, augmented with the seed of its place in the epoch."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(self._seed(position))
        return self.transform(image=image)["image"], self.table.model_targets(row)

    def _seed(self, position: int) -> int:
        return int(np.random.default_rng([self.epoch_seed, position]).integers(2**31))

    def _batches(self, emitted: list, sizes: list[int], skip: int):
        start = sum(sizes[:skip])
        for size in sizes[skip:]:
            chunk, start = emitted[start:start + size], start + size
            if self.batch_images is not None:
                yield from self._whole_batch(chunk)
                continue
            samples, problems = [], []
            for position, row in chunk:
                try:
                    image = read_member(self.table.members[row], self.table.paths[row])
                except DataError as err:
                    if not self.skip_bad:
                        yield StreamProblem(str(err))
                        return
                    problems.append((self.table.paths[row], str(err)))
                    continue
                samples.append(self.sample(row, position, image))
            if problems:
                yield StreamProblem(None, problems)
            if samples:
                yield self.collate(samples)

    def _whole_batch(self, chunk: list):
        """One batch through ``batch_images`` (seeded per place in the epoch, like the per-image
        path); a batch that fails is loaded image by image to find the bad ones (left out and
        reported with ``skip_bad``, else the first one stops training)."""
        items = [(row, self._seed(position)) for position, row in chunk]
        try:
            yield self.batch_images.load(items)
            return
        except DataError:
            pass
        good, problems = [], []
        for item in items:
            try:
                self.batch_images.load([item])
                good.append(item)
            except DataError as err:
                if not self.skip_bad:
                    yield StreamProblem(str(err))
                    return
                problems.append((self.table.paths[item[0]], str(err)))
        yield StreamProblem(None, problems)
        if good:
            yield self.batch_images.load(good)


def _as_is(batch):
    """The stream's batches are made in the worker: passed on unchanged (no conversion of NumPy arrays)."""
    return batch


@dataclass
class StreamProblem:
    """A worker's message to the training process: a fatal problem, or samples it skipped."""
    message: str | None
    skipped: list | None = None


class ShardLoader:
    """The training loader over a :class:`ShardStream`: ``len()`` is the steps per epoch (equal on
    every rank); reseeding ``generator`` before an epoch fixes its shard order, shuffle and
    augmentation, as for the file loaders. Problems found in a worker are raised here as one
    :class:`DataError`; skipped samples are counted in ``skipped``."""

    def __init__(self, stream: ShardStream, *, num_workers: int, seed: int, pin_memory: bool = False,
                 finish: Callable | None = None):
        self.dataset, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.finish = finish  # (batch of the stream's BatchImages) -> (images, targets) on the device
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped: list = []

    def __len__(self) -> int:
        return self.dataset.steps

    def set_epoch(self, seed: int) -> None:
        """Reseed before a pass: the seed fixes the epoch's shard order, shuffle and augmentation."""
        self.generator.manual_seed(seed)

    def skip_steps(self, steps: int) -> None:
        """Make the next pass leave out its first ``steps`` batches (a resume inside an epoch):
        the stream skips their samples without decoding them."""
        self.dataset.skip_steps = steps

    def resume_start(self) -> None:
        """Nothing to do: the stream's workers are made anew each epoch."""

    def __iter__(self):
        self.dataset.epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False)
        batches = iter(loader)  # the workers (or the dataset's iterator) take the seed and skip now
        self.dataset.skip_steps = 0  # a resume's skip applies to the epoch it was set for
        for item in batches:
            if isinstance(item, StreamProblem):
                if item.message is not None:
                    raise DataError(item.message + "; rewrite that shard, or set data.on_bad_image=skip")
                self.skipped += item.skipped
                continue
            yield item if self.finish is None else self.finish(item)
