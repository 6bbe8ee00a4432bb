"""Open Images: human-verified image-level labels, read as partial labels.

An image-labels CSV (``ImageID,Source,LabelName,Confidence``) lists, per image, classes verified
present (Confidence 1) and verified absent (0); every class not listed for an image is unknown
there: Open Images verified only some classes per image, and an unverified class is neither
present nor absent. That is mlabel's partial-label model as it is, so nothing is guessed. The
class-descriptions CSV (``LabelName,DisplayName``) names the ``/m/...`` ids. Past
:data:`~mlabel.data.tables.SPARSE_FROM` cells the table stays as index lists whose default is
unknown, so 10^6 images x 2 x 10^4 classes take the memory of the listed cells only.
"""
from __future__ import annotations

import array
import csv
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError
from .sparse import SparseLabels, UNKNOWN, unique_sorted
from ..io import read_text
from .tables import SPARSE_FROM, LabelTable, check_files
from .yolo import NormalizedBoxes

__all__ = ["read_openimages_table", "read_class_descriptions", "find_class_descriptions"]

_CHUNK = 1 << 26  # bytes of CSV decoded at a time: memory stays with the parsed pairs, not the text
_CLASS_FILES = ("oidv7-class-descriptions.csv", "oidv6-class-descriptions.csv", "class-descriptions.csv",
                "class-descriptions-boxable.csv")


def find_class_descriptions(folders: Sequence[Path]) -> Path:
    """The class-descriptions CSV in ``folders`` (Open Images' names, then any ``*class-descriptions*.csv``)."""
    for folder in folders:
        for name in _CLASS_FILES:
            if (folder / name).is_file():
                return folder / name
        found = sorted(folder.glob("*class-descriptions*.csv")) if folder.is_dir() else []
        if found:
            return found[0]
    raise DataError(f"no Open Images class-descriptions CSV in {', '.join(map(str, folders))}; set "
                    "data.class_descriptions to the file that maps /m/... ids to names")


