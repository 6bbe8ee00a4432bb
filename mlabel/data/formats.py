"""Readers for JSON lines, Pascal VOC and COCO: each becomes a :class:`LabelTable`.

Every reader builds, per image, the set of positive and the set of unknown label names and hands
them to :func:`multi_hot`, which fixes the label order (the training split's, or sorted names
for the training split itself) and rejects names the training split does not have.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..io import read_text
from .tables import LabelTable, check_files, resolve_image, targets_from_lists

__all__ = ["read_jsonl_table", "read_voc_table", "read_coco_table", "multi_hot"]


def multi_hot(rows: list[tuple[set, set]], labels: Sequence[str] | None, source: str,
               where: list[str], all_names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """rows of (positive names, unknown names) -> (label order, (N, L) targets 1 / 0 / -1)."""
    if labels is None:
        names = list(all_names) if all_names is not None else sorted(set().union(*(p | u for p, u in rows)) if rows else set())
        if not names:
            raise DataError(f"{source}: no label appears in any image; a training split needs labels")
    else:
        names = list(labels)
    position = {name: j for j, name in enumerate(names)}
    for i, (positive, unknown) in enumerate(rows):
        for name in positive | unknown:
            if name not in position:
                raise DataError(f"{where[i]}: label {name!r} is not in the training labels {names}; every "
                                "split must use the training split's labels (or list them in data.labels)")
    return names, targets_from_lists([[position[n] for n in p] for p, _ in rows],
                                     [[position[n] for n in u - p] for p, u in rows], len(names))


def read_jsonl_table(path: Path, root: Path, *, labels: Sequence[str] | None = None) -> LabelTable:
    """One JSON object per line: ``{"image": "a.jpg", "labels": ["cat"], "unknown": ["dog"]}``
    (``unknown`` optional; blank lines skipped). Image paths are relative to ``root``."""
    if not path.is_file():
        raise DataError(f"JSON lines file {path} not found (relative paths are taken from data.root)")
    images, rows, where = [], [], []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{at}: not valid JSON ({err.msg} at column {err.colno}); each line must be "
                            'one object like {"image": "a.jpg", "labels": ["cat"]}') from None
        except RecursionError:
            raise DataError(f"{at}: the JSON nests too deeply; each line must be one flat object like "
                            '{"image": "a.jpg", "labels": ["cat"]}') from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
            raise DataError(f'{at}: expected an object with a non-empty string "image", got {line.strip()[:80]!r}')
        sets = []
        for key in ("labels", "unknown"):
            value = record.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise DataError(f'{at}: "{key}" must be a list of label names (strings), got {value!r}')
            sets.append(set(value))
        images.append(resolve_image(root, record["image"]))
        rows.append((sets[0], sets[1]))
        where.append(at)
    if not images:
        raise DataError(f"{path} holds no records; give one JSON object per line")
    names, targets = multi_hot(rows, labels, str(path), where)
    check_files(images, str(path))
    return LabelTable([str(p) for p in images], targets, names, str(path))


def read_voc_table(root: Path, split: str, *, labels: Sequence[str] | None = None) -> LabelTable:
    """Pascal VOC: ``root/ImageSets/Main/<split>.txt`` lists image ids, ``root/Annotations/<id>.xml``
    their objects, ``root/JPEGImages`` the images. A label whose every object in an image is
    ``difficult`` is unknown (-1) there, not negative."""
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"VOC split file {listing} not found: data.root must be the VOC folder (holding "
                        "Annotations/, ImageSets/Main/, JPEGImages/) and data.train/val/test split names")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{listing} lists no image ids")
    images, rows, where, boxes = [], [], [], []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"{listing}: annotation {xml_path} for image id {image_id!r} not found")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            raise DataError(f"{xml_path}: malformed XML ({err}); fix or regenerate the annotation") from None
        positive, difficult, kept = set(), set(), []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DataError(f"{xml_path}: an <object> has no <name>")
            flag = (obj.findtext("difficult") or "0").strip()
            (difficult if flag == "1" else positive).add(name)
            if flag != "1":
                kept.append(_voc_box(obj, xml_path))
        boxes.append(np.array(kept, np.float32).reshape(-1, 4))
        filename = (tree.findtext("filename") or f"{image_id}.jpg").strip()
        images.append(root / "JPEGImages" / filename)
        rows.append((positive, difficult - positive))
        where.append(str(xml_path))
    names, targets = multi_hot(rows, labels, str(listing), where)
    check_files(images, str(listing))
    return LabelTable([str(p) for p in images], targets, names, str(listing), boxes=boxes)


def _voc_box(obj, xml_path: Path) -> list[float]:
    """An object's ``<bndbox>`` as x0, y0, x1, y1 pixels (VOC's 1-based corners, inclusive);
    without one, an infinite box: a crop of that image must keep all of it."""
    box = obj.find("bndbox")
    if box is None:
        return [-np.inf, -np.inf, np.inf, np.inf]
    try:
        x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: a <bndbox> lacks a numeric xmin, ymin, xmax or ymax") from None
    if not np.isfinite([x0, y0, x1, y1]).all():
        raise DataError(f"{xml_path}: <bndbox> {x0:g},{y0:g},{x1:g},{y1:g} is not finite; give pixel coordinates")
    if not (x0 <= x1 and y0 <= y1):
        raise DataError(f"{xml_path}: <bndbox> {x0:g},{y0:g},{x1:g},{y1:g} has a corner before the other; "
                        "xmin <= xmax and ymin <= ymax")
    return [x0 - 1, y0 - 1, x1, y1]


def _unique_ids(path: Path, what: str, pairs: list[tuple[int, str]]) -> dict[int, str]:
    """``{id: name}``, refusing an id given twice (the second would silently replace the first)."""
    found: dict[int, str] = {}
    for key, name in pairs:
        if key in found:
            raise DataError(f"{path}: {what} id {key} appears twice ({found[key]!r} and {name!r}); "
                            f"give each {what} its own id")
        found[key] = name
    return found


def read_coco_table(path: Path, root: Path, *, labels: Sequence[str] | None = None) -> LabelTable:
    """COCO ``instances_*.json``: label names from ``categories`` (in category-id order), a label
    is positive when the image has an annotation of it; images without annotations are kept as
    all-negative. Images are ``root/file_name``, or ``root/<split>/file_name`` for
    ``instances_<split>.json`` (the standard layout with data.root = the COCO folder)."""
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} not found (relative paths are taken from data.root)")
    try:
        data = json.loads(read_text(path))
    except RecursionError:
        raise DataError(f"{path}: the JSON nests too deeply to be a COCO annotation file") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(f'{path}: expected a COCO object with "images" and "categories" lists')
    try:
        category_pairs = [(int(c["id"]), str(c["name"])) for c in data["categories"]]
        image_pairs = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in data.get("annotations") or []]
        bboxes = [_coco_box(a.get("bbox")) for a in data.get("annotations") or []]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: a category, image or annotation lacks a valid field ({err!r}); "
                        "categories need id and name, images id and file_name, annotations image_id "
                        "and category_id") from None
    categories = _unique_ids(path, "category", category_pairs)
    files = _unique_ids(path, "image", image_pairs)
    if not files:
        raise DataError(f"{path} lists no images")
    positives: dict[int, set] = {image_id: set() for image_id in files}
    kept: dict[int, list] = {image_id: [] for image_id in files}
    for (image_id, category), bbox in zip(annotations, bboxes):
        if image_id not in files:
            raise DataError(f"{path}: an annotation refers to image id {image_id}, which is not in images")
        if category not in categories:
            raise DataError(f"{path}: an annotation refers to category id {category}, which is not in categories")
        positives[image_id].add(categories[category])
        kept[image_id].append(bbox)
    order = sorted(files)
    rows = [(positives[i], set()) for i in order]
    where = [f"{path} (image id {i})" for i in order]
    names = [categories[c] for c in sorted(categories)]
    names, targets = multi_hot(rows, labels, str(path), where, all_names=names)
    split_dir = root / path.stem.removeprefix("instances_")
    images = []
    for i in order:
        direct = root / files[i]
        images.append(direct if direct.exists() or not (split_dir / files[i]).exists() else split_dir / files[i])
    check_files(images, str(path))
    boxes = [np.array(kept[i], np.float32).reshape(-1, 4) for i in order]
    return LabelTable([str(p) for p in images], targets, names, str(path), boxes=boxes)


def _coco_box(bbox) -> list[float]:
    """COCO's ``[x, y, width, height]`` as x0, y0, x1, y1; absent (or malformed, which COCO
    readers tolerate for classification), an infinite box: a crop must keep the whole image."""
    whole = [-np.inf, -np.inf, np.inf, np.inf]
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return whole
    return [x, y, x + max(w, 0.0), y + max(h, 0.0)] if np.isfinite([x, y, w, h]).all() else whole
