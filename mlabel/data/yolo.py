"""Ultralytics YOLO detection folders: ``data.yaml`` plus one label text file per image.

An image's labels are the classes of its boxes (positive), every other class negative; an empty
label file is an image without objects (all negative), and so is a missing one, as Ultralytics
treats it (counted in a warning). The boxes feed ``data.box_crops``; polygon (segment) lines give
their bounding box. Layout rules follow Ultralytics: ``path`` (relative to the yaml, else the
yaml's folder) is the base of ``train`` / ``val`` / ``test``, each an image folder, a list file
or a list of either; an entry ``../x`` that does not exist is tried as ``x`` (Roboflow exports);
an image ``.../images/a.jpg`` has its labels in ``.../labels/a.txt`` (the last ``images``).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from PIL import Image

from ..config import yaml_problem
from ..errors import DataError
from ..preprocess import IMAGE_EXTENSIONS
from .sparse import SparseLabels
from ..io import read_text
from .tables import SPARSE_FROM, LabelTable, check_files

__all__ = ["read_yolo_table", "read_yolo_yaml", "yolo_split", "NormalizedBoxes", "image_size"]

TOLERANCE = 0.01  # coordinates this far outside [0, 1] are clipped (rounding in exporters), beyond refused
MAX_SHOWN = 10  # malformed lines listed in one error
BLOCK = 8192  # label files whose numbers are parsed together (bounds the memory of their tokens)


def read_yolo_yaml(path: Path) -> dict:
    """The yaml as a mapping with ``names`` (list, id order) and ``base`` (the resolved ``path``)."""
    if not path.is_file():
        raise DataError(f"YOLO data.yaml {path} not found: data.root must be the data set's yaml file "
                        "(with names and train/val image folders)")
    try:
        tree = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise DataError(yaml_problem(path, err, "YOLO data.yaml")) from None
    if not isinstance(tree, dict):
        raise DataError(f"{path}: expected a mapping with names and train/val, got {type(tree).__name__}")
    return {**tree, "names": _names(tree, path), "base": _base(tree, path)}


def _names(tree: dict, path: Path) -> list[str]:
    """``names`` as a list or an id -> name map (ids 0..nc-1), checked against ``nc``."""
    names = tree.get("names")
    if names is None:
        raise DataError(f"{path}: no 'names'; list the class names (names: [cat, dog]) or map ids to them")
    if isinstance(names, dict):
        try:
            found = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{path}: names must map class ids (0, 1, ...) to names; got keys "
                            f"{list(names)[:5]}") from None
        if sorted(found) != list(range(len(found))):
            raise DataError(f"{path}: names' ids are {sorted(found)[:10]}; give every id from 0 to {len(found) - 1}")
        names = [found[i] for i in range(len(found))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: names must be a non-empty list or id -> name map, got {names!r:.80}")
    names = [str(n) if isinstance(n, (int, float)) else n for n in names]
    nc = tree.get("nc")
    if nc is not None and nc != len(names):
        raise DataError(f"{path}: nc is {nc} but names lists {len(names)} classes; make them agree")
    return names


def _base(tree: dict, path: Path) -> Path:
    """The data set's root: ``path`` relative to the yaml's folder (or absolute); without one, or
    when it names no folder there (a path meant for Ultralytics' datasets_dir), the yaml's folder."""
    given = tree.get("path")
    if given:
        base = Path(str(given)).expanduser()
        base = base if base.is_absolute() else path.parent / base
        if base.is_dir():
            return base
    return path.parent


def yolo_split(tree: dict, name: str, path: Path) -> list[str]:
    """The image files of split ``name`` (``train``, ``val``, ``test`` or any yaml key), as
    strings (10^5 ``Path`` objects cost a second)."""
    entry = tree.get(name)
    if entry is None and name == "val":
        entry = tree.get("valid")
    if not entry:
        raise DataError(f"{path}: no {name!r} split (keys: {sorted(k for k in tree if k != 'base')}); "
                        f"name a split the yaml has, or set data.{'val' if name == 'val' else name}=null")
    entries = entry if isinstance(entry, list) else [entry]
    images: list[str] = []
    for item in entries:
        images += _entry_images(tree["base"], str(item), path, name)
    seen: dict[str, int] = {}
    for i, image in enumerate(images):
        key = os.path.normpath(os.path.abspath(image))
        if key in seen:
            raise DataError(f"{path}: split {name!r} lists image {image} twice; list each image once")
        seen[key] = i
    if not images:
        raise DataError(f"{path}: split {name!r} ({entry}) holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _entry_images(base: Path, item: str, path: Path, split: str) -> list[str]:
    """One split entry: an image folder (searched recursively) or a list file of image paths."""
    target = Path(item).expanduser()
    if not target.is_absolute():
        target = base / item
        if not target.exists() and item.startswith("../"):
            target = base / item[3:]  # Roboflow's "../train/images" beside the yaml
    if target.is_dir():
        found = (os.path.join(d, f) for d, _, files in os.walk(target) for f in files)
        return sorted(p for p in found if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
    if target.is_file():
        return _list_file(target, base)
    raise DataError(f"{path}: split {split!r}: {item} not found (looked for {target}); give an image "
                    "folder or a list file, relative to the yaml's path")


def _list_file(listing: Path, base: Path) -> list[str]:
    """A text file of image paths, one a line: ``./x`` from the list's folder, others from the
    list's folder when there, else from the data set's root."""
    images = []
    for line in read_text(listing).splitlines():
        line = line.strip()
        if not line:
            continue
        if os.path.isabs(line):
            images.append(line)
        elif line.startswith("./"):
            images.append(str(listing.parent / line[2:]))
        else:
            near = listing.parent / line
            images.append(str(near if near.exists() else base / line))
    if not all(map(os.path.isfile, images)):  # a folder's images exist: only listed ones are checked
        check_files([Path(p) for p in images], str(listing))
    return images


def label_path(image: str) -> str:
    """Ultralytics' rule: the last ``/images/`` of the path becomes ``/labels/``, the suffix ``.txt``."""
    text = str(image)
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if a in text:
        head, tail = text.rsplit(a, 1)
        text = head + b + tail
    return os.path.splitext(text)[0] + ".txt"


def _parse_label_file(path: Path, num_classes: int, problems: list[str]) -> tuple[list[int], np.ndarray]:
    """(class ids, (K, 4) normalised x0, y0, x1, y1 boxes) of one label file; malformed lines are
    appended to ``problems`` as ``file:line: why``."""
    classes, boxes = [], []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        at = f"{path}:{line_no}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            problems.append(f"{at}: {len(fields)} columns; a box line is 'class x_centre y_centre width height', "
                            "a polygon line 'class x1 y1 x2 y2 x3 y3 ...'")
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f"{at}: {line.strip()[:60]!r} is not numbers")
            continue
        cls, coords = values[0], values[1:]
        if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls < num_classes:
            problems.append(f"{at}: class id {fields[0]!r} is not one of 0..{num_classes - 1} (data.yaml names)")
            continue
        # plain floats, not numpy, per line: 10^5 label files are read in seconds
        if not all(-TOLERANCE <= v <= 1 + TOLERANCE for v in coords):  # also false for nan
            problems.append(f"{at}: coordinates outside [0, 1]; YOLO labels are fractions of the image size")
            continue
        if len(fields) == 5:
            xc, yc, w, h = coords
            boxes.append((xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2))
        else:
            xs, ys = coords[0::2], coords[1::2]
            boxes.append((min(xs), min(ys), max(xs), max(ys)))
        classes.append(int(cls))
    return classes, np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image as decoded (EXIF orientation applied), from its header."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # a quarter turn: the decoded image is transposed
            width, height = height, width
    return width, height


