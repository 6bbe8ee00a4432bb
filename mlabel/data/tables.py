"""Readers that turn a dataset format into image paths and a multi-hot target table.

Targets are float32 ``(N, L)``: 1 positive, 0 negative, -1 unknown. Every reader fails with a
:class:`DataError` naming the file (and line) and saying how to fix it.
"""
from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..io import read_text
from ..labelnames import check_label_names
from ..outputs import Targets
from ..preprocess import IMAGE_EXTENSIONS, read_rgb
from .sparse import SparseLabels

if TYPE_CHECKING:
    from .members import ShardMembers

__all__ = ["CsvColumns", "DataError", "LabelTable", "read_csv_table", "read_folder_table", "IMAGE_EXTENSIONS"]

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}
_UNKNOWN = {"", "-1", "-1.0"}


@dataclass
class LabelTable:
    """Images and their targets for one split."""

    paths: list[str]
    # (N, L) float32: 1 / 0 / -1 unknown; or a SparseLabels (index lists, dense rows per batch:
    # wds shards), read through target_rows / label_counts / ``subset``
    targets: "np.ndarray | SparseLabels"
    labels: list[str]
    source: str
    regression: np.ndarray | None = None  # (N, R) float32 auxiliary targets, NaN = missing
    regression_names: list[str] = field(default_factory=list)
    # per image, the (K, 4) float32 boxes x0, y0, x1, y1 (pixels of the original image) of its
    # labelled objects, for crops that keep them all (data.box_crops); None: the format has none
    boxes: list[np.ndarray] | None = None
    # per image, (shard, offset, size) of its bytes inside a WebDataset tar (data.format wds: a
    # mlabel.data.members.ShardMembers); None: ``paths`` are image files
    members: "ShardMembers | None" = None

    def __post_init__(self):
        # the rules mlabel.load applies to a saved model: no run may train a model load refuses
        self.labels = check_label_names(self.labels, self.source)

    def __len__(self) -> int:
        return len(self.paths)

    def model_targets(self, index) -> Targets:
        """What the model is trained against for row(s) ``index``, by name: the label targets and
        the regression targets (None without regression columns), as tensors."""
        regression = None if self.regression is None else torch.from_numpy(self.regression[index])
        return Targets(torch.from_numpy(self.target_rows(index)), regression)

    @property
    def sparse(self) -> bool:
        return isinstance(self.targets, SparseLabels)

    def target_rows(self, index) -> np.ndarray:
        """Dense float32 target rows ``index`` (an int: one row)."""
        return self.targets.rows(index) if self.sparse else self.targets[index]

    def dense_targets(self) -> np.ndarray:
        """The whole (N, L) table: for what needs it at small sizes (dense splits, summaries)."""
        return self.targets.dense(np.arange(len(self))) if self.sparse else self.targets

    def label_stats(self) -> dict[str, np.ndarray]:
        """Per label: ``positive``, ``negative`` and ``unknown`` image counts."""
        if self.sparse:
            return self.targets.counts()
        t = self.targets
        return {"positive": (t == 1).sum(0), "negative": (t == 0).sum(0), "unknown": (t < 0).sum(0)}

    def subset(self, index: Sequence[int], source: str) -> "LabelTable":
        index = np.asarray(index, dtype=np.int64)
        regression = None if self.regression is None else self.regression[index]
        boxes = None if self.boxes is None else (  # lazy boxes (yolo: fractions) subset themselves
            self.boxes.subset(index) if hasattr(self.boxes, "subset") else [self.boxes[i] for i in index])
        members = None if self.members is None else self.members.subset(index)
        targets = self.targets.subset(index) if self.sparse else self.targets[index]
        paths = self.paths.subset(index) if hasattr(self.paths, "subset") else [self.paths[i] for i in index]
        return LabelTable(paths, targets, self.labels, source,
                          regression, self.regression_names, boxes, members)

    def read_bytes(self, index: int) -> bytes:
        """The encoded bytes of image ``index``, from its file or its shard."""
        if self.members is not None:
            from .members import member_bytes
            return member_bytes(self.members[index], self.paths[index])
        with open(self.paths[index], "rb") as handle:
            return handle.read()

    def read_image(self, index: int, draft: int | None = None) -> np.ndarray:
        """Image ``index`` decoded to (H, W, 3) uint8 RGB, from its file or its shard."""
        if self.members is not None:
            from .members import read_member
            return read_member(self.members[index], self.paths[index], draft)
        return read_rgb(self.paths[index], draft=draft)


SPARSE_FROM = 5 * 10**7  # images x labels past which list-based readers keep targets as index lists


