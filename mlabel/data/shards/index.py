"""A split's shard index (``SPLIT.index.npz``, written with the shards) read back and checked.

The index is data like any other file mlabel reads: every array is checked for presence, shape,
type and range before it is used (a negative label number must not wrap to the last label, a
shard number must name a shard of the split, an image must lie inside its shard), and a file
that is not a NumPy archive, or whose arrays claim more bytes than it holds, is refused before
anything is allocated. Every refusal is a :class:`DataError` naming the file and the array.
"""
from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np

from ...errors import DataError

__all__ = ["INDEX_ARRAYS", "read_index"]

# array -> the kinds of NumPy type it may have (i/u: integers, U/S: text)
INDEX_ARRAYS = {"shard": "iu", "key": "US", "offset": "iu", "size": "iu",
                "pos_rows": "iu", "pos_labels": "iu", "other_rows": "iu", "other_labels": "iu"}
PER_SAMPLE = ("shard", "key", "offset", "size")
FIX = "delete it (the shards are then scanned) or rewrite the shards with python -m mlabel.data shard"


def _headers(archive: zipfile.ZipFile, source, limit: int) -> None:
    """Each member's array header against the bytes it holds: nothing is allocated for a shape
    the file cannot fill, nor for more than ``limit`` bytes in all."""
    total = 0
    for info in archive.infolist():
        total += info.file_size
        if total > limit:
            raise DataError(f"the shard index {source} unpacks to more than {limit:,} bytes; {FIX}")
        if not info.filename.endswith(".npy") or info.filename[:-4] not in INDEX_ARRAYS:
            continue
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"array {info.filename[:-4]!r}: .npy version {version} is not read")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
        if dtype.hasobject or int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
            raise ValueError(f"array {info.filename[:-4]!r} claims more bytes than the file holds")


def _arrays(data: bytes, source, limit: int) -> dict:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            _headers(archive, source, limit)
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            return {k: saved[k] for k in INDEX_ARRAYS if k in saved.files}
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError, MemoryError) as err:  # NotImplementedError: a zip compression zipfile lacks
        raise DataError(f"cannot read the shard index {source} (not a NumPy .npz archive, or a damaged one: "
                        f"{str(err)[:200]}); {FIX}") from None


def _in_range(values: np.ndarray, low: int, high: int, name: str, source, what: str) -> np.ndarray:
    """``values`` as int64, all in [low, high), or a refusal naming the array."""
    if len(values) and (int(values.min()) < low or int(values.max()) >= high):
        bad = values[(values < low) | (values >= high)][0]
        raise DataError(f"the shard index {source}: array {name!r} holds {int(bad)}, outside {what} "
                        f"[{low}, {high - 1}]; {FIX}")
    return values.astype(np.int64)


def _shapes(arrays: dict, source) -> int:
    """The number of samples, once every array is there, 1-D and of its type."""
    for name, kinds in INDEX_ARRAYS.items():
        if name not in arrays:
            raise DataError(f"the shard index {source} lacks the array {name!r}; {FIX}")
        if arrays[name].ndim != 1 or arrays[name].dtype.kind not in kinds:
            raise DataError(f"the shard index {source}: array {name!r} must be a list of "
                            f"{'text' if kinds == 'US' else 'whole numbers'}, not {arrays[name].dtype} of shape "
                            f"{arrays[name].shape}; {FIX}")
    n = len(arrays["shard"])
    for group in (PER_SAMPLE, ("pos_rows", "pos_labels"), ("other_rows", "other_labels")):
        lengths = {name: len(arrays[name]) for name in group}
        if len(set(lengths.values())) != 1:
            raise DataError(f"the shard index {source}: arrays of different lengths {lengths}; {FIX}")
    return n


def _keys(keys: np.ndarray, source) -> np.ndarray:
    """Sample keys as UTF-8 bytes."""
    try:
        return np.char.encode(keys, "utf-8") if keys.dtype.kind == "U" else \
            np.char.encode(np.char.decode(keys, "utf-8"), "utf-8")
    except UnicodeError:
        raise DataError(f"the shard index {source}: array 'key' holds names that are not UTF-8 text; {FIX}") from None


def read_index(data: bytes, source, *, labels: int, shard_bytes: list, samples: list | None,
               max_image_bytes: int, limit: int) -> dict:
    """The arrays of an index file's bytes ``data`` for a split of ``len(shard_bytes)`` shards of
    those sizes and a vocabulary of ``labels`` labels (``samples``: per shard, as labels.json says).

    Returns:
        shard (N,) int32, key (N,) UTF-8 bytes, offset and size (N,) int64; pos_rows, pos_labels,
        other_rows, other_labels: the listed (sample, vocabulary label) pairs, int64.
    """
    arrays = _arrays(data, source, limit)
    n = _shapes(arrays, source)
    shards = len(shard_bytes)
    out = {"shard": _in_range(arrays["shard"], 0, shards, "shard", source, "the split's shard numbers"),
           "key": _keys(arrays["key"], source),
           "offset": _in_range(arrays["offset"], 0, 2**62, "offset", source, "byte offsets"),
           "size": _in_range(arrays["size"], 0, max_image_bytes + 1, "size", source, "image sizes")}
    for kind in ("pos", "other"):
        out[f"{kind}_rows"] = _in_range(arrays[f"{kind}_rows"], 0, max(n, 0), f"{kind}_rows", source,
                                        "the sample numbers")
        out[f"{kind}_labels"] = _in_range(arrays[f"{kind}_labels"], 0, labels, f"{kind}_labels", source,
                                          f"the {labels} labels of the vocabulary")
    ends = out["offset"] + out["size"]
    beyond = np.flatnonzero(ends > np.asarray(shard_bytes, np.int64)[out["shard"]]) if n else []
    if len(beyond):
        i = beyond[0]
        raise DataError(f"the shard index {source}: sample {i} lies beyond the end of shard {out['shard'][i]} "
                        f"({int(ends[i]):,} > {shard_bytes[out['shard'][i]]:,} bytes); {FIX}")
    if samples is not None and np.bincount(out["shard"], minlength=shards).tolist() != list(samples):
        raise DataError(f"the shard index {source} does not hold the samples labels.json lists per shard "
                        f"({np.bincount(out['shard'], minlength=shards).tolist()[:5]}... against "
                        f"{list(samples)[:5]}...); {FIX}")
    out["shard"] = out["shard"].astype(np.int32)
    return out
