"""Hugging Face ``datasets`` folders as label tables (``data.format: hf``).

``data.root`` is a folder written by ``save_to_disk`` (a ``DatasetDict`` or a ``Dataset``), a
local folder ``datasets.load_dataset`` reads without the network (an ``imagefolder`` with
``metadata.jsonl``, parquet files), a parquet file, or ``hf://datasets/OWNER/NAME[@REVISION]``
(the only form that downloads). The image column is the one with the ``Image`` feature; the
labels are a list of class labels (names from the features), a list of strings, one class label
(a single-label set), or one 0/1 column per label (-1 or null: unknown). A null label list or a
class label of -1 (a split without labels) leaves the whole row unknown.

An image the data set stores as a local file is read where it is; images stored as bytes (what
``save_to_disk`` and parquet hold) are written once, as they are, into mlabel's cache folder
(``data.cache_dir``/hf) so that every loader, check and shard writer reads plain files; the data
folder itself is never written into. The ``datasets`` package is the optional extra ``mlabel[hf]``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..preprocess import IMAGE_EXTENSIONS
from .cache import default_cache_dir
from .sparse import SparseLabels
from .tables import SPARSE_FROM, LabelTable, check_files

__all__ = ["HfSource", "read_hf_table", "resolve_hf_splits", "data_keys", "datasets_module"]

HUB = "hf://datasets/"
VAL_NAMES = ("validation", "valid", "val", "dev")
_BATCH = 1024  # rows of image bytes held at a time while exporting
ROWS = "rows.json"  # per row of an exported split, the file of its image (written last: the export is whole)
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


@dataclass(frozen=True)
class HfSource:
    """What the reader takes from ``data``: where the set is and which columns to read."""
    root: str
    image_column: str | None = None
    label_columns: tuple | None = None  # 0/1 columns; None: detected from the features
    labels_column: str | None = None  # the list (or class label) column; None: detected
    cache_dir: str | None = None
    subset: bool = False  # data.labels picks a subset: labels outside it are dropped, not refused

    @classmethod
    def of(cls, data) -> "HfSource":
        return cls(data.root, data.image_column, tuple(data.label_columns) if data.label_columns else None,
                   data.labels_column, data.cache_dir, data.labels is not None)


def datasets_module():
    """``datasets``, or one error line naming the extra to install."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.format hf reads Hugging Face datasets, which needs the datasets package: "
                        "pip install 'mlabel[hf]'") from None
    return datasets


@contextlib.contextmanager
def quiet(datasets):
    """``datasets``' progress bars off inside (mlabel prints its own lines), as they were after."""
    bars = datasets.utils  # (datasets 2.18 has these only here)
    enabled = not bars.are_progress_bars_disabled()
    bars.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            bars.enable_progress_bars()


def _cache_root(cache_dir: str | None) -> Path:
    return (Path(cache_dir) if cache_dir else default_cache_dir()).expanduser().resolve() / "hf"


def load_splits(root: str, cache_dir: str | None = None) -> dict:
    """``{split name: datasets.Dataset}`` of ``root`` (see the module's forms), read once a process
    while the folder's entries keep their modification times."""
    path = Path(root).expanduser()
    stamp = tuple(os.stat(p).st_mtime_ns for p in (path, *path.iterdir())) if path.is_dir() else None
    return _load_splits(root, cache_dir, stamp)


@functools.lru_cache(maxsize=4)
def _load_splits(root: str, cache_dir: str | None, stamp) -> dict:
    datasets = datasets_module()
    path = Path(root).expanduser()
    if not root.startswith(HUB) and not path.exists():
        raise DataError(f"Hugging Face data set {root} not found: data.root must be a save_to_disk folder, a "
                        f"local imagefolder / parquet folder, or {HUB}OWNER/NAME")
    try:
        with quiet(datasets):
            found = _load(datasets, root, path, str(_cache_root(cache_dir) / "datasets"))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets' many error types, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        fix = ("check the name and the network (with HF_HUB_OFFLINE=1, only the cache is read)" if root.startswith(HUB)
               else "give a save_to_disk folder or a folder load_dataset reads (imagefolder, parquet)")
        raise DataError(f"{root}: datasets could not read it ({type(err).__name__}: {first[:200]}); {fix}") from None
    if not found:
        raise DataError(f"{root}: the data set has no splits")
    return found