def targets_from_lists(positives: list, unknowns: list | None, num_labels: int):
    """Targets of per-image lists of positive (and unknown) label indices: the dense (N, L)
    table up to :data:`SPARSE_FROM` cells (the same as always), past it a :class:`SparseLabels`
    whose memory grows with the listed labels (web-scale tag sets read from csv name columns,
    jsonl, voc or coco)."""
    if len(positives) * num_labels > SPARSE_FROM:
        return SparseLabels.from_lists(positives, num_labels, unknowns)
    targets = np.zeros((len(positives), num_labels), dtype=np.float32)
    for i, listed in enumerate(unknowns or ()):
        targets[i, listed] = -1.0
    for i, listed in enumerate(positives):
        targets[i, listed] = 1.0
    return targets


def resolve_image(root: Path, name: str) -> Path:
    """``root/name``; a name without extension is matched against the usual image extensions."""
    path = root / name
    if path.suffix.lower() in IMAGE_EXTENSIONS or path.exists():
        return path
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        candidate = path.with_name(path.name + ext)
        if candidate.exists():
            return candidate
    return path


def check_files(paths: list[Path], source: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{source}: {len(missing)} of {len(paths)} images not found:\n  {shown}{more}\n"
                        "Check data.root (image paths are relative to it) and the file names.")


def _parse_flag(value: str, path: Path, line: int, column: str) -> float:
    text = value.strip().lower()
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    if text in _UNKNOWN:
        return -1.0
    shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value):,} characters)"
    raise DataError(f"{path}:{line}: column {column!r} has {shown!r}; label columns hold 1, 0, "
                    "or empty / -1 for unknown. If this column is not a label, set data.label_columns.")


csv.field_size_limit(1 << 24)  # 16 MB per field; the default 128 KB fails on long label lists


@dataclass(frozen=True)
class CsvColumns:
    """Which columns of a CSV hold what: the image paths (``image``; None: the first column),
    0/1 label columns (``labels``; None: every other column) or one column of joined label names
    (``joined``, split at ``delimiter``), and numeric columns read as auxiliary regression
    targets (``regression``; an empty cell is missing)."""
    image: str | None = None
    labels: Sequence[str] | None = None
    joined: str | None = None
    delimiter: str = " "
    regression: Sequence[str] | None = None


def read_csv_table(path: Path, root: Path, *, labels: Sequence[str] | None = None,
                   columns: CsvColumns = CsvColumns()) -> LabelTable:
    """Read a CSV of image names with 0/1 label columns, or with one column of joined names.

    Args:
        labels: the label order fixed by the training split; ``None`` for the training split.
        columns: where the image paths, labels and regression targets are.
    """
    image_column, label_columns, labels_column = columns.image, columns.labels, columns.joined
    label_delimiter, regression_columns = columns.delimiter, columns.regression
    if not path.is_file():
        raise DataError(f"CSV file {path} not found (relative paths are taken from data.root)")
    try:
        rows = list(csv.reader(read_text(path).splitlines(keepends=True)))
    except csv.Error as err:  # e.g. a field beyond the field size limit: a broken quote swallowed the file
        raise DataError(f"{path}: not a readable CSV ({err}); check its quoting") from None
    if not rows:
        raise DataError(f"{path} is empty; it needs a header row and one row per image")
    header = [h.strip() for h in rows[0]]
    image_column = image_column or header[0]
    if image_column not in header:
        raise DataError(f"{path}: image column {image_column!r} not in header {header}")
    img_idx = header.index(image_column)
    if labels_column:
        if labels_column not in header:
            raise DataError(f"{path}: labels column {labels_column!r} not in header {header}")
        names, targets = _names_column(rows, path, header.index(labels_column), label_delimiter, labels)
    else:
        columns = _label_columns(path, header, image_column, label_columns, regression_columns)
        names, targets = _flag_columns(rows, path, [header.index(c) for c in columns], columns, labels)
    images = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}; "
                            "quote fields that contain the delimiter")
        images.append(resolve_image(root, row[img_idx].strip()))
    if not images:
        raise DataError(f"{path} has a header but no rows")
    check_files(images, str(path))
    regression = _numeric_columns(rows, path, header, list(regression_columns)) if regression_columns else None
    return LabelTable([str(p) for p in images], targets, names, str(path), regression,
                      list(regression_columns or ()))


