"""Reading WebDataset shards: the vocabulary (``labels.json``), a split's shards from its index
or by a scan, as a :class:`~mlabel.data.tables.LabelTable`, and one image by its ``SHARD#KEY`` name."""
from __future__ import annotations

import glob
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ...errors import DataError
from ...labelnames import check_label_names
from ..http import FetchError, fetch, is_url, open_url, probe, same_host
from .index import read_index
from ..sparse import SparseLabels
from ..tables import LabelTable
from ..members import ShardMembers, ShardPaths

__all__ = ["IMAGE_TYPES", "VOCABULARY", "Vocabulary", "expand_braces", "read_vocabulary", "read_wds_table",
           "shard_files", "shard_image_bytes"]

VOCABULARY = "labels.json"
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm")
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


def scan_split(paths: list, vocabulary: Vocabulary, shard_bytes: list | None = None) -> tuple[dict, list]:
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
        arrays, problems = scan_split(paths, vocabulary, sizes if sizes and len(sizes) == len(paths) else None)
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
