"""Dataset adapters: every format becomes :class:`LabelTable` splits with the same label order."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import is_url, read_wds_table
from .formats import read_coco_table, read_jsonl_table, read_voc_table
from .hf import HfSource, read_hf_table, resolve_hf_splits
from .labelstudio import read_labelstudio_table
from .openimages import find_class_descriptions, read_openimages_table
from .yolo import read_yolo_table, read_yolo_yaml
from .dataset import ImageDataset, build_transform, make_loader, read_rgb
from .sparse import sparse_split
from .split import iterative_split
from .synthetic import ensure_scenes, scenes_root
from ..io import read_text
from .tables import CsvColumns, DataError, LabelTable, read_csv_table, read_folder_table

__all__ = ["DataError", "LabelTable", "Splits", "ImageDataset", "build_splits", "build_transform",
           "make_loader", "read_rgb", "iterative_split", "label_counts"]


@dataclass
class Splits:
    labels: list[str]
    task: str
    train: LabelTable
    val: LabelTable
    test: LabelTable | None
    skipped: list = dataclasses.field(default_factory=list)  # (split, where, reason) left out while reading


def _read(data, name: str, labels, task: str, skipped: list | None = None) -> LabelTable:
    if data.format == "wds":  # data.root: the shards' folder or URL
        root = data.root if is_url(data.root) else Path(data.root)
        return read_wds_table(root, name, labels=labels, skip_bad=data.on_bad_image == "skip", skipped=skipped)
    if data.format == "hf":  # data.root: the datasets folder; name: one of its splits
        return read_hf_table(HfSource.of(data), name, labels=labels)
    root = Path(data.root)
    if data.format == "yolo":  # data.root: the data.yaml; name: one of its splits
        return read_yolo_table(root, name, labels=labels)
    path = Path(name) if Path(name).is_absolute() else root / name
    if data.format == "labelstudio":
        return read_labelstudio_table(path, root, labels=labels, image_key=data.image_column)
    if data.format == "openimages":
        return _read_openimages(data, path, name, labels)
    if data.format == "folder":
        return read_folder_table(path, labels=labels, task=task)
    if data.format == "jsonl":
        return read_jsonl_table(path, root, labels=labels)
    if data.format == "voc":
        return read_voc_table(root, name, labels=labels)
    if data.format == "coco":
        return read_coco_table(path, root, labels=labels)
    columns = CsvColumns(image=data.image_column, labels=data.label_columns, joined=data.labels_column,
                         delimiter=data.label_delimiter, regression=data.regression_columns)
    return read_csv_table(path, root, labels=labels, columns=columns)


def _read_openimages(data, path: Path, name: str, labels) -> LabelTable:
    root = Path(data.root)
    given = data.class_descriptions
    class_file = (root / given if given else find_class_descriptions([path.parent, root]))
    split = next((s for s in ("train", "val", "test") if getattr(data, s) == name), "")
    return read_openimages_table(path, root, class_file=class_file, labels=labels, split=split,
                                 subset=data.labels is not None,
                                 box_files=[root / f for f in data.box_files or ()] if split == "train" else ())


def read_label_file(data):
    """``data`` with ``data.label_file``'s labels (one a line; blank lines skipped) as ``data.labels``."""
    if not data.label_file:
        return data
    root = Path(data.root)
    path = Path(data.label_file).expanduser()
    path = path if path.is_absolute() else (root if root.is_dir() else root.parent) / path
    if not path.is_file():
        raise DataError(f"data.label_file {path} not found (relative paths are taken from data.root's folder)")
    labels, seen = [], {}
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        name = line.strip()
        if name and name in seen:
            raise DataError(f"{path}:{line_no}: label {name!r} is also on line {seen[name]}; list each label once")
        if name:
            labels.append(name)
            seen[name] = line_no
    if not labels:
        raise DataError(f"data.label_file {path} lists no labels; give one label name a line")
    return dataclasses.replace(data, labels=labels, label_file=None)


def resolve_splits(data):
    """``data`` as the readers take it: the label file read, the yolo and hf split names filled in."""
    return resolve_hf_splits(resolve_yolo_splits(read_label_file(data)))


def resolve_yolo_splits(data):
    """``data`` with the yolo split names filled in: train (the default ``train.csv`` means the
    yaml's ``train``), and val / test from the yaml when it has them (else carved from train)."""
    if data.format != "yolo":
        return data
    tree = read_yolo_yaml(Path(data.root))
    has = lambda key: bool(tree.get(key)) or (key == "val" and bool(tree.get("valid")))  # noqa: E731
    return dataclasses.replace(data, train="train" if data.train == "train.csv" else data.train,
                               val=data.val or ("val" if has("val") else None),
                               test=data.test or ("test" if has("test") else None))


