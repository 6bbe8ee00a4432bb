"""WebDataset tar shards: written from any format, read back as splits, streamed (issue 19).

A shard is a POSIX tar of samples in the WebDataset layout: the members of a sample share a key
(the member name up to its first dot) and follow each other: ``KEY.jpg`` (or .png ...: the image's
bytes as in the source, not re-encoded) and ``KEY.json``::

    {"labels": ["sea", "sunset"], "unknown": [], "path": "images/42.jpg"}

``labels`` are the positives; every label not listed takes the vocabulary's ``default``
(``negative``, or ``unknown`` for partial-label data, whose verified negatives are then listed
under ``negative``); ``unknown`` lists the exceptions when the default is negative. Beside the
shards, ``labels.json`` holds the vocabulary, the default and, per split, the shard files and
their sample counts.

Reading: :func:`read_wds_table` scans a split's shards once (headers and the small JSON members;
image bytes are skipped by seeking) into a :class:`~mlabel.data.tables.LabelTable` whose
``members`` (:class:`ShardMembers`) locate each image inside its shard. Training streams them with
:class:`ShardStream`; evaluation reads members by offset in table order.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from ..io import atomic_path, write_json
from ..labelnames import check_label_names
from ..preprocess import read_rgb
from ..rundir import hold_run_dir
from .http import FetchError, fetch, fetch_range, is_url, open_url, probe, same_host
from .shard_index import read_index
from .sparse import SparseLabels
from .tables import LabelTable

__all__ = ["VOCABULARY", "expand_braces", "read_wds_table", "read_member", "write_shards", "ShardStream",
           "ShardLoader", "stream_plan"]

VOCABULARY = "labels.json"
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
PROGRESS = ".shard-progress.json"
MAX_JSON_BYTES = 1 << 20  # a sample's JSON: label lists, not megabytes (read whole while scanning)
MAX_IMAGE_BYTES = 256 << 20  # an image member is read whole before decoding
MAX_VOCABULARY_BYTES = 64 << 20  # labels.json: label names and shard lists
MAX_INDEX_BYTES = 16 << 30  # an index without its size in labels.json (about 60 bytes a sample)
MAX_SHARD_BYTES = 1 << 40  # a shard streamed without its size in labels.json
PROBES = 8  # shards whose size and time are asked for at once (an index checked over HTTP)


def expand_braces(pattern: str) -> list[str]:
    """``train-{000000..000002}.tar`` -> three names (the width of the first bound is kept);
    ``{a,b}`` alternatives; several braces multiply."""
    found = re.search(r"\{([^{}]*)\}", pattern)
    if found is None:
        return [pattern]
    body = found.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        first, last = bounds.groups()
        items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[:found.start()], pattern[found.end():]
    return [name for item in items for name in expand_braces(head + item + tail)]


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first dot of its last part."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _join(root, name: str, where: str):
    """``name`` under the shards' folder or URL. Local data stays local: a URL is read only under
    a URL root (and on its host), and a URL root's names never reach the local disk."""
    if is_url(root):
        if is_url(name) and not same_host(name, str(root)):
            raise DataError(f"{where} names {name}, on another server than data.root {root}; refused: "
                            "shards are read from data.root's server only")
        if not is_url(name) and (name.startswith("/") or Path(name).is_absolute()):
            raise DataError(f"{where} names the local file {name} under the URL data.root {root}; refused: "
                            "a server's data cannot name files of this machine")
        return name if is_url(name) else f"{str(root).rstrip('/')}/{name}"
    if is_url(name):
        raise DataError(f"{where} names the URL {name}, but data.root {root} is a local folder; mlabel fetches "
                        "nothing that local data names: set data.root to the shards' URL to read them over HTTP")
    return name if Path(name).is_absolute() else Path(root) / name


@dataclass
class Vocabulary:
    path: "Path | str"  # a file, or a URL
    labels: list[str]
    default: str  # "negative" | "unknown"
    splits: dict


def _vocabulary_text(path) -> str:
    """labels.json's text (a file or a URL), at most :data:`MAX_VOCABULARY_BYTES`."""
    if is_url(path):
        return fetch(path, MAX_VOCABULARY_BYTES).decode("utf-8")
    if path.stat().st_size > MAX_VOCABULARY_BYTES:
        raise DataError(f"{path} holds {path.stat().st_size:,} bytes, more than a vocabulary needs "
                        f"({MAX_VOCABULARY_BYTES:,}); rewrite it with python -m mlabel.data shard")
    return path.read_text(encoding="utf-8")