def read_class_descriptions(path: Path) -> dict[str, str]:
    """``{id: name}`` in file order; display names that repeat become ``name (id)``, so every
    label name is unique and the same in every split."""
    if not path.is_file():
        raise DataError(f"class-descriptions CSV {path} not found")
    pairs = []
    for line, row in enumerate(csv.reader(read_text(path).splitlines()), start=1):
        if not row or (line == 1 and [c.strip() for c in row] == ["LabelName", "DisplayName"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{line}: expected 'LabelName,DisplayName' (an id and a name), got {row!r:.80}")
        pairs.append((row[0].strip(), row[1].strip()))
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: id {twice!r} appears twice; give each class one line")
    counts: dict[str, int] = {}
    for _, name in pairs:
        counts[name] = counts.get(name, 0) + 1
    return {i: (name if counts[name] == 1 else f"{name} ({i})") for i, name in pairs}


def _line_blocks(handle) -> Iterator[bytes]:
    """``handle``'s bytes a chunk at a time, each cut after its last newline (the rest carried over)."""
    rest = b""
    while True:
        block = handle.read(_CHUNK)
        data = rest + block
        cut = data.rfind(b"\n") + 1 if block else len(data)
        data, rest = data[:cut], data[cut:]
        if not data:
            return
        yield data


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a UTF-8 CSV, decoded a chunk at a time (a BOM is dropped)."""
    line = 1
    with path.open("rb") as handle:
        for data in _line_blocks(handle):
            try:
                text = data.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as err:
                bad = line + data[:err.start].count(b"\n")
                raise DataError(f"{path}:{bad}: not UTF-8 text (byte {data[err.start]:#04x}); save it as UTF-8") from None
            lines = text.splitlines()
            for offset, row in enumerate(csv.reader(lines)):
                yield line + offset, row
            line += len(lines)


def _header(path: Path, row: list[str], needed: Sequence[str]) -> list[int]:
    header = [h.strip() for h in row]
    absent = [c for c in needed if c not in header]
    if absent:
        raise DataError(f"{path}:1: header {header} lacks {absent}; an Open Images CSV starts with "
                        + ",".join(needed))
    return [header.index(c) for c in needed]


def _field(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The bytes ``buf[start:end]`` of every row as one fixed-width ``S`` array: rows of a sliding
    window view gathered (a copy of ``width`` bytes a row, no index array of that size)."""
    length = end - start
    width = max(int(length.max(initial=0)), 1)
    padded = np.concatenate([buf, np.zeros(width, np.uint8)])
    cells = np.lib.stride_tricks.sliding_window_view(padded, width)[start]
    if (length != width).any():
        cells[np.arange(width) >= length[:, None]] = 0
    return cells.view(f"S{width}").ravel()


_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant: folds a field's 8-byte words into one key


def _codes(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(field, return_index=True, return_inverse=True)``'s first rows and inverse (the
    distinct values in another order), by 64-bit keys of the field's runs: rows of one image come
    together in Open Images' files, and integers sort far faster than strings. Exact: should two
    values share a key, the string ``np.unique`` answers instead."""
    n, width = len(field), field.dtype.itemsize
    words = np.zeros((n, -(-width // 8) * 8), np.uint8)
    words[:, :width] = field.view(np.uint8).reshape(n, width)
    words = words.view(np.uint64)
    key = words[:, 0].copy()
    for j in range(1, words.shape[1]):
        key = key * _MIX ^ words[:, j]
    heads = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    _, first, head_of = np.unique(key[heads], return_index=True, return_inverse=True)
    first, inverse = heads[first], np.repeat(head_of.reshape(-1), np.diff(np.append(heads, n)))
    if not (field[first][inverse] == field).all():
        _, first, inverse = np.unique(field, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _chunk_pairs(buf: np.ndarray, columns: tuple[int, int, int], width: int, lookup):
    """One block of whole lines, vectorised: (image of each row as an index into the block's
    distinct image ids, label, confidence, those ids in order of first appearance), or None when
    the block holds anything unusual (quotes, a short row, another confidence, an unknown label,
    non-ASCII bytes): the row-by-row reader then reads the file and names the line."""
    if (buf == ord('"')).any() or (buf >= 128).any():
        return None
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    ends = ends - (buf[np.maximum(ends - 1, 0)] == 13)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    commas = np.flatnonzero(buf == 44)
    if len(commas) != len(starts) * (width - 1):
        return None
    bounds = commas.reshape(-1, width - 1)
    if len(starts) and ((bounds[:, 0] < starts).any() or (bounds[:, -1] >= ends).any()):
        return None
    image, label, conf = (_field(buf, bounds[:, c - 1] + 1 if c else starts, bounds[:, c] if c < width - 1 else ends)
                          for c in columns)
    value = np.where((conf == b"1") | (conf == b"1.0"), 1, np.where((conf == b"0") | (conf == b"0.0"), 0, -1)).astype(np.int8)
    first, label_of = _codes(label)
    mapped = np.array([lookup(n.decode()) for n in label[first]], np.int64)
    if (value < 0).any() or (mapped == -2).any():
        return None
    label_col = mapped.astype(np.int32)[label_of]  # 4-byte ids and 1-byte values: 10^7 rows in 0.5 GB
    used = label_col >= 0  # rows of classes outside data.labels name no image
    image = image[used]
    first, image_of = _codes(image)
    order = np.argsort(first, kind="stable")  # ids in order of first appearance
    rank = np.empty(len(first), np.int32)
    rank[order] = np.arange(len(first))
    return rank[image_of], label_col[used], value[used], image[first[order]]


def _merge_ids(parts: list) -> tuple[dict, np.ndarray]:
    """The blocks' image ids as one ``{id: number}`` in order of first appearance, and each
    row's number (an image whose rows span blocks is one image)."""
    width = max(p[3].dtype.itemsize for p in parts)
    found = np.concatenate([p[3].astype(f"S{width}") for p in parts])
    first, inverse = _codes(found)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(first), np.int32 if len(first) < 2**31 else np.int64)
    rank[order] = np.arange(len(first))
    offsets = np.cumsum([0] + [len(p[3]) for p in parts])
    image = np.concatenate([rank[inverse[offsets[k]:offsets[k + 1]]][p[0]] for k, p in enumerate(parts)])
    names = found[first[order]].astype(str).tolist()
    return dict(zip(names, range(len(names)))), image


def _fast_pairs(path: Path, column: dict[str, int], known: dict[str, str], strict: bool):
    """:func:`_pairs` a block at a time with numpy (10^7 rows in seconds); None: use it."""
    def lookup(label: str) -> int:
        j = column.get(label)
        return j if j is not None else (-1 if label in known and not strict else -2)
    with path.open("rb") as handle:
        header = handle.readline()
        try:
            names = next(csv.reader([header.decode("utf-8-sig")]), [])
        except UnicodeDecodeError:
            return None
        names = [h.strip() for h in names]
        if not all(c in names for c in ("ImageID", "LabelName", "Confidence")):
            return None
        columns = tuple(names.index(c) for c in ("ImageID", "LabelName", "Confidence"))
        parts = []
        for data in _line_blocks(handle):
            if not data.endswith(b"\n"):
                data += b"\n"
            part = _chunk_pairs(np.frombuffer(data, np.uint8), columns, len(names), lookup)
            if part is None:
                return None
            parts.append(part)
    if not sum(len(p[3]) for p in parts):
        return None
    ids, image = _merge_ids(parts)
    label, value = (np.concatenate([p[k] for p in parts]) for k in (1, 2))
    return ids, (image[value == 1], label[value == 1]), (image[value == 0], label[value == 0])


def _pairs(path: Path, column: dict[str, int], known: dict[str, str], strict: bool):
    """Image ids in order of appearance and the (image, label) pairs of positives and negatives."""
    fast = _fast_pairs(path, column, known, strict)
    if fast is not None:
        return fast
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} is empty; it needs the header ImageID,Source,LabelName,Confidence")
    i_img, i_lab, i_conf = _header(path, first[1], ("ImageID", "LabelName", "Confidence"))
    width = max(i_img, i_lab, i_conf)
    ids: dict[str, int] = {}
    found = {"1": (array.array("q"), array.array("q")), "0": (array.array("q"), array.array("q"))}
    found["1.0"], found["0.0"] = found["1"], found["0"]
    for line, row in rows:
        if not row:
            continue
        if len(row) <= width:
            raise DataError(f"{path}:{line}: {len(row)} fields; each row needs ImageID, LabelName and Confidence")
        label, conf = row[i_lab], row[i_conf]
        j = column.get(label)
        if j is None:
            if label in known and not strict:
                continue  # a class outside data.labels
            raise DataError(f"{path}:{line}: label {label!r} is " + (
                "not in the training labels; every split must use the training split's labels (or list "
                "them in data.labels)" if label in known else "not in the class-descriptions CSV"))
        target = found.get(conf.strip())
        if target is None:
            raise DataError(f"{path}:{line}: Confidence {conf!r}; human-verified labels are 1 (present) or "
                            "0 (absent); machine-generated scores belong in another file")
        target[0].append(ids.setdefault(row[i_img].strip(), len(ids)))
        target[1].append(j)
    if not ids:
        raise DataError(f"{path} has a header but no rows for the labels in use")
    as_np = lambda a: np.frombuffer(a, np.int64) if len(a) else np.zeros(0, np.int64)  # noqa: E731
    return ids, [as_np(a) for a in found["1"]], [as_np(a) for a in found["0"]]