def _load(datasets, root: str, path: Path, cache: str) -> dict:
    if root.startswith(HUB):  # the one form that reaches the network
        repo, _, revision = root[len(HUB):].partition("@")
        return dict(datasets.load_dataset(repo, revision=revision or None, cache_dir=cache))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{root} is a file; data.format hf takes a folder, or a .parquet file")
        return dict(datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=cache))
    return dict(datasets.load_dataset(str(path), cache_dir=cache))


def resolve_hf_splits(data):
    """``data`` with the split names of the set: train (the default ``train.csv`` means ``train``,
    or the only split), val from ``validation`` / ``valid`` / ``val`` / ``dev`` and test from
    ``test`` when they exist (else carved from train as for the other formats)."""
    if data.format != "hf":
        return data
    names = list(load_splits(data.root, data.cache_dir))
    train = data.train
    if train == "train.csv":
        train = "train" if "train" in names or len(names) != 1 else names[0]
    val = data.val or next((n for n in VAL_NAMES if n in names), None)
    test = data.test or ("test" if "test" in names else None)
    return dataclasses.replace(data, train=train, val=val, test=test)


def _split(source: HfSource, name: str):
    splits = load_splits(source.root, source.cache_dir)
    if name not in splits:
        raise DataError(f"{source.root}: no split {name!r}; it has {sorted(splits)} (set data.train / data.val / "
                        "data.test to one of them)")
    return splits[name]


def _columns(features) -> str:
    return ", ".join(f"{k} ({type(f).__name__ if not isinstance(f, list) else 'list'})" for k, f in features.items())


def _image_column(features, source: HfSource, where: str) -> str:
    datasets = datasets_module()
    if source.image_column is not None:
        if not isinstance(features.get(source.image_column), datasets.Image):
            raise DataError(f"{where}: data.image_column {source.image_column!r} is not an Image column; "
                            f"columns: {_columns(features)}")
        return source.image_column
    found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if len(found) != 1:
        what = "no Image column" if not found else f"several Image columns {found}"
        raise DataError(f"{where}: {what}; columns: {_columns(features)}. "
                        + ("Cast the image column to datasets.Image()" if not found else "Set data.image_column"))
    return found[0]


def _inner(feature):
    """The item feature of a list feature (``List``, ``LargeList``, ``Sequence``, ``[f]``); else None."""
    if isinstance(feature, list):
        return feature[0] if len(feature) == 1 else None
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return getattr(feature, "feature", None)
    return None


def _list_kind(feature) -> str | None:
    """``classlabels`` (a list of class labels), ``strings``, ``classlabel`` (one), or None."""
    datasets = datasets_module()
    inner = _inner(feature)
    if isinstance(inner, datasets.ClassLabel):
        return "classlabels"
    if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
        return "strings"
    return "classlabel" if isinstance(feature, datasets.ClassLabel) else None


def _is_flag(feature) -> bool:
    datasets = datasets_module()
    return isinstance(feature, datasets.Value) and re.fullmatch(r"u?int\d+|bool|float\d+", feature.dtype) is not None


