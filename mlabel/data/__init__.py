"""Dataset adapters: every format becomes :class:`LabelTable` splits with the same label order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import read_coco_table, read_jsonl_table, read_voc_table
from .dataset import ImageDataset, build_transform, make_loader, read_rgb
from .split import iterative_split
from .synthetic import ensure_scenes
from .tables import DataError, LabelTable, read_csv_table, read_folder_table

__all__ = ["DataError", "LabelTable", "Splits", "ImageDataset", "build_splits", "build_transform",
           "make_loader", "read_rgb", "iterative_split", "label_counts"]


@dataclass
class Splits:
    labels: list[str]
    task: str
    train: LabelTable
    val: LabelTable
    test: LabelTable | None


def _read(data, name: str, labels, task: str) -> LabelTable:
    root = Path(data.root)
    path = Path(name) if Path(name).is_absolute() else root / name
    if data.format == "folder":
        return read_folder_table(path, labels=labels, task=task)
    if data.format == "jsonl":
        return read_jsonl_table(path, root, labels=labels)
    if data.format == "voc":
        return read_voc_table(root, name, labels=labels)
    if data.format == "coco":
        return read_coco_table(path, root, labels=labels)
    return read_csv_table(path, root, labels=labels, image_column=data.image_column,
                          label_columns=data.label_columns, labels_column=data.labels_column,
                          label_delimiter=data.label_delimiter, regression_columns=data.regression_columns)


def label_counts(table: LabelTable) -> dict:
    """Per-label positives / negatives / unknowns, for printing and saving with the run."""
    t = table.targets
    return {"images": len(table), **{
        name: {"positive": int((t[:, j] == 1).sum()), "negative": int((t[:, j] == 0).sum()),
               "unknown": int((t[:, j] < 0).sum())} for j, name in enumerate(table.labels)}}


def build_splits(data, task: str = "auto", seed: int = 0) -> Splits:
    """Read train/val/test from the ``data`` config; carve val (and test when
    ``data.test_fraction`` > 0 and no test file is given) from train with a seeded
    iterative-stratified split."""
    if data.generate == "scenes":
        ensure_scenes(data.root)
    train = _read(data, data.train, data.labels, task)
    labels = train.labels
    val = _read(data, data.val, labels, task) if data.val else None
    test = _read(data, data.test, labels, task) if data.test else None
    fractions = [data.val_fraction if val is None else 0.0,
                 data.test_fraction if test is None else 0.0]
    if sum(fractions) > 0:
        fold = iterative_split(train.targets, [1 - sum(fractions), *fractions], seed=seed)
        if val is None:
            val = train.subset(np.flatnonzero(fold == 1), f"{train.source} (val split)")
        if test is None and fractions[1] > 0:
            test = train.subset(np.flatnonzero(fold == 2), f"{train.source} (test split)")
        train = train.subset(np.flatnonzero(fold == 0), f"{train.source} (train split)")
    if val is None or len(val) == 0:
        raise DataError("no validation images: give data.val or a data.val_fraction > 0")
    resolved = "binary" if len(labels) == 1 else "multilabel"
    if task == "binary" and len(labels) != 1:
        raise DataError(f"task binary needs one label, the data has {len(labels)}: {labels}; "
                        "set task=multilabel or pick the positive class with data.labels=[NAME]")
    return Splits(labels, resolved, train, val, test)