def _check_conflicts(path: Path, ids: dict, pos, neg, num_labels: int, names: list[str]) -> None:
    positive, negative = (unique_sorted(rows.astype(np.int64) * num_labels + labels) for rows, labels in (pos, neg))
    at = np.minimum(np.searchsorted(positive, negative), max(len(positive) - 1, 0))
    both = negative[positive[at] == negative] if len(positive) else negative[:0]
    if len(both):
        image = next(k for k, v in ids.items() if v == both[0] // num_labels)
        raise DataError(f"{path}: image {image} has label {names[int(both[0] % num_labels)]!r} both verified "
                        f"present (1) and absent (0) ({len(both)} such pairs); keep one row per image and label")


def _image_folder(root: Path, first: str, words: Sequence[str]) -> Path:
    """``root`` or ``root/<split>`` (Open Images' train / validation / test folders): where the
    split's first image is."""
    for folder in (root, *(root / w for w in words)):
        if (folder / f"{first}.jpg").is_file():
            return folder
    return root


def _targets(n: int, num_labels: int, pos, neg):
    """Dense 1 / 0 / -1 up to SPARSE_FROM cells, else index lists whose default is unknown."""
    if n * num_labels > SPARSE_FROM:
        return SparseLabels.from_pairs(pos[0], pos[1], n, num_labels, neg[0], neg[1], default=UNKNOWN)
    targets = np.full((n, num_labels), -1.0, np.float32)
    targets[neg[0], neg[1]] = 0.0
    targets[pos[0], pos[1]] = 1.0
    return targets


def _boxes(files: Sequence[Path], ids: dict, id_column: dict[str, int]) -> list[np.ndarray]:
    """Per image, the (K, 4) normalised boxes of the labels in use from Open Images box CSVs."""
    per_image: list[list] = [[] for _ in ids]
    for path in files:
        if not path.is_file():
            raise DataError(f"box CSV {path} not found (data.box_files are relative to data.root)")
        rows = _rows(path)
        first = next(rows, None)
        if first is None:
            continue
        cols = _header(path, first[1], ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"))
        for line, row in rows:
            if not row or row[cols[1]] not in id_column or row[cols[0]] not in ids:
                continue
            try:
                x0, x1, y0, y1 = (float(row[c]) for c in cols[2:])
            except (ValueError, IndexError):
                raise DataError(f"{path}:{line}: XMin, XMax, YMin, YMax must be numbers in [0, 1]") from None
            if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
                raise DataError(f"{path}:{line}: box {x0:g},{x1:g},{y0:g},{y1:g} is not XMin <= XMax and "
                                "YMin <= YMax within [0, 1]")
            per_image[ids[row[cols[0]]]].append((x0, y0, x1, y1))
    return [np.asarray(b, np.float32).reshape(-1, 4) for b in per_image]


def read_openimages_table(path: Path, root: Path, *, class_file: Path, labels: Sequence[str] | None = None,
                          subset: bool = False, box_files: Sequence[Path] = (), split: str = "") -> LabelTable:
    """One split's image-labels CSV as a partial-label table.

    Args:
        class_file: the class-descriptions CSV.
        labels: label names (or ``/m/`` ids) in order; ``None``: the classes this CSV lists, in the
            class file's order.
        subset: rows of known classes outside ``labels`` are dropped (``data.labels`` picks a
            subset); otherwise they are an error (a val label the training split lacks).
        box_files: Open Images box CSVs whose boxes of these images feed ``data.box_crops``.
        split: the split's name, for images kept in ``root/<split>/``.
    """
    if not path.is_file():
        raise DataError(f"Open Images labels CSV {path} not found (relative paths are taken from data.root)")
    known = read_class_descriptions(class_file)
    by_name = {name: i for i, name in known.items()}
    if labels is None:
        ids, pos, neg = _pairs(path, {i: j for j, i in enumerate(known)}, known, True)
        used = np.flatnonzero(np.bincount(pos[1], minlength=len(known)) + np.bincount(neg[1], minlength=len(known)))
        every = list(known)
        order = [every[j] for j in used]
        remap = np.full(len(known), -1, np.int64)
        remap[used] = np.arange(len(used))
        pos, neg = (pos[0], remap[pos[1]]), (neg[0], remap[neg[1]])
    else:
        order = []
        for item in labels:
            if item not in known and item not in by_name:
                raise DataError(f"{class_file}: label {item!r} is neither a class id nor a display name there")
            order.append(item if item in known else by_name[item])
        ids, pos, neg = _pairs(path, {i: j for j, i in enumerate(order)}, known, not subset)
    names = [known[i] for i in order]
    _check_conflicts(path, ids, pos, neg, len(order), names)
    first = next(iter(ids))
    words = [w for w in (split, {"val": "validation"}.get(split), path.stem.split("-")[0],
                         path.stem.split("-")[1] if "-" in path.stem else None) if w]
    folder = _image_folder(root, first, words)
    files = [f"{image}.jpg" for image in ids]
    paths = [f"{folder}{os.sep}{name}" for name in files]  # strings: 10^6 Paths cost seconds
    if not set(os.listdir(folder)).issuperset(files):  # one listing, not 10^6 stat calls
        check_files([Path(p) for p in paths], str(path))
    boxes = NormalizedBoxes(paths, _boxes(box_files, ids, {i: j for j, i in enumerate(order)})) if box_files else None
    return LabelTable(paths, _targets(len(ids), len(order), pos, neg), names, str(path), boxes=boxes)