def read_vocabulary(folder) -> Vocabulary:
    path = _join(folder, VOCABULARY, "data.root")
    try:
        tree = json.loads(_vocabulary_text(path))
    except FileNotFoundError:
        raise DataError(f"{path} not found: wds shards need their vocabulary beside them (labels.json, as "
                        "python -m mlabel.data shard writes it); set data.root to the shards' folder") from None
    except FetchError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: bad JSON, huge ints
        raise DataError(f"cannot read {path}: {str(err)[:200]}; rewrite it with python -m mlabel.data shard") from None
    if not isinstance(tree, dict):
        raise DataError(f"{path}: the vocabulary must be a JSON object with 'labels' and 'splits'")
    labels = check_label_names(tree.get("labels"), f"{path}: 'labels'")  # the rules a model load enforces
    default = tree.get("default", "negative")
    if not isinstance(default, str) or default not in ("negative", "unknown"):
        raise DataError(f"{path}: 'default' must be negative or unknown, not {str(default)[:50]!r}")
    splits = tree.get("splits", {})
    if not isinstance(splits, dict):
        raise DataError(f"{path}: 'splits' must be an object of split name -> its shards")
    for name, entry in splits.items():
        _check_split(entry, f"{path}: splits.{name}", folder)
    return Vocabulary(path, labels, default, splits)


def _count_list(value, count: int, where: str) -> None:
    if not isinstance(value, list) or len(value) != count or \
            not all(type(v) is int and 0 <= v < 2**62 for v in value):
        raise DataError(f"{where} must be a list of {count} whole numbers >= 0 (one per shard)")


def _check_split(entry, where: str, root) -> None:
    """One split's entry of labels.json, every field of it, or a :class:`DataError` naming it."""
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be an object with 'shards' (a list of shard files)")
    shards = entry.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(n, str) and n and "\0" not in n for n in shards):
        raise DataError(f"{where}.shards must be a list of shard file names")
    for n in shards:
        _join(root, n, f"{where}.shards")
    for field in ("samples", "bytes"):
        if field in entry:
            _count_list(entry[field], len(shards), f"{where}.{field}")
    index = entry.get("index")
    if index is not None:
        if not isinstance(index, str) or not index or "\0" in index:
            raise DataError(f"{where}.index must be the index file's name")
        _join(root, index, f"{where}.index")
    digest = entry.get("index_sha256")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise DataError(f"{where}.index_sha256 must be the index file's SHA-256 (64 hex digits)")
    size = entry.get("index_bytes")
    if size is not None and not (type(size) is int and 0 < size <= MAX_INDEX_BYTES):
        raise DataError(f"{where}.index_bytes must be the index file's size in bytes")


def shard_files(root: Path, spec: str, vocabulary: Vocabulary) -> list[Path]:
    """The shards of a split: a split name of the vocabulary, a brace pattern or a glob (files);
    under a URL root, or given as URLs, they are fetched over HTTP(S)."""
    if spec in vocabulary.splits:
        names, where = vocabulary.splits[spec].get("shards", []), f"{vocabulary.path}: splits.{spec}.shards"
    elif any(c in spec for c in "*?["):
        if is_url(root) or is_url(spec):
            raise DataError(f"data split {spec!r}: a glob cannot list a URL; give a brace pattern or a split name")
        names, where = sorted(glob.glob(str(Path(root) / spec))), f"data split {spec!r}"
    else:
        names, where = expand_braces(spec), f"data split {spec!r}"
    paths = [_join(root, n, where) for n in names]
    missing = [str(p) for p in paths if not is_url(p) and not p.is_file()]
    if not paths or missing:
        raise DataError(f"data split {spec!r}: " + (f"shard {missing[0]} not found" if missing else "no shards")
                        + f" (under {root}; splits in {vocabulary.path}: {sorted(vocabulary.splits) or 'none'})")
    return paths


@dataclass
class _Sample:
    key: str
    image: tuple[int, int] | None = None  # offset, size in the shard
    meta: dict | None = None
    problem: str | None = None


