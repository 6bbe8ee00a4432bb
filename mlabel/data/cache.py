"""Decoded-image cache: every image of a split decoded once, reduced to the model's square
(:func:`mlabel.preprocess.resize_square`) and stored as uint8 in a memory-mapped file.

The file is keyed by the images' bytes and the resize settings (side, mode, interpolation), so
changing either builds a new one; it is written to a temporary name and renamed when complete,
so an interrupted build is never read. The build decodes every image, so it doubles as the
check for unreadable files (``bad``), recorded beside the map. Later epochs and runs read
slices of the map instead of decoding JPEGs. Evaluation from the cache gives the same pixels
as from the files.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from ..io import write_text
from ..preprocess import cache_side, read_rgb, resize_square
from .tables import LabelTable

__all__ = ["DecodedCache", "default_cache_dir"]

KEY_FIELDS = ("resize", "interpolation")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlabel"


def _key(paths: list[str], preprocessing: dict) -> str:
    digest = hashlib.blake2b(digest_size=16)
    settings = {"side": cache_side(preprocessing), **{k: preprocessing.get(k) for k in KEY_FIELDS}}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _reserve(handle, size: int) -> None:
    """Give the open file ``size`` bytes. Where the OS can (Linux: ``posix_fallocate``) every block
    is reserved now, so a full disk fails here and not later as SIGBUS on the memory map; elsewhere
    (macOS, Windows) the file is sized after the free-space check, which is what they offer."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        handle.truncate(size)
        return
    try:
        fallocate(handle.fileno(), 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: size the file
            raise
        handle.truncate(size)


class DecodedCache:
    """``cache[i]``: the (side, side, 3) uint8 square of ``table.paths[i]``.

    Building the cache is also the check of every image: a file that does not decode is
    recorded in ``bad`` as (path, reason) (its square stays black) and in a ``.json`` beside the
    map, so a later run knows it without decoding anything. ``without(rows)`` drops table rows
    (the skipped images) and keeps the map: ``rows`` maps each table row to its square.
    """

    def __init__(self, table: LabelTable, preprocessing: dict, folder: str | Path | None = None,
                 workers: int = 4, quiet: bool = False):
        self.side = cache_side(preprocessing)
        folder = Path(folder) if folder else default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.key = _key(table.paths, preprocessing)
        self.path = folder / f"{self.key}.u8"
        shape = (len(table.paths), self.side, self.side, 3)
        bad = self._valid_record(shape)
        self.built = bad is None
        if self.built:
            self._build(table.paths, preprocessing, shape, workers, quiet)
            bad = self._valid_record(shape)
        self.bad = [(table.paths[i], reason) for i, reason in bad]
        self.images = np.memmap(self.path, dtype=np.uint8, mode="r", shape=shape)
        self.rows = np.arange(len(table.paths))

    def _valid_record(self, shape) -> list | None:
        """The unreadable images recorded with a complete cache, or None when the cache is missing,
        truncated or its record damaged (then it is built again)."""
        record = self.path.with_suffix(".json")
        if not self.path.is_file():
            return None
        try:
            saved = json.loads(record.read_text())
            bad = [(int(i), str(reason)) for i, reason in saved["bad"]]
            complete = saved["images"] == shape[0] and self.path.stat().st_size == int(np.prod(shape))
        except (OSError, ValueError, KeyError, TypeError):
            complete = False
        if not complete or any(not 0 <= i < shape[0] for i, _ in bad):
            print(f"warning: the cache {self.path} is incomplete or damaged; building it again", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return None
        return bad

    def _build(self, paths, preprocessing, shape, workers: int, quiet: bool) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        size = int(np.prod(shape))
        free = shutil.disk_usage(self.path.parent).free
        if size > free:
            raise DataError(f"data.cache: the cache of {shape[0]} images needs {size / 2**30:.2f} GiB, "
                            f"{self.path.parent} has {free / 2**30:.2f} GiB free; free space, set "
                            "data.cache_dir to a larger disk, or data.cache=false")
        try:
            with open(tmp, "wb") as handle:
                _reserve(handle, max(size, 1))
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DataError(f"data.cache: cannot reserve {size / 2**30:.2f} GiB in {self.path.parent} "
                            f"({err.strerror}); free space or set data.cache_dir elsewhere") from None
        out = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)

        def put(i: int) -> str | None:
            try:
                out[i] = resize_square(read_rgb(paths[i]), preprocessing)
            except DataError as err:
                return str(err)
            return None

        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                reasons = list(tqdm(pool.map(put, range(len(paths))), total=len(paths), desc="decoding into cache",
                                    unit="img", disable=quiet or not sys.stderr.isatty(), leave=False))
            out.flush()
            bad = [(i, reason) for i, reason in enumerate(reasons) if reason is not None]
            write_text(self.path.with_suffix(".json"), json.dumps({"images": len(paths), "bad": bad}))
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[self.rows[index]]

    def without(self, keep: np.ndarray) -> "DecodedCache":
        """The same map for the table rows ``keep`` (in that order)."""
        subset = copy.copy(self)
        subset.rows = self.rows[keep]
        return subset