class NormalizedBoxes:
    """Per image, (K, 4) boxes as fractions of the image; read as pixels (x0, y0, x1, y1 of the
    decoded image, what ``data.box_crops`` takes) from the image's header when an image is asked
    for, so reading a data set never opens its images."""

    def __init__(self, paths: Sequence[str], boxes: list[np.ndarray]):
        self.paths, self.boxes = paths, boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> np.ndarray:
        width, height = image_size(self.paths[index])
        return self.boxes[index] * np.array([width, height, width, height], np.float32)

    def subset(self, index) -> "NormalizedBoxes":
        return NormalizedBoxes([self.paths[i] for i in index], [self.boxes[i] for i in index])


def _read_bytes(files: Sequence[str]) -> list[bytes | None]:
    """Each label file's bytes; None where there is none (an image without objects)."""
    out: list[bytes | None] = []
    for name in files:
        try:
            with open(name, "rb") as handle:
                out.append(handle.read())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            out.append(None)
    return out


def _parse_block(contents: list[bytes | None], num_classes: int):
    """(file of each line, class ids, (K, 4) normalised boxes) of a block of clean label files,
    their numbers parsed at once by NumPy; None when any line is unusual (the line-by-line parser
    then reads the block and names each bad line)."""
    owner, counts, tokens = [], [], []
    for k, data in enumerate(contents):
        for line in (data or b"").splitlines():
            fields = line.split()
            if fields:
                owner.append(k)
                counts.append(len(fields))
                tokens += fields
    counts = np.asarray(counts, np.int64)
    if ((counts != 5) & ((counts < 7) | (counts % 2 == 0))).any():
        return None
    try:
        values = np.asarray(tokens, dtype=np.bytes_).astype(np.float64) if tokens else np.zeros(0)
    except ValueError:
        return None
    starts = np.cumsum(counts) - counts
    cls = values[starts]
    coords = np.delete(values, starts)
    if not (np.isin(cls, np.arange(num_classes)).all() and ((coords >= -TOLERANCE) & (coords <= 1 + TOLERANCE)).all()):
        return None
    boxes = np.empty((len(counts), 4))
    five = counts == 5
    xc, yc, w, h = (values[starts[five] + j] for j in range(1, 5))
    boxes[five] = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)
    boxes[~five] = _polygon_boxes(values, starts[~five] + 1, (counts[~five] - 1) // 2)
    return np.asarray(owner, np.int64), cls.astype(np.int64), np.clip(boxes.astype(np.float32), 0.0, 1.0)


def _polygon_boxes(values: np.ndarray, first: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(P, 4) bounding boxes of polygons whose ``points[p]`` x, y pairs start at ``values[first[p]]``."""
    if not len(first):
        return np.zeros((0, 4))
    at = np.repeat(first - 2 * (np.cumsum(points) - points), points) + 2 * np.arange(points.sum())
    xs, ys = values[at], values[at + 1]
    cut = np.cumsum(points) - points
    return np.stack([np.minimum.reduceat(xs, cut), np.minimum.reduceat(ys, cut),
                     np.maximum.reduceat(xs, cut), np.maximum.reduceat(ys, cut)], axis=1)


def _parse_slowly(files: Sequence[str], contents: list, num_classes: int, problems: list[str]):
    """:func:`_parse_block`'s result line by line, the malformed lines appended to ``problems``."""
    owner, classes, boxes = [], [], []
    for k, (name, data) in enumerate(zip(files, contents)):
        if data is not None:
            found_classes, found = _parse_label_file(Path(name), num_classes, problems)
            owner += [k] * len(found_classes)
            classes += found_classes
            boxes.append(found)
    return (np.asarray(owner, np.int64), np.asarray(classes, np.int64),
            np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))


def _parse_labels(files: list[str], num_classes: int, where: str):
    """(image of each box, its class id, (K, 4) normalised boxes, label files missing) of a split,
    a block of files at a time; every malformed line listed at once."""
    parts, problems, missing = [], [], []
    for start in range(0, len(files), BLOCK):
        block = files[start:start + BLOCK]
        contents = _read_bytes(block)
        missing += [f for f, data in zip(block, contents) if data is None]
        owner, classes, boxes = _parse_block(contents, num_classes) or _parse_slowly(block, contents, num_classes, problems)
        parts.append((owner + start, classes, boxes))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise DataError(f"{len(problems)} malformed label lines in {where}:\n  " + "\n  ".join(problems[:MAX_SHOWN]) + more)
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32), missing
    return (*(np.concatenate([p[k] for p in parts]) for k in range(3)), missing)


