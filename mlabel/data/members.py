"""Where the images of a WebDataset split lie inside its shards, and reading one: what a
:class:`~mlabel.data.tables.LabelTable` of shards needs to read its own bytes (kept out of
:mod:`mlabel.data.shards`, which builds such tables, so that the two do not import each other)."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..preprocess import read_rgb
from .http import fetch_range, is_url

__all__ = ["NamedBytes", "ShardMembers", "ShardPaths", "member_bytes", "read_member"]


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


class NamedBytes(io.BytesIO):
    """Image bytes that print as where they came from (``SHARD#KEY``) in error messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__  # PIL names the file object with %r in "cannot identify image file ..."


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