def _label_columns(path: Path, header: list[str], image_column: str, label_columns, regression_columns) -> list[str]:
    """The 0/1 label columns: those named, or every header cell but the image and regression
    columns (each then a name a model load accepts, its column named otherwise)."""
    regression_set = set(regression_columns or ())
    columns = list(label_columns) if label_columns else [
        h for h in header if h != image_column and h not in regression_set]
    if columns and not label_columns:
        check_label_names(columns, path, [f"header column {j + 1}" for j, h in enumerate(header)
                                          if h != image_column and h not in regression_set])
    absent = [c for c in columns if c not in header]
    if absent:
        raise DataError(f"{path}: label columns {absent} not in header {header}")
    if not columns:
        raise DataError(f"{path}: no label columns; set data.label_columns or data.labels_column")
    return columns


def _numeric_columns(rows, path, header, columns) -> np.ndarray:
    absent = [c for c in columns if c not in header]
    if absent:
        raise DataError(f"{path}: regression columns {absent} not in header {header}")
    out = np.full((len(rows) - 1, len(columns)), np.nan, dtype=np.float32)
    for line, row in enumerate(rows[1:], start=2):
        for j, column in enumerate(columns):
            text = row[header.index(column)].strip()
            if text:
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not math.isfinite(value):  # not a number, or nan / inf written out
                    raise DataError(f"{path}:{line}: regression column {column!r} has {text[:40]!r}; "
                                    "give a finite number, or leave it empty when unknown")
                out[line - 2, j] = value
    return out


def _flag_columns(rows, path, indices, columns, labels):
    body = [(line, row) for line, row in enumerate(rows[1:], start=2)]
    values = np.array([[_parse_flag(row[i], path, line, columns[j]) if i < len(row) else -1.0
                        for j, i in enumerate(indices)] for line, row in body], dtype=np.float32)
    values = values.reshape(len(body), len(columns))
    if labels is None:
        return list(columns), values
    unknown = [c for c in columns if c not in labels]
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not in the training labels {list(labels)}; "
                        "every split must use the training split's labels")
    order = [columns.index(name) if name in columns else -1 for name in labels]
    out = np.full((len(body), len(labels)), -1.0, dtype=np.float32)
    for j, src in enumerate(order):
        if src >= 0:
            out[:, j] = values[:, src]
    return list(labels), out


def _names_column(rows, path, index, delimiter, labels):
    per_row = []
    for line, row in enumerate(rows[1:], start=2):
        field = row[index] if index < len(row) else ""
        per_row.append((line, [t.strip() for t in field.split(delimiter or None) if t.strip()]))
    names = list(labels) if labels is not None else sorted({t for _, tags in per_row for t in tags})
    if not names:
        raise DataError(f"{path}: the labels column is empty in every row")
    position = {name: j for j, name in enumerate(names)}
    for line, tags in per_row:
        for tag in tags:
            if tag not in position:
                raise DataError(f"{path}:{line}: label {tag!r} is not in the training labels {names}")
    return names, targets_from_lists([[position[t] for t in tags] for _, tags in per_row], None, len(names))


def read_folder_table(folder: Path, *, labels: Sequence[str] | None = None,
                      task: str = "auto") -> LabelTable:
    """One sub-folder per class. Two classes and a binary task give one label (the second
    class in sorted order, or the one named in ``labels``); otherwise one label per class."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found (relative paths are taken from data.root)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>")
    files = {name: sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
             for name in found}
    classes = [name for name in found if files[name]]  # an empty folder is no class (nor a third label)
    if not classes:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    if len(classes) < len(found):
        print(f"warning: {folder}: class folders {sorted(set(found) - set(classes))} hold no images and are "
              "left out", file=sys.stderr)
    paths = [str(p) for name in classes for p in files[name]]
    owner = [name for name in classes for _ in files[name]]
    if labels is None:
        if task == "binary" and len(classes) != 2:
            raise DataError(f"{folder}: task binary needs exactly two class folders, found {classes}")
        binary = len(classes) == 2 and task in ("auto", "binary")
        labels = [classes[1]] if binary else classes
    if len(labels) == 1:
        stray = sorted(set(classes) - set(labels))
        if len(stray) > 1 or labels[0] not in classes:
            raise DataError(f"{folder}: binary label {labels[0]!r} with class folders {classes}; "
                            "a binary folder dataset has the positive and one negative folder")
        targets = np.array([[1.0 if o == labels[0] else 0.0] for o in owner], dtype=np.float32)
    else:
        unknown = sorted(set(classes) - set(labels))
        if unknown:
            raise DataError(f"{folder}: class folders {unknown} are not in the training labels {list(labels)}")
        targets = np.array([[1.0 if o == name else 0.0 for name in labels] for o in owner], dtype=np.float32)
    return LabelTable(paths, targets, list(labels), str(folder))