def _label_spec(features, source: HfSource, image: str, where: str) -> tuple[str, list[str]]:
    """(kind, columns): ``classlabels`` / ``strings`` / ``classlabel`` with its one column, or
    ``flags`` with the 0/1 columns."""
    if source.labels_column is not None:
        kind = _list_kind(features.get(source.labels_column))
        if kind is None:
            raise DataError(f"{where}: data.labels_column {source.labels_column!r} is not a list of class labels "
                            f"or strings, nor a class label; columns: {_columns(features)}")
        return kind, [source.labels_column]
    if source.label_columns is not None:
        bad = [c for c in source.label_columns if not _is_flag(features.get(c))]
        if bad:
            raise DataError(f"{where}: data.label_columns {bad} are not numeric 0/1 columns; columns: {_columns(features)}")
        return "flags", list(source.label_columns)
    lists = [k for k, f in features.items() if k != image and _list_kind(f) is not None]
    if len(lists) > 1:
        raise DataError(f"{where}: several label columns {lists}; set data.labels_column to the one to train on")
    if lists:
        return _list_kind(features[lists[0]]), lists
    flags = [k for k, f in features.items() if k != image and _is_flag(f)]
    if not flags:
        raise DataError(f"{where}: no label column (a list of class labels or strings, a class label, or 0/1 "
                        f"columns); columns: {_columns(features)}")
    return "flags", flags


def _column(ds, name: str):
    """Column ``name`` of ``ds`` as a pyarrow array (the dataset's row order, any indices applied)."""
    return ds.select_columns([name]).with_format("arrow")[:][name].combine_chunks()


def _list_pairs(arr, kind: str, names: list[str] | None):
    """(row of each listed label, index of its name in ``names``, the rows left unknown, ``names``)
    of a list or class-label column, from its Arrow buffers (no Python object per row). A null
    list, a null or -1 in it, or a class label of -1 leaves the row unknown; string lists take
    their distinct strings as ``names``."""
    import pyarrow.compute as pc
    n = len(arr)
    if kind == "classlabel":
        rows, values = np.arange(n), pc.fill_null(arr, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        rows = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(arr)
        if kind == "strings":  # the distinct strings become the names; a null stays null
            encoded = values.dictionary_encode()
            names, values = encoded.dictionary.to_pylist(), encoded.indices
        values = pc.fill_null(values, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    blank = np.zeros(n, bool)
    blank[rows[values < 0]] = True
    blank |= arr.is_null().to_numpy(zero_copy_only=False)
    keep = ~blank[rows]
    return rows[keep], values[keep], blank, names


def _list_targets(ds, kind: str, column: str, labels, subset: bool, where: str):
    """(label order, targets) of a list-of-class-labels, list-of-strings or class-label column."""
    feature = ds.features[column]
    names = getattr(_inner(feature) if kind == "classlabels" else feature, "names", None)
    rows, values, blank, names = _list_pairs(_column(ds, column), kind, names)
    bad = np.flatnonzero(values >= len(names))
    if len(bad):
        raise DataError(f"{where} row {rows[bad[0]]}: class id {values[bad[0]]} is not one of 0..{len(names) - 1} "
                        f"(the features' names {names[:10]})")
    order = list(labels) if labels is not None else (sorted(names) if kind == "strings" else list(names))
    if not order:
        raise DataError(f"{where}: no label appears in any row; a training split needs labels")
    position = {name: j for j, name in enumerate(order)}
    lookup = np.array([position.get(name, -1) for name in names] + [-1], np.int64)
    column_of = lookup[values]
    stray = np.flatnonzero(column_of < 0)
    if len(stray) and not subset:
        raise DataError(f"{where} row {rows[stray[0]]}: label {names[values[stray[0]]]!r} is not in the training "
                        f"labels {order}; every split must use the training split's labels (or list them in data.labels)")
    used = column_of >= 0
    return order, _pair_targets(rows[used], column_of[used], blank, len(order))


def _pair_targets(rows: np.ndarray, columns: np.ndarray, blank: np.ndarray, num_labels: int):
    """1 at the (row, column) pairs, -1 across the ``blank`` rows, 0 elsewhere (dense up to
    SPARSE_FROM cells, then index lists)."""
    n = len(blank)
    if n * num_labels <= SPARSE_FROM:
        targets = np.zeros((n, num_labels), np.float32)
        targets[blank] = -1.0
        targets[rows, columns] = 1.0
        return targets
    unknown = np.flatnonzero(blank)
    return SparseLabels.from_pairs(rows, columns, n, num_labels, np.repeat(unknown, num_labels),
                                   np.tile(np.arange(num_labels), len(unknown)))


def _flag_targets(ds, columns: list[str], labels, subset: bool, where: str):
    """(label order, targets) of 0/1 columns: -1 or null unknown, anything else refused."""
    import pyarrow as pa
    import pyarrow.compute as pc
    order = list(labels) if labels is not None else list(columns)
    absent = [n for n in order if n not in ds.features]
    extra = [c for c in columns if c not in order]
    if absent:
        raise DataError(f"{where}: no column for labels {absent}; columns: {_columns(ds.features)}")
    if extra and not subset:
        raise DataError(f"{where}: label columns {extra} are not in the training labels {order}; every split "
                        "must use the training split's labels (or list them in data.labels)")
    targets = np.empty((len(ds), len(order)), np.float32)
    for j, name in enumerate(order):
        values = pc.fill_null(_column(ds, name).cast(pa.float64()), -1.0).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isin(values, (-1.0, 0.0, 1.0)))
        if len(bad):
            raise DataError(f"{where} row {bad[0]}: column {name!r} has {values[bad[0]]:g}; label columns hold 1, "
                            f"0, or -1 / null for unknown ({len(bad)} such rows). If it is no label, set "
                            "data.label_columns")
        targets[:, j] = values
    return order, targets


def _export_folder(ds, source: HfSource, split: str, column: str) -> Path:
    """Where this split's image bytes go: the cache, keyed by the data set and its fingerprint."""
    key = [os.path.realpath(source.root) if not source.root.startswith(HUB) else source.root, split, column,
           str(len(ds)), str(getattr(ds, "_fingerprint", None) or ds.cache_files)]
    digest = hashlib.blake2b("\0".join(key).encode(), digest_size=8).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source.root.rstrip("/")).name)[:40] or "set"
    return _cache_root(source.cache_dir) / "images" / f"{stem}-{digest}" / re.sub(r"[^A-Za-z0-9._-]", "_", split)