def _scan(path: Path, expected: int | None = None) -> tuple[list[_Sample], str | None]:
    """The samples of one shard (of ``expected`` bytes, when known), in order, and the problem
    that cut it short (None when whole). A shard that cannot be fetched is a :class:`FetchError`."""
    samples: list[_Sample] = []
    stream = None
    try:
        if is_url(path):  # read once, front to back (offsets still count from the start)
            stream = open_url(path, limit=expected if expected is not None else MAX_SHARD_BYTES)
            size = stream.length if stream.length is not None else stream.left
            opened = tarfile.open(fileobj=stream, mode="r|")
        else:
            size = path.stat().st_size
            opened = tarfile.open(path, "r:")
        with opened as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(key))
                    if not _is_utf8(key):
                        samples[-1].problem = "has a name that is not UTF-8 text: rename it"
                if info.offset_data + info.size > size:
                    return samples[:-1], f"truncated inside sample {key}"
                if ext == "json":
                    try:
                        if info.size > MAX_JSON_BYTES:
                            raise ValueError(f"{info.size:,} bytes, more than a label list needs ({MAX_JSON_BYTES:,})")
                        samples[-1].meta = json.loads(tar.extractfile(info).read())
                    except (ValueError, UnicodeDecodeError, RecursionError) as err:
                        samples[-1].meta, samples[-1].problem = {}, f"malformed JSON ({str(err)[:200]})"
                elif ext in IMAGE_TYPES:
                    if info.size > MAX_IMAGE_BYTES:
                        samples[-1].problem = (f"has an image member of {info.size:,} bytes (more than "
                                               f"{MAX_IMAGE_BYTES:,}): resize it before sharding")
                    samples[-1].image = (info.offset_data, info.size)
    except FetchError:
        raise  # the network failed, not the shard: nothing to skip
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        return samples[:-1], f"unreadable after {len(samples) - 1 if samples else 0} samples ({err})"
    finally:
        if stream is not None:
            stream.close()
    return samples, None


