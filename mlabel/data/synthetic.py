"""A procedurally drawn multi-label dataset, so the quickstart needs no download.

Each image is a cluttered scene (gradient background, noise, distractor strokes and specks)
holding any subset of six shapes. Labels are independent and imbalanced, from about 40 % of
images (circle) down to about 7 % (star); some images hold none. Shape colours are random, so
colour says nothing about the label, and shapes may overlap. Pairs are easy to confuse on
purpose: a filled circle and a ring, a cross and a star.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from ..io import atomic_path, write_json

__all__ = ["SCENE_LABELS", "SCENE_PRIORS", "SCENE_SPLITS", "ensure_scenes", "draw_scene", "draw_scene_with_boxes",
           "scene_visibility", "scenes_root"]

SCENE_LABELS = ["circle", "square", "triangle", "cross", "ring", "star"]
SCENE_PRIORS = [0.40, 0.30, 0.22, 0.14, 0.10, 0.07]
SCENE_SPLITS = {"train": 3000, "val": 600, "test": 1000}
SCENE_SIZE = 64
_VERSION = 2  # 2: each split's shapes' boxes in SPLIT_boxes.json (the same pixels as 1)
_SCALE = 2  # drawn at twice the size, then downsampled, for anti-aliased edges


def _polygon(cx, cy, radius, n, angle, inner=None):
    points = []
    steps = n * 2 if inner else n
    for k in range(steps):
        r = inner if inner and k % 2 else radius
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _shape_box(name: str, cx, cy, r, angle) -> tuple[float, float, float, float]:
    """The drawn shape's bounding box (x0, y0, x1, y1) on the canvas it is drawn on."""
    if name in ("circle", "ring"):
        return cx - r, cy - r, cx + r, cy + r
    if name == "cross":  # two thick lines: each a rectangle around its axis
        half = max(3, int(r * 0.45)) / 2
        corners = [(cx + s * r * 1.2 * math.cos(a) + t * half * -math.sin(a),
                    cy + s * r * 1.2 * math.sin(a) + t * half * math.cos(a))
                   for a in (angle, angle + math.pi / 2) for s in (-1, 1) for t in (-1, 1)]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        return min(xs), min(ys), max(xs), max(ys)
    sides, scale, inner = {"square": (4, 1.2, None), "triangle": (3, 1.25, None), "star": (5, 1.3, r * 0.5)}[name]
    points = _polygon(cx, cy, r * scale, sides, angle, inner=inner)
    return (min(x for x, _ in points), min(y for _, y in points), max(x for x, _ in points), max(y for _, y in points))


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx, cy, r, angle, color):
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(3, int(r * 0.3)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.25, 3, angle), fill=color)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r * 1.3, 5, angle, inner=r * 0.5), fill=color)
    elif name == "cross":
        width = max(3, int(r * 0.45))
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * 1.2 * math.cos(a), r * 1.2 * math.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=width)


def draw_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> tuple[Image.Image, np.ndarray]:
    """One scene and its (6,) 0/1 target."""
    image, target, _ = draw_scene_with_boxes(rng, size)
    return image, target


def draw_scene_with_boxes(rng: np.random.Generator, size: int = SCENE_SIZE) -> tuple[Image.Image, np.ndarray, list]:
    """One scene, its (6,) 0/1 target and each drawn shape's box ``[label, x0, y0, x1, y1]`` in the
    image's pixels (clipped to it). The same draws as :func:`draw_scene`: the same pixels."""
    image, target, boxes, _ = _scene(rng, size, masks=False)
    return image, target, boxes