def _file_name(row: int, data: bytes, original: str | None) -> str:
    """``row`` plus the original name (or an extension from the bytes' signature): what an error
    about the image shows, and what the shard writer reads the type from."""
    base = os.path.basename(original or "")
    if os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS:
        return f"{row:08d}-{re.sub(r'[^A-Za-z0-9._-]', '_', base)[-80:]}"
    ext = next((e for magic, e in _MAGIC if data.startswith(magic)), None)
    ext = ext or (".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else ".img")
    return f"{row:08d}{ext}"


def _export(ds, column: str, folder: Path, root: Path, where: str) -> list[str]:
    """Write the split's image bytes into ``folder`` (all of them, then renamed into place);
    returns per row the file that holds its image."""
    datasets = datasets_module()
    stored = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    paths, empty = [], []
    try:
        for start in range(0, len(ds), _BATCH):
            cells = stored[start:start + _BATCH][column].combine_chunks()
            for offset, (data, original) in enumerate(zip(cells.field("bytes").to_pylist(),
                                                          cells.field("path").to_pylist())):
                row = start + offset
                if data is None:  # a file the data set names: read where it is
                    empty += [] if original else [row]
                    paths.append(_local(root, original))
                    continue
                name = _file_name(row, data, original)
                with open(f"{tmp}{os.sep}{name}", "wb") as handle:  # strings: no Path per image
                    handle.write(data)
                paths.append(name)
        if empty:
            raise DataError(f"{where}: {len(empty)} rows have no image (neither bytes nor a path), e.g. row {empty[0]}")
        (tmp / ROWS).write_text(json.dumps(paths), encoding="utf-8")
        os.replace(tmp, folder)
    except OSError as err:
        if not folder.is_dir():
            raise DataError(f"cannot write the images of {where} into {folder.parent} ({err.strerror}); free "
                            "space or set data.cache_dir elsewhere") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left when renamed, or another process was first
    return _rows(folder)


def _local(root: Path, original: str | None) -> str | None:
    """A stored path: absolute, else under the data set's folder when there, else as datasets opens it."""
    if not original or os.path.isabs(original) or not (root / original).exists():
        return original and os.path.abspath(original)
    return str(root / original)


def _rows(folder: Path) -> list[str]:
    """Per row, the image file an earlier export recorded (its own name inside ``folder``)."""
    names = json.loads((folder / ROWS).read_text(encoding="utf-8"))
    prefix = f"{folder}{os.sep}"  # strings: 10^5 Path objects cost a second
    return [p if os.sep in p or "/" in p else prefix + p for p in names]


def _image_paths(ds, column: str, source: HfSource, split: str, where: str) -> list[str]:
    folder = _export_folder(ds, source, split, column)
    if (folder / ROWS).is_file():
        return _rows(folder)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without its row list is no export (renamed in whole)
    root = Path(source.root) if not source.root.startswith(HUB) else Path(".")
    folder.parent.mkdir(parents=True, exist_ok=True)
    return _export(ds, column, folder, root if root.is_dir() else root.parent, where)


def read_hf_table(source: HfSource, split: str, *, labels: Sequence[str] | None = None) -> LabelTable:
    """Split ``split`` of the data set at ``source.root`` as a label table.

    Args:
        labels: the label order (the training split's, or ``data.labels``); ``None``: the class
            names of the features, the sorted strings of a list column, or the 0/1 columns in order.
    """
    ds = _split(source, split)
    where = f"{source.root} (split {split!r})"
    if not len(ds):
        raise DataError(f"{where} holds no rows")
    image = _image_column(ds.features, source, where)
    kind, columns = _label_spec(ds.features, source, image, where)
    if kind == "flags":
        names, targets = _flag_targets(ds, columns, labels, source.subset, where)
    else:
        names, targets = _list_targets(ds, kind, columns[0], labels, source.subset, where)
    paths = _image_paths(ds, image, source, split, where)
    if not all(map(os.path.isfile, paths)):
        check_files([Path(p) for p in paths], where)
    return LabelTable(paths, targets, names, where)


def saved_copy(dataset, cache_dir: str | None = None) -> str:
    """A ``datasets.DatasetDict`` (or ``Dataset``) saved once into the cache (``save_to_disk``,
    keyed by its fingerprints): the folder ``data.format: hf`` then reads and config.yaml names."""
    datasets = datasets_module()
    parts = dataset.items() if isinstance(dataset, datasets.DatasetDict) else [("train", dataset)]
    key = "\0".join(f"{name}:{len(ds)}:{getattr(ds, '_fingerprint', None)}" for name, ds in parts)
    folder = _cache_root(cache_dir) / "saved" / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    if not folder.is_dir():
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        with quiet(datasets):
            dataset.save_to_disk(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def data_keys(value):
    """``fit(data=...)``'s value with a ``datasets.DatasetDict`` / ``Dataset`` (alone, or as
    ``root`` in a dict of data keys) replaced by ``data.format: hf`` keys on its saved copy; the
    recipe's split names and generator are reset (they described other data)."""
    module = type(value).__module__ or ""
    given = {} if module.startswith("datasets.") else dict(value) if isinstance(value, dict) else None
    dataset = value if given == {} else (given or {}).get("root")
    if given is None or not (type(dataset).__module__ or "").startswith("datasets."):
        return value
    reset = {"format": "hf", "generate": None, "train": "train.csv", "val": None, "test": None}
    return {**reset, **given, "root": saved_copy(dataset, given.get("cache_dir"))}