def _is_utf8(text: str) -> bool:
    """Whether a name read from a tar header is text (tarfile keeps undecodable bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _targets(sample: _Sample, index: dict, vocabulary: Vocabulary) -> tuple[tuple | None, str | None]:
    """The sample's (positive, other) vocabulary indices (other: the listed exceptions to the
    default), or the problem with its JSON."""
    meta = sample.meta
    if sample.image is None:
        return None, "has no image member (.jpg, .png ...)"
    if meta is None:
        return None, "has no .json member (its labels)"
    if sample.problem is not None:
        return None, sample.problem
    if not isinstance(meta, dict):
        return None, "JSON is not an object"
    found = []
    for field in ("labels", "unknown" if vocabulary.default == "negative" else "negative"):
        names = meta.get(field, [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return None, f"'{field}' must be a list of label names (strings)"
        for name in names:
            if name not in index:
                return None, f"label {name!r} is not in the vocabulary {vocabulary.path}"
        found.append([index[name] for name in names])
    return tuple(found), None


def _scan_split(paths: list, vocabulary: Vocabulary, shard_bytes: list | None = None) -> tuple[dict, list]:
    """Every shard of a split scanned (``shard_bytes``: their sizes when labels.json says): the index
    arrays (per sample its shard, key, image offset and size; the listed labels as (sample,
    vocabulary label) pairs) and the problems found."""
    index = {n: j for j, n in enumerate(vocabulary.labels)}
    shard_of, keys, offsets, sizes, problems = [], [], [], [], []
    pairs = {"pos": ([], []), "other": ([], [])}
    for number, shard in enumerate(paths):
        samples, cut = _scan(shard, shard_bytes[number] if shard_bytes else None)
        if cut is not None:
            problems.append((str(shard), cut + "; the shard's remaining samples are lost: rewrite it"))
        for sample in samples:
            row, problem = _targets(sample, index, vocabulary)
            if problem is not None:
                problems.append((f"{shard}#{sample.key}", f"sample {sample.key} {problem}"))
                continue
            for kind, listed in zip(("pos", "other"), row):
                pairs[kind][0].extend([len(keys)] * len(listed))
                pairs[kind][1].extend(listed)
            shard_of.append(number)
            keys.append(sample.key)
            offsets.append(sample.image[0])
            sizes.append(sample.image[1])
    arrays = {"shard": np.asarray(shard_of, np.int32), "key": np.asarray(keys, dtype=str),
              "offset": np.asarray(offsets, np.int64), "size": np.asarray(sizes, np.int64),
              **{f"{kind}_{part}": np.asarray(values, np.int64)
                 for kind, (rows, labels) in pairs.items() for part, values in (("rows", rows), ("labels", labels))}}
    return arrays, problems


def _load_index(root, spec: str, vocabulary: Vocabulary, paths: list) -> dict | None:
    """The split's index written with the shards (no scan at start-up), or None when there is
    none, or when it is stale and the shards are to be scanned: a shard of another size than
    labels.json says, or newer than the index (rewritten, or copied without its time: over HTTP
    as the server's Last-Modified tells), or an index that is not the one labels.json was written
    with (its SHA-256). An index that is current but malformed is refused, naming the array."""
    entry = vocabulary.splits.get(spec, {})
    if "index" not in entry or len(entry.get("bytes", [])) != len(paths):
        return None
    source = _join(root, entry["index"], f"{vocabulary.path}: splits.{spec}.index")
    if not (_remote_current if is_url(source) else _local_current)(source, paths, entry["bytes"]):
        return None
    limit = entry.get("index_bytes", MAX_INDEX_BYTES)
    if not is_url(source) and Path(source).stat().st_size > limit:
        return None  # not the index labels.json was written with (its size): scanned
    try:
        data = fetch(source, limit) if is_url(source) else Path(source).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the shard index {source}: {err}; delete it (the shards are then "
                        "scanned) or rewrite the shards") from None
    if "index_sha256" in entry and hashlib.sha256(data).hexdigest() != entry["index_sha256"]:
        return None  # not the index written with this labels.json: an old one kept beside new shards
    return read_index(data, source, labels=len(vocabulary.labels), shard_bytes=entry["bytes"],
                      samples=entry.get("samples"), max_image_bytes=MAX_IMAGE_BYTES, limit=MAX_INDEX_BYTES)


def _local_current(source: Path, paths: list, sizes: list) -> bool:
    """Whether no local shard changed after the index (size, modification time)."""
    if not Path(source).is_file():
        return False
    written = Path(source).stat().st_mtime_ns
    stats = [Path(path).stat() for path in paths]
    return all(st.st_size == size and st.st_mtime_ns <= written for st, size in zip(stats, sizes))


def _remote_current(source: str, paths: list, sizes: list) -> bool:
    """Whether no shard on the server changed after the index: its size (Content-Range or
    Content-Length) as labels.json says, and, where the server gives Last-Modified, not newer
    than the index. Asked with one-byte ranges, :data:`PROBES` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(url):
        try:
            return probe(url)
        except FetchError:
            return None, None  # unknown: scanned, and the scan says what is wrong
    with ThreadPoolExecutor(PROBES) as pool:
        (_, written), *shards = list(pool.map(ask, [source, *paths]))
    return all(size == expected and (written is None or modified is None or modified <= written)
               for (size, modified), expected in zip(shards, sizes))


class ShardMembers(Sequence):
    """Where each image of a split lies, as arrays (about 20 bytes an image, not a Python tuple
    and string per image): item i is (shard, offset, size)."""

    def __init__(self, shards: list[str], shard_of: np.ndarray, offset: np.ndarray, size: np.ndarray):
        self.shards, self.shard_of, self.offset, self.size = shards, shard_of, offset, size

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        return self.shards[self.shard_of[i]], int(self.offset[i]), int(self.size[i])

    def subset(self, index) -> "ShardMembers":
        index = np.asarray(index, np.int64)
        return ShardMembers(self.shards, self.shard_of[index], self.offset[index], self.size[index])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class ShardPaths(Sequence):
    """``SHARD#KEY`` names of a split's images, made when asked for (keys kept as bytes)."""

    def __init__(self, shards: list[str], shard_of: np.ndarray, keys: np.ndarray):
        # keys as UTF-8 bytes (a third of the memory of NumPy's 4-byte characters for ASCII keys)
        self.shards, self.shard_of = shards, shard_of
        self.keys = np.char.encode(keys, "utf-8") if keys.dtype.kind == "U" else keys

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        return f"{self.shards[self.shard_of[i]]}#{self.keys[i].decode('utf-8')}"

    def subset(self, index) -> "ShardPaths":
        index = np.asarray(index, np.int64)
        return ShardPaths(self.shards, self.shard_of[index], self.keys[index])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def read_wds_table(root, spec: str, *, labels: Sequence[str] | None = None,
                   skip_bad: bool = False, skipped: list | None = None) -> LabelTable:
    """A split of WebDataset shards as a :class:`LabelTable` with sparse targets (index lists:
    memory grows with the listed labels, not images x labels): ``paths`` are ``SHARD#KEY``,
    ``members`` the (shard, offset, size) of each image.

    A split written by ``mlabel.data shard`` is read from its index (written with the shards):
    nothing is scanned at start-up. Other shards are scanned once (tar headers and the JSON
    members): a truncated shard, a sample without JSON or image, or a label outside the
    vocabulary raise a :class:`DataError` naming shard and key; with ``skip_bad`` they are left out
    and listed in ``skipped`` (split, where, reason)."""
    vocabulary = read_vocabulary(root)
    names = list(labels) if labels is not None else vocabulary.labels
    known = set(vocabulary.labels)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"labels {unknown} are not in the shards' vocabulary {vocabulary.path}")
    kept = np.full(len(vocabulary.labels), -1, np.int64)  # vocabulary index -> the table's label (-1: not used)
    where = {n: j for j, n in enumerate(vocabulary.labels)}
    kept[[where[n] for n in names]] = np.arange(len(names))
    paths = shard_files(root, spec, vocabulary)
    arrays, problems = _load_index(root, spec, vocabulary, paths), []
    if arrays is None:
        sizes = vocabulary.splits.get(spec, {}).get("bytes")
        arrays, problems = _scan_split(paths, vocabulary, sizes if sizes and len(sizes) == len(paths) else None)
    if problems and not skip_bad:
        shown = "\n  ".join(f"{where}: {reason}" for where, reason in problems[:20])
        raise DataError(f"{len(problems)} problems in the shards of split {spec!r}:\n  {shown}\n"
                        "Rewrite the shards (python -m mlabel.data shard), or set data.on_bad_image=skip to "
                        "train without these samples (counted and listed in skipped.csv)")
    if skipped is not None:
        skipped += [(spec, where, reason) for where, reason in problems]
    n = len(arrays["key"])
    if not n:
        raise DataError(f"the shards of split {spec!r} under {root} hold no usable sample")

    def pairs(kind):
        rows, labels = arrays[f"{kind}_rows"], kept[arrays[f"{kind}_labels"]]
        return rows[labels >= 0], labels[labels >= 0]
    targets = SparseLabels.from_pairs(*pairs("pos"), n, len(names), *pairs("other"),
                                      default=0.0 if vocabulary.default == "negative" else -1.0)
    shards = [str(p) for p in paths]
    members = ShardMembers(shards, arrays["shard"], arrays["offset"], arrays["size"])
    return LabelTable(ShardPaths(shards, arrays["shard"], arrays["key"]), targets, names, f"{root}/{spec}",
                      members=members)