def read_split(data, which: str, task: str = "auto") -> LabelTable:
    """Split ``which`` (train, val or test) as the data hold it: nothing carved, the training
    split's label order (for ``mlabel.data convert``)."""
    data = resolve_splits(data)
    if data.generate == "scenes":
        data = dataclasses.replace(data, root=str(ensure_scenes(scenes_root(data.root, data.cache_dir))))
    name = getattr(data, which)
    if not name:
        raise DataError(f"data.{which} is not set: the data have no {which} split to convert")
    train = _read(data, data.train, data.labels, task)
    return train if which == "train" else _read(data, name, train.labels, task)


def label_counts(table: LabelTable) -> dict:
    """Per-label positives / negatives / unknowns, for printing and saving with the run."""
    stats = table.label_stats()
    return {"images": len(table), **{
        name: {"positive": int(stats["positive"][j]), "negative": int(stats["negative"][j]),
               "unknown": int(stats["unknown"][j])} for j, name in enumerate(table.labels)}}


def check_overlap(data, tables: dict) -> None:
    """The same annotation file given for two splits is refused (its val or test figures would
    measure memory, not generalisation) unless ``data.allow_overlap``; images listed twice within
    or across splits are counted in a warning."""
    files = {name: getattr(data, name) if data.format == "wds" else os.path.realpath(Path(data.root) / getattr(data, name))
             for name in ("train", "val", "test") if getattr(data, name) and data.format != "voc"}
    for a, b in (("val", "train"), ("test", "train"), ("test", "val")):
        if a in files and files.get(b) == files[a] and not data.allow_overlap:
            raise DataError(f"data.{a} and data.{b} are the same file ({getattr(data, a)}): the {a} figures "
                            f"would measure memorisation; give a separate file, or set data.{a}=null to carve "
                            f"{a} from train (data.allow_overlap=true accepts it as it is)")
    seen: dict[str, str] = {}
    repeats: dict[tuple[str, str], int] = {}
    for name, table in tables.items():
        if table is not None and table.members is not None:  # wds: a sample is a shard's key, its shard tells
            for shard in (table.members.shards[i] for i in np.unique(table.members.shard_of)):
                if shard in seen:
                    pair = (seen[shard], name)
                    repeats[pair] = repeats.get(pair, 0) + 1
                else:
                    seen[shard] = name
            continue
        for path in table.paths if table is not None else ():
            key = os.path.normpath(path)
            if key in seen:
                pair = (seen[key], name)
                repeats[pair] = repeats.get(pair, 0) + 1
            else:
                seen[key] = name
    for (first, second), count in repeats.items():
        where = f"listed twice in {first}" if first == second else f"in both {first} and {second}"
        what = "shards" if tables[second].members is not None else "images"
        print(f"warning: {count} {what} are {where}; metrics on {second} overstate what unseen images "
              "would give (remove the repeats)", file=sys.stderr)


def build_splits(data, task: str = "auto", seed: int = 0) -> Splits:
    """Read train/val/test from the ``data`` config; carve val (and test when
    ``data.test_fraction`` > 0 and no test file is given) from train with a seeded
    iterative-stratified split."""
    if data.generate == "scenes":
        data = dataclasses.replace(data, root=str(ensure_scenes(scenes_root(data.root, data.cache_dir))))
    data = resolve_splits(data)
    skipped: list = []
    train = _read(data, data.train, data.labels, task, skipped)
    labels = train.labels
    val = _read(data, data.val, labels, task, skipped) if data.val else None
    test = _read(data, data.test, labels, task, skipped) if data.test else None
    fractions = [data.val_fraction if val is None else 0.0,
                 data.test_fraction if test is None else 0.0]
    if sum(fractions) > 0:
        shares = [1 - sum(fractions), *fractions]
        fold = sparse_split(train.targets, shares, seed) if train.sparse else iterative_split(train.targets, shares, seed=seed)
        if val is None:
            val = train.subset(np.flatnonzero(fold == 1), f"{train.source} (val split)")
        if test is None and fractions[1] > 0:
            test = train.subset(np.flatnonzero(fold == 2), f"{train.source} (test split)")
        train = train.subset(np.flatnonzero(fold == 0), f"{train.source} (train split)")
    if val is None or len(val) == 0:
        raise DataError("no validation images: give data.val or a data.val_fraction > 0")
    check_overlap(data, {"train": train, "val": val, "test": test})
    resolved = "binary" if len(labels) == 1 else "multilabel"
    if task == "binary" and len(labels) != 1:
        raise DataError(f"task binary needs one label, the data has {len(labels)}: {labels}; "
                        "set task=multilabel or pick the positive class with data.labels=[NAME]")
    return Splits(labels, resolved, train, val, test, skipped)
