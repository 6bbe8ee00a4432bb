"""Per-sample random numbers for the batched augmentation: each sample's uniforms are a pure
function of its seed (a counter-based generator), and every random choice owns named columns of
them (:data:`STREAMS`), allocated once, so two augmentations can never share a draw."""
from __future__ import annotations

import math

import numpy as np

from . import presets as P

__all__ = ["uniforms", "Streams", "STREAMS", "TRIES", "random_crop_boxes"]


def uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(len(seeds), count) uniforms in [0, 1): splitmix64 of (seed, k), a counter-based stream,
    so each sample's numbers depend on its seed alone and a batch is drawn in one go."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15) + \
            (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03))[None]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class Streams:
    """Named columns of each sample's uniforms: every random choice of an augmentation owns its
    own columns, allocated once here in a fixed order, so no two choices can share (and so
    correlate) a number, and a new choice appended at the end leaves the others' numbers as
    they were."""

    def __init__(self, layout: list[tuple[str, int]]):
        self.slices: dict[str, slice] = {}
        start = 0
        for name, width in layout:
            if name in self.slices:
                raise ValueError(f"stream {name!r} allocated twice")
            self.slices[name] = slice(start, start + width)
            start += width
        self.width = start

    def draw(self, seeds: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: (n, width) uniforms}`` (``(n,)`` for a single column) for these seeds."""
        u = uniforms(seeds, self.width)
        return {name: u[:, s] if s.stop - s.start > 1 else u[:, s.start] for name, s in self.slices.items()}


TRIES = 10  # random resized crop: tries before the centre crop (torchvision and albumentations)
STREAMS = Streams([
    ("crop", 4 * TRIES),  # area, aspect, top and left of each try: random_crop_boxes
    ("hflip", 1), ("vflip", 1), ("turns", 1), ("jitter_on", 1), ("jitter", 4),
    ("affine_on", 1), ("affine_scale", 1), ("affine_angle", 1), ("affine_shift", 2),
    ("blur_or_noise", 1), ("blur", 1), ("blur_size", 1), ("blur_sigma", 1), ("noise", 1),
    ("holes_on", 1), ("holes_count", 1), ("holes", 4 * 4),  # per hole: height, width, top, left
])


def random_crop_boxes(u: np.ndarray, height: int, width: int, scale, ratio=P.CROP_RATIO) -> np.ndarray:
    """(n, 4) boxes (top, left, h, w) of random resized crops from (n, 40) uniforms: area
    fraction in ``scale``, aspect ratio log-uniform in ``ratio``, the first of 10 tries that
    fits; else the centre crop with the ratio clamped (the rule of torchvision and
    albumentations)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[:, 10:20])
    w, h = np.round(np.sqrt(target * aspect)).astype(np.int64), np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)
    rows = np.arange(len(u))
    w, h = w[rows, first], h[rows, first]
    top = (u[rows, 20 + first] * (height - h + 1)).astype(np.int64)
    left = (u[rows, 30 + first] * (width - w + 1)).astype(np.int64)
    boxes = np.stack([top, left, h, w], 1)
    aspect = width / height
    fw, fh = width, height
    if aspect < ratio[0]:
        fh = int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        fw = int(round(height * ratio[1]))
    boxes[~fits.any(1)] = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return boxes