class NamedBytes(io.BytesIO):
    """Image bytes that print as where they came from (``SHARD#KEY``) in error messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def member_bytes(member: tuple[str, int, int], name: str) -> bytes:
    """The bytes at (shard, offset, size): a seek in a file, a range request to a URL."""
    shard, offset, size = member
    if is_url(shard):
        data = fetch_range(shard, offset, size)
    else:
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as err:
            raise DataError(f"cannot read {name}: {err}") from None
    if len(data) != size:
        raise DataError(f"cannot read {name}: the shard ends inside the image; rewrite the shard")
    return data


def read_member(member: tuple[str, int, int], name: str, draft: int | None = None) -> np.ndarray:
    """Decode the image at (shard, offset, size) to (H, W, 3) uint8 RGB."""
    return read_rgb(NamedBytes(member_bytes(member, name), name), draft=draft)


def shard_image_bytes(name: str) -> bytes | None:
    """The image bytes of ``SHARD#KEY`` (as wds tables name their images, in predictions and the
    report) by a scan of the shard, or None when ``name`` is not such a path."""
    shard, sep, key = name.partition(".tar#")  # a key may hold "#" (and the folder too, rarely ".tar#")
    shard += ".tar"
    if not sep or not (is_url(shard) or Path(shard).is_file()):
        return None
    stream = None
    try:
        stream = open_url(shard, limit=MAX_SHARD_BYTES) if is_url(shard) else None
        with tarfile.open(fileobj=stream, mode="r|") if stream else tarfile.open(shard, "r:") as tar:
            for info in tar:
                if info.isfile() and info.size <= MAX_IMAGE_BYTES and \
                        _split_key(info.name) in ((key, ext) for ext in IMAGE_TYPES):
                    return tar.extractfile(info).read()
    except (DataError, tarfile.TarError, EOFError, OSError, ValueError):
        return None
    finally:
        if stream is not None:
            stream.close()
    return None


# ---------------------------------------------------------------- writing


def _fingerprint(splits, shard_size: int) -> str:
    digest = hashlib.sha256(json.dumps([splits.labels, shard_size]).encode())
    for name in ("train", "val", "test"):
        table = getattr(splits, name)
        if table is not None:
            digest.update(name.encode() + json.dumps(list(table.paths)).encode())
            parts = (table.targets.pos_ptr, table.targets.pos_idx, table.targets.other_ptr, table.targets.other_idx,
                     np.float32(table.targets.default)) if table.sparse else (table.targets,)
            for part in parts:  # the targets as they are held: no dense copy of a sparse table
                digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the same source writes the same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _sample_json(table: LabelTable, row: int, root: Path) -> bytes:
    target = table.target_rows(row)
    path = Path(table.paths[row])
    try:
        path = path.relative_to(root)
    except ValueError:
        pass
    return json.dumps({"labels": [table.labels[j] for j in np.flatnonzero(target == 1)],
                       "unknown": [table.labels[j] for j in np.flatnonzero(target < 0)],
                       "path": path.as_posix()}).encode()


def _write_shard(path: Path, table: LabelTable, rows: range, root: Path, check: Callable) -> list:
    """One shard, atomically; returns the (path, reason) of the images ``check`` refused."""
    bad = []
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            source = table.paths[row]
            problem = check(source)
            if problem is not None:
                bad.append((source, problem))
                continue
            ext = Path(source).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            key = f"{row:09d}"
            _tar_member(tar, f"{key}.{ext if ext in IMAGE_TYPES else 'img'}", Path(source).read_bytes())
            _tar_member(tar, f"{key}.json", _sample_json(table, row, root))
    return bad


def _write_index(out: Path, name: str, shards: list[str], tree: dict) -> dict:
    """The split's index beside its shards (``SPLIT.index.npz``): what a reader would learn by
    scanning them, so that no reader has to; returned: its entry in ``labels.json`` (the index
    file, its size and SHA-256, and the shards' sizes: what tells a stale index, also over HTTP)."""
    vocabulary = Vocabulary(out / VOCABULARY, tree["labels"], tree["default"], {})
    arrays, problems = _scan_split([out / f for f in shards], vocabulary)
    if problems:
        raise DataError(f"the shards just written do not read back: {problems[0][0]}: {problems[0][1]}")
    file, buffer = f"{name}.index.npz", io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    with atomic_path(out / file) as tmp:
        tmp.write_bytes(data)
    return {"index": file, "index_bytes": len(data), "index_sha256": hashlib.sha256(data).hexdigest(),
            "bytes": [(out / f).stat().st_size for f in shards]}


def write_shards(splits, out: Path, shard_size: int, root: Path, *, skip_bad: bool = False,
                 log=print, check: Callable[[str], str | None] | None = None) -> dict:
    """Every split as ``out/SPLIT-000000.tar`` ... of ``shard_size`` samples, and ``out/labels.json``.

    Each shard is written to a temporary name and renamed; a progress file records the finished
    ones, so an interrupted run (kill -9, disk full) started again writes only what is missing,
    and ``labels.json``, written last, marks the set complete. A folder holding shards of another
    source is refused. Unreadable images fail (naming them) or, with ``skip_bad``, are left out
    and listed in the result. The folder is locked while it is written (as a training locks its
    run directory): a second writer into it stops at once, naming the first."""
    from .check import _problem
    out.mkdir(parents=True, exist_ok=True)
    with hold_run_dir(out, "mlabel data shard"):
        return _write_locked(splits, out, shard_size, root, skip_bad, log, check or _problem)


def _read_record(path: Path) -> dict:
    """labels.json or the progress file of an earlier writer, as a JSON object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"cannot read {path} ({str(err)[:200]}); give an empty --out folder") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} is not what mlabel data shard writes; give an empty --out folder")
    return record


def _write_locked(splits, out: Path, shard_size: int, root: Path, skip_bad: bool, log, check) -> dict:
    fingerprint = _fingerprint(splits, shard_size)
    progress_path, vocab_path = out / PROGRESS, out / VOCABULARY
    if vocab_path.is_file():
        done = _read_record(vocab_path)
        if done.get("fingerprint") == fingerprint:
            log(f"{out} already holds these shards (labels.json is complete); nothing to do")
            return done
        raise DataError(f"{out} already holds shards of another source or shard size; give an empty --out folder")
    progress = _read_record(progress_path) if progress_path.is_file() else {"fingerprint": fingerprint, "done": {}}
    if progress.get("fingerprint") != fingerprint or not isinstance(progress.get("done"), dict):
        raise DataError(f"{progress_path} records shards of another source or shard size; give an empty --out "
                        "folder (or delete that folder to start over)")
    tree = {"labels": splits.labels, "task": splits.task, "default": "negative", "splits": {},
            "fingerprint": fingerprint, "skipped": []}
    for name in ("train", "val", "test"):
        table = getattr(splits, name)
        if table is None:
            continue
        shards, counts = [], []
        for number, start in enumerate(range(0, len(table), shard_size)):
            file = f"{name}-{number:06d}.tar"
            rows = range(start, min(start + shard_size, len(table)))
            if file not in progress["done"] or not (out / file).is_file():
                bad = _write_shard(out / file, table, rows, root, check)
                if bad and not skip_bad:
                    (out / file).unlink()
                    raise DataError(f"{len(bad)} images of split {name} cannot be used, e.g. {bad[0][1]}; replace "
                                    "them, or set data.on_bad_image=skip to leave them out of the shards (listed)")
                progress["done"][file] = {"samples": len(rows) - len(bad), "skipped": [list(b) for b in bad]}
                write_json(progress_path, progress)
                log(f"wrote {out / file} ({progress['done'][file]['samples']} samples)")
            shards.append(file)
            counts.append(progress["done"][file]["samples"])
            tree["skipped"] += [[name, *b] for b in progress["done"][file]["skipped"]]
        tree["splits"][name] = {"shards": shards, "samples": counts, **_write_index(out, name, shards, tree)}
    write_json(vocab_path, tree)
    progress_path.unlink()
    return tree


# ---------------------------------------------------------------- streaming


def stream_plan(shard_sizes: Sequence[int], order: Sequence[int], batch_size: int, rank: int, world: int,
                worker: int, workers: int) -> tuple[int, int, list[int], int]:
    """Which samples worker ``worker`` of rank ``rank`` streams in an epoch whose shard order is
    ``order``: (first, stop) positions in the epoch's sequence of samples (the shards
    concatenated in that order), the sizes of its batches, and the steps every rank takes.

    The N samples are cut into ``world`` contiguous ranges of N // W or N // W + 1 samples; every
    rank takes the same number of steps S = ceil(ceil(N / W) / batch_size) (at most N // W, so no
    batch is empty: batch_size 1 with N mod W > 0 then gives some batches of 2) with batches as
    even as possible, so no sample is dropped or repeated and DDP never waits on a rank that ran
    out. A DataLoader takes batch k from worker k mod workers, so worker w streams the
    contiguous run of samples of the batches w, w + workers, ..."""
    total = int(sum(shard_sizes[s] for s in order))
    if total < world:
        raise DataError(f"{total} samples cannot feed {world} processes: give more data or fewer processes")
    start, stop = rank * total // world, (rank + 1) * total // world
    steps = min(math.ceil(math.ceil(total / world) / batch_size), total // world)
    mine = stop - start
    sizes = [mine // steps + (k < mine % steps) for k in range(steps)]
    before = sum(sum(sizes[k] for k in range(w, steps, workers)) for w in range(worker))
    own = [sizes[k] for k in range(worker, steps, workers)]
    return start + before, start + before + sum(own), own, steps


class ShardStream(IterableDataset):
    """Batches of a :class:`LabelTable` read from its shards: each epoch a seeded shard order, a
    contiguous range of it per rank and loader worker (:func:`stream_plan`: every sample exactly
    once across ranks and workers), samples read in shard order and mixed in a seeded shuffle
    buffer, each image's augmentation seeded by its place in the epoch (the same after a resume).
    ``skip_steps`` (a resume inside an epoch) skips the first steps' samples without decoding them.
    """

    def __init__(self, table: LabelTable, transform, batch_size: int, *, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, skip_bad: bool = False, collate=None, batch_images=None):
        if table.members is None:
            raise ValueError("a ShardStream reads tables of wds shards")
        self.table, self.transform, self.batch_size = table, transform, batch_size
        # data.augment_on=device: a BatchImages loads whole batches (uint8 squares, or JPEG bytes
        # to decode on the GPU) and the training process finishes them on the device
        self.batch_images = batch_images
        self.rank, self.world, self.shuffle_buffer, self.skip_bad = rank, world, shuffle_buffer, skip_bad
        self.collate = collate
        order = np.argsort(table.members.shard_of, kind="stable")  # rows grouped by shard, in table order
        bounds = np.flatnonzero(np.diff(table.members.shard_of[order])) + 1
        self.shard_rows = [part for part in np.split(order, bounds) if len(part)]
        self.epoch_seed, self.skip_steps = 0, 0

    def __len__(self) -> int:  # this rank's samples
        total = len(self.table)
        return (self.rank + 1) * total // self.world - self.rank * total // self.world

    @property
    def steps(self) -> int:
        return stream_plan([len(r) for r in self.shard_rows], range(len(self.shard_rows)), self.batch_size,
                           0, self.world, 0, 1)[3]

    def epoch_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's rows, shard after shard in its seeded shard order, and that order."""
        order = np.random.default_rng(self.epoch_seed).permutation(len(self.shard_rows))
        return np.concatenate([self.shard_rows[s] for s in order]), order

    def worker_rows(self, worker: int, workers: int) -> tuple[list[tuple[int, int]], list[int]]:
        """((position in the epoch, row) in the order this worker emits them, its batch sizes)."""
        rows, order = self.epoch_rows()
        first, stop, sizes, _ = stream_plan([len(r) for r in self.shard_rows], order, self.batch_size,
                                            self.rank, self.world, worker, workers)
        mine = rows[first:stop]
        rng = np.random.default_rng([self.epoch_seed, self.rank, worker])
        buffer, emitted = [], []
        for position, row in enumerate(mine):  # a shuffle buffer: what streaming sees, not a full permutation
            buffer.append((first + position, int(row)))
            if len(buffer) >= self.shuffle_buffer:
                emitted.append(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            emitted.append(buffer.pop(int(rng.integers(len(buffer)))))
        return emitted, sizes

    def __iter__(self):
        """Called in the worker (or, without workers, when the loader's iterator is made): the
        epoch's seed and skip are taken now, not when the first batch is asked for."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # the loader asks worker 0 first: after a resume at step k it plays the part of the worker
        # that served batch k, so every batch holds the samples it held in the uninterrupted epoch
        worker = (worker + self.skip_steps) % workers
        emitted, sizes = self.worker_rows(worker, workers)
        skip = len(range(worker, self.skip_steps, workers))  # this worker's batches already trained
        return self._batches(emitted, sizes, skip)

    def sample(self, row: int, position: int, image: np.ndarray):
        """(image tensor, targets) of table row ``row``, augmented with the seed of its place in the epoch."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(self._seed(position))
        return self.transform(image=image)["image"], self.table.model_targets(row)

    def _seed(self, position: int) -> int:
        return int(np.random.default_rng([self.epoch_seed, position]).integers(2**31))

    def _batches(self, emitted: list, sizes: list[int], skip: int):
        start = sum(sizes[:skip])
        for size in sizes[skip:]:
            chunk, start = emitted[start:start + size], start + size
            if self.batch_images is not None:
                yield from self._whole_batch(chunk)
                continue
            samples, problems = [], []
            for position, row in chunk:
                try:
                    image = read_member(self.table.members[row], self.table.paths[row])
                except DataError as err:
                    if not self.skip_bad:
                        yield StreamProblem(str(err))
                        return
                    problems.append((self.table.paths[row], str(err)))
                    continue
                samples.append(self.sample(row, position, image))
            if problems:
                yield StreamProblem(None, problems)
            if samples:
                yield self.collate(samples)

    def _whole_batch(self, chunk: list):
        """One batch through ``batch_images`` (seeded per place in the epoch, like the per-image
        path); a batch that fails is loaded image by image to find the bad ones (left out and
        reported with ``skip_bad``, else the first one stops training)."""
        items = [(row, self._seed(position)) for position, row in chunk]
        try:
            yield self.batch_images.load(items)
            return
        except DataError:
            pass
        good, problems = [], []
        for item in items:
            try:
                self.batch_images.load([item])
                good.append(item)
            except DataError as err:
                if not self.skip_bad:
                    yield StreamProblem(str(err))
                    return
                problems.append((self.table.paths[item[0]], str(err)))
        yield StreamProblem(None, problems)
        if good:
            yield self.batch_images.load(good)


def _as_is(batch):
    """The stream's batches are made in the worker: passed on unchanged (no conversion of NumPy arrays)."""
    return batch


@dataclass
class StreamProblem:
    """A worker's message to the training process: a fatal problem, or samples it skipped."""
    message: str | None
    skipped: list | None = None


class ShardLoader:
    """The training loader over a :class:`ShardStream`: ``len()`` is the steps per epoch (equal on
    every rank); reseeding ``generator`` before an epoch fixes its shard order, shuffle and
    augmentation, as for the file loaders. Problems found in a worker are raised here as one
    :class:`DataError`; skipped samples are counted in ``skipped``."""

    def __init__(self, stream: ShardStream, *, num_workers: int, seed: int, pin_memory: bool = False,
                 finish: Callable | None = None):
        self.dataset, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.finish = finish  # (batch of the stream's BatchImages) -> (images, targets) on the device
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped: list = []

    def __len__(self) -> int:
        return self.dataset.steps

    def __iter__(self):
        self.dataset.epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False)
        batches = iter(loader)  # the workers (or the dataset's iterator) take the seed and skip now
        self.dataset.skip_steps = 0  # a resume's skip applies to the epoch it was set for
        for item in batches:
            if isinstance(item, StreamProblem):
                if item.message is not None:
                    raise DataError(item.message + "; rewrite that shard, or set data.on_bad_image=skip")
                self.skipped += item.skipped
                continue
            yield item if self.finish is None else self.finish(item)