def _visible_shares(masks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """(6,) share of each drawn shape's pixels that no later shape covers (NaN for absent labels)."""
    shares = np.full(len(SCENE_LABELS), np.nan)
    covered = np.zeros_like(masks[0][1]) if masks else None
    for index, mask in reversed(masks):  # the last one drawn is on top
        shares[index] = (mask & ~covered).sum() / max(int(mask.sum()), 1)
        covered |= mask
    return shares


def scene_visibility(seed: int = 1234, splits: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Per split an (N, 6) array: the share of each labelled shape left visible by the shapes drawn
    over it (NaN where the label is absent), for the set :func:`ensure_scenes` draws with the same
    ``seed`` and ``splits``. The labels say a shape is there even when another one covers it; this
    says how much of it an image shows (the audit's benchmark uses it to tell such cells apart)."""
    out = {}
    for offset, (split, count) in enumerate((splits or SCENE_SPLITS).items()):
        rng = np.random.default_rng([seed, offset])
        out[split] = np.stack([_scene(rng, SCENE_SIZE, masks=True)[3] for _ in range(count)]) if count else \
            np.zeros((0, len(SCENE_LABELS)))
    return out


def _scene(rng: np.random.Generator, size: int, masks: bool):
    """(image, target, boxes, visible shares or None): with ``masks`` each shape is also drawn on a
    mask of its own, which takes no draws from ``rng``, so the pixels are the same either way."""
    big = size * _SCALE
    base = rng.integers(0, 256, 3)
    tilt = rng.integers(-60, 61, 3)
    ramp = np.linspace(0, 1, big)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, big)[:, None, None]
    canvas = np.clip(base + tilt * ramp, 0, 255).astype(np.uint8)
    canvas = np.broadcast_to(canvas, (big, big, 3)).copy()
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):  # distractor strokes
        x0, y0, x1, y1 = rng.integers(0, big, 4)
        draw.line([x0, y0, x1, y1], fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(0, 5)):  # small specks, not shapes
        x, y = rng.integers(0, big, 2)
        w, h = rng.integers(2, 7, 2)
        draw.ellipse([x, y, x + w, y + h], fill=tuple(rng.integers(0, 256, 3).tolist()))
    target = (rng.random(len(SCENE_LABELS)) < np.asarray(SCENE_PRIORS)).astype(np.float32)
    boxes, drawn = [], []
    for index in rng.permutation(np.flatnonzero(target)):
        r = rng.uniform(0.13, 0.24) * big
        cx, cy = rng.uniform(r, big - r, 2)
        color = rng.integers(0, 256, 3)
        if np.abs(color.astype(int) - base).sum() < 120:  # keep the shape visible
            color = 255 - color
        angle = rng.uniform(0, 2 * math.pi)
        _draw_shape(draw, SCENE_LABELS[index], cx, cy, r, angle, tuple(color.tolist()))
        if masks:
            mask = Image.new("1", (big, big))
            _draw_shape(ImageDraw.Draw(mask), SCENE_LABELS[index], cx, cy, r, angle, 1)
            drawn.append((int(index), np.asarray(mask, dtype=bool)))
        box = np.clip(np.asarray(_shape_box(SCENE_LABELS[index], cx, cy, r, angle)) / _SCALE, 0, size)
        boxes.append([SCENE_LABELS[index], *[round(float(v), 2) for v in box]])
    image = image.resize((size, size), Image.LANCZOS)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return (Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), target, boxes,
            _visible_shares(drawn) if masks else None)


_OWN = ("images", "train.csv", "val.csv", "test.csv", "scenes.json", "train_boxes.json", "val_boxes.json",
        "test_boxes.json")


def _spec(seed: int, splits: dict[str, int]) -> dict:
    return {"version": _VERSION, "seed": seed, "splits": splits, "size": SCENE_SIZE, "labels": SCENE_LABELS}


def scenes_root(root: str, cache_dir: str | None, seed: int = 1234) -> Path:
    """Where ``data.generate: scenes`` draws its set: a folder of its own in the cache directory
    (absolute, named by the generator's version and spec). ``data.root`` must be left unset
    (``.``) or name that folder, so that a recipe adapted to the user's own data never draws
    thousands of images into the user's folder."""
    from .cache import default_cache_dir
    digest = hashlib.sha256(json.dumps(_spec(seed, SCENE_SPLITS), sort_keys=True).encode()).hexdigest()[:12]
    own = (Path(cache_dir) if cache_dir else default_cache_dir()).resolve() / "generated" / f"scenes-{digest}"
    if root in (".", "") or Path(root).resolve() == own:
        return own
    raise DataError(f"data.generate=scenes draws its own data set, so data.root={root} would not be used; "
                    "set data.generate=null to train on that folder, or leave data.root unset")


def ensure_scenes(root: str | Path, seed: int = 1234, splits: dict[str, int] | None = None) -> Path:
    """Generate ``root/{train,val,test}.csv`` and ``root/images/`` once; reuse when complete.

    The output depends only on ``seed`` and ``splits``; a marker file records both and the
    generator version, and any change regenerates the set.
    """
    root = Path(root)
    splits = splits or SCENE_SPLITS
    spec = _spec(seed, splits)
    marker = root / "scenes.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN) if root.is_dir() else []
    if foreign and not marker.is_file():
        raise DataError(f"{root} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                        "the scene generator writes only into its own folder: leave data.root unset")
    (root / "images").mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, offset])
        rows, boxes = [], {}
        for i in range(count):
            image, target, drawn = draw_scene_with_boxes(rng)
            name = f"{split}_{i:05d}.png"
            image.save(root / "images" / name)
            rows.append([f"images/{name}", *[int(v) for v in target]])
            boxes[f"images/{name}"] = drawn
        write_json(root / f"{split}_boxes.json", boxes)  # each shape's box, for scoring explanations
        with atomic_path(root / f"{split}.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *SCENE_LABELS])
            writer.writerows(rows)
    write_json(marker, spec)
    return root