def _box_targets(owner: np.ndarray, column: np.ndarray, num_images: int, num_labels: int):
    """Targets with a 1 at every (image, label) pair, 0 elsewhere (dense up to SPARSE_FROM cells)."""
    if num_images * num_labels > SPARSE_FROM:
        return SparseLabels.from_pairs(owner, column, num_images, num_labels)
    targets = np.zeros((num_images, num_labels), np.float32)
    targets[owner, column] = 1.0
    return targets


def read_yolo_table(yaml_path: Path, split: str, *, labels: Sequence[str] | None = None,
                    tree: dict | None = None) -> LabelTable:
    """Split ``split`` of the YOLO data set described by ``yaml_path``.

    Args:
        labels: the label order (the training split's, or ``data.labels`` to train on a subset);
            ``None``: every class of ``names`` in id order. Boxes of other classes are left out.
    """
    tree = tree or read_yolo_yaml(yaml_path)
    names = tree["names"]
    order = list(labels) if labels is not None else list(names)
    absent = [n for n in order if n not in names]
    if absent:
        raise DataError(f"{yaml_path}: labels {absent} are not among its names {names}; data.labels must "
                        "name classes of the yaml")
    remap = np.full(len(names), -1, np.int64)
    remap[[names.index(n) for n in order]] = np.arange(len(order))
    paths = yolo_split(tree, split, yaml_path)
    owner, classes, boxes, missing = _parse_labels([label_path(p) for p in paths], len(names),
                                                   f"split {split!r} of {yaml_path}")
    if missing:
        print(f"warning: {yaml_path} split {split!r}: {len(missing)} of {len(paths)} images have no label file "
              f"(e.g. {missing[0]}); they count as background, no object (all labels negative), as in "
              "Ultralytics", file=sys.stderr)
    column = remap[classes]
    keep = column >= 0  # boxes of classes outside data.labels are left out
    owner, column, boxes = owner[keep], column[keep], boxes[keep]
    cut = np.searchsorted(owner, np.arange(len(paths) + 1))
    per_image = [boxes[cut[i]:cut[i + 1]] for i in range(len(paths))]
    return LabelTable(paths, _box_targets(owner, column, len(paths), len(order)), order,
                      f"{yaml_path} ({split})", boxes=NormalizedBoxes(paths, per_image))
