"""Label tables that grow with the positives, not with images x labels (issue 19).

A web-scale tagger has millions of images and ten thousand labels but about ten positives per
image: a dense ``(N, L)`` float32 table is 40 GB at 10^6 x 10^4, the positives 40 MB. A
:class:`SparseLabels` holds, per image, the indices of its positive labels and of its labels
that differ from a data-set-wide ``default`` for the rest (negative, or unknown for partial-label
data such as OpenImages', whose verified negatives are then the listed exceptions), in CSR form.
Dense rows exist only per batch (:meth:`SparseLabels.dense`).

Everything the trainer derives from the whole table works on the lists: label counts
(:meth:`SparseLabels.counts`), ``pos_weight`` (:func:`sparse_pos_weight`) and the split
(:func:`sparse_split`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["SparseLabels", "sparse_pos_weight", "sparse_split", "unique_sorted", "DENSE_SPLIT_LIMIT"]

POSITIVE, NEGATIVE, UNKNOWN = 1.0, 0.0, -1.0
DENSE_SPLIT_LIMIT = 5 * 10**7  # images x labels up to which the split is the iterative-stratified one


def _pairs(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lists of label indices -> (image, label) pairs."""
    lengths = [len(items) for items in lists]
    labels = np.concatenate([np.asarray(items, np.int64).reshape(-1) for items in lists]) if lists else np.zeros(0, np.int64)
    return np.repeat(np.arange(len(lists)), lengths), labels


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of an integer array by a sort: NumPy 2.4's hashing unique takes 100x longer
    on 10^6 wide int64 keys (1.5 s against 0.015 s)."""
    ordered = np.sort(values)
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])] if len(ordered) else ordered


@dataclass
class SparseLabels:
    """``(N, L)`` targets as index lists: ``positive`` per image, ``other`` (the labels whose value
    is neither positive nor ``default``: unknown when the default is negative, negative when the
    default is unknown), and ``default`` for every label not listed.

    ``pos_ptr``/``pos_idx`` and ``other_ptr``/``other_idx`` are CSR: image i's positives are
    ``pos_idx[pos_ptr[i]:pos_ptr[i + 1]]``. Memory is 4 bytes per listed label and 8 per image.
    """

    num_labels: int
    pos_ptr: np.ndarray
    pos_idx: np.ndarray
    other_ptr: np.ndarray
    other_idx: np.ndarray
    default: float = NEGATIVE

    def __post_init__(self):
        if self.default not in (NEGATIVE, UNKNOWN):
            raise ValueError(f"default must be 0 (negative) or -1 (unknown), got {self.default!r}")
        for name, ptr, idx in (("positive", self.pos_ptr, self.pos_idx), ("other", self.other_ptr, self.other_idx)):
            if len(ptr) != len(self.pos_ptr) or ptr[0] != 0 or ptr[-1] != len(idx) or (np.diff(ptr) < 0).any():
                raise ValueError(f"{name} lists: malformed offsets")
            if len(idx) and (idx.min() < 0 or idx.max() >= self.num_labels):
                raise ValueError(f"{name} lists name a label outside 0..{self.num_labels - 1}")

    @property
    def other_value(self) -> float:
        return UNKNOWN if self.default == NEGATIVE else NEGATIVE

    @classmethod
    def from_lists(cls, positives: Sequence[Sequence[int]], num_labels: int, others: Sequence[Sequence[int]] | None = None,
                   default: float = NEGATIVE) -> "SparseLabels":
        """From per-image lists of label indices. A label both positive and in ``others`` is
        positive (as the dense readers treat a label that is both listed and unknown)."""
        if others is not None and len(others) != len(positives):
            raise ValueError(f"{len(others)} lists of others for {len(positives)} images")
        other_pairs = _pairs(others) if others is not None else (None, None)
        return cls.from_pairs(*_pairs(positives), len(positives), num_labels, *other_pairs, default=default)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, labels: np.ndarray, num_images: int, num_labels: int,
                   other_rows: np.ndarray | None = None, other_labels: np.ndarray | None = None,
                   default: float = NEGATIVE) -> "SparseLabels":
        """From (image, label) pairs of positives (and of the others), in any order, repeats
        allowed: sorted by image, then label, without repeats, in O(pairs log pairs)."""
        def csr(r, c):
            r, c = np.asarray(r, np.int64), np.asarray(c, np.int64)
            if len(r) and (r.min() < 0 or r.max() >= num_images or c.min() < 0 or c.max() >= num_labels):
                raise ValueError(f"a pair outside images 0..{num_images - 1} and labels 0..{num_labels - 1}")
            key = unique_sorted(r * num_labels + c)
            counts = np.bincount(key // num_labels, minlength=num_images)
            return np.concatenate([[0], np.cumsum(counts)]), (key % num_labels).astype(np.int32), key
        pos_ptr, pos_idx, pos_key = csr(rows, labels)
        if other_rows is None:
            other_rows = other_labels = np.zeros(0, np.int64)
        _, _, other_key = csr(other_rows, other_labels)
        other_key = np.setdiff1d(other_key, pos_key, assume_unique=True)  # positive wins
        other_ptr = np.concatenate([[0], np.cumsum(np.bincount(other_key // num_labels, minlength=num_images))])
        return cls(int(num_labels), pos_ptr, pos_idx, other_ptr, (other_key % num_labels).astype(np.int32), float(default))

    @classmethod
    def from_dense(cls, targets: np.ndarray, default: float = NEGATIVE) -> "SparseLabels":
        """From a dense ``(N, L)`` table of 1 / 0 / -1."""
        targets = np.asarray(targets)
        other = UNKNOWN if default == NEGATIVE else NEGATIVE
        return cls.from_pairs(*np.nonzero(targets == POSITIVE), len(targets), targets.shape[1],
                              *np.nonzero(targets == other), default=default)

    def __len__(self) -> int:
        return len(self.pos_ptr) - 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.pos_ptr, self.pos_idx, self.other_ptr, self.other_idx))

    def _gather(self, ptr: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row position within ``rows``, label) of every listed entry of ``rows``."""
        starts, stops = ptr[rows], ptr[rows + 1]
        lengths = stops - starts
        where = np.repeat(np.arange(len(rows)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return where, idx[np.repeat(starts, lengths) + offsets]

    def dense(self, rows) -> np.ndarray:
        """The ``(len(rows), L)`` float32 targets of ``rows`` (one batch)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.full((len(rows), self.num_labels), self.default, np.float32)
        out[self._gather(self.other_ptr, self.other_idx, rows)] = self.other_value
        out[self._gather(self.pos_ptr, self.pos_idx, rows)] = POSITIVE
        return out

    def subset(self, rows) -> "SparseLabels":
        rows = np.asarray(rows, np.int64).reshape(-1)
        parts = []
        for ptr, idx in ((self.pos_ptr, self.pos_idx), (self.other_ptr, self.other_idx)):
            _, labels = self._gather(ptr, idx, rows)
            parts += [np.concatenate([[0], np.cumsum(ptr[rows + 1] - ptr[rows])]), labels]
        return SparseLabels(self.num_labels, *parts, default=self.default)

    def counts(self) -> dict[str, np.ndarray]:
        """Per label: ``positive``, ``negative`` and ``unknown`` image counts."""
        positive = np.bincount(self.pos_idx, minlength=self.num_labels).astype(np.int64)
        other = np.bincount(self.other_idx, minlength=self.num_labels).astype(np.int64)
        rest = len(self) - positive - other
        if self.default == NEGATIVE:
            return {"positive": positive, "negative": rest, "unknown": other}
        return {"positive": positive, "negative": other, "unknown": rest}

    def rows(self, index) -> np.ndarray:
        """Dense rows as ``dense_table[index]`` gives them, for an index over images: an int
        (negative from the end) gives (L,); a slice, a boolean mask of every image or an integer
        array of any shape gives that shape + (L,). Anything else (floats, a label index in a
        tuple, None, ...) and indices out of range raise IndexError."""
        n = len(self)
        if isinstance(index, slice):
            return self.dense(np.arange(n)[index])
        if isinstance(index, (tuple, bool, np.bool_)) or index is None or index is Ellipsis:
            raise IndexError(f"rows takes one index over the {n} images (an int, a slice, a boolean mask or "
                             f"integer array), not {index!r}; take labels from the rows it returns")
        index = np.asarray(index)
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise IndexError(f"a boolean mask over rows needs one entry per image ({n}), not shape {index.shape}")
            return self.dense(np.flatnonzero(index))
        if index.size == 0 and index.ndim == 1:  # [] reads as float64: no rows
            index = index.astype(np.int64)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"rows are indexed by integers, slices or boolean masks, not {index.dtype} values")
        outside = (index < -n) | (index >= n)
        if outside.any():
            raise IndexError(f"row index {index[outside].flat[0]} is out of range: the table has {n} rows (images)")
        rows = np.where(index < 0, index + n, index).astype(np.int64)
        return self.dense(rows.reshape(-1)).reshape(index.shape + (self.num_labels,))

    def reorder(self, order: Sequence[int]) -> "SparseLabels":
        """The table with its labels in ``order`` (new label j = old label ``order[j]``)."""
        order = np.asarray(order, np.int64)
        if sorted(order.tolist()) != list(range(self.num_labels)):
            raise ValueError("order must be a permutation of the labels")
        new_of_old = np.empty(self.num_labels, np.int32)
        new_of_old[order] = np.arange(self.num_labels, dtype=np.int32)
        n = len(self)
        pos = self._gather(self.pos_ptr, self.pos_idx, np.arange(n))
        other = self._gather(self.other_ptr, self.other_idx, np.arange(n))
        return SparseLabels.from_pairs(pos[0], new_of_old[pos[1]], n, self.num_labels, other[0],
                                       new_of_old[other[1]], default=self.default)

    def positives_per_image(self) -> np.ndarray:
        return np.diff(self.pos_ptr)


def sparse_pos_weight(labels: SparseLabels, cap: float = 10.0, names: Sequence[str] | None = None):
    """Per label, negatives / positives among the images where it is known, bounded, from the
    counts: :func:`mlabel.losses.pos_weight_from_targets` without the dense table."""
    from ..losses import pos_weight_from_counts
    counts = labels.counts()
    return pos_weight_from_counts(torch.from_numpy(counts["positive"]), torch.from_numpy(counts["negative"]), cap, names)


def sparse_split(labels: SparseLabels, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """A fold per image. Up to :data:`DENSE_SPLIT_LIMIT` images x labels, the seeded
    iterative-stratified split of :func:`mlabel.data.split.iterative_split` (on the dense table).
    Past it, a scalable stratification: images are taken in the order of their rarest positive
    label (ties shuffled, images without positives last), and assigned round-robin within each
    label's run by a golden-ratio (low-discrepancy) sequence weighted by ``fractions``: the images
    whose rarest label is a given label are divided among the folds in proportion to within a
    few images, and the more frequent labels as a random split divides them, in O(positives + N
    log N) time and O(N + positives) memory.
    """
    fractions = np.asarray(fractions, np.float64)
    n = len(labels)
    if n * labels.num_labels <= DENSE_SPLIT_LIMIT:
        from .split import iterative_split
        return iterative_split(labels.dense(np.arange(n)), list(fractions), seed)
    rng = np.random.default_rng(seed)
    frequency = np.bincount(labels.pos_idx, minlength=labels.num_labels)
    where, label = labels._gather(labels.pos_ptr, labels.pos_idx, np.arange(n))
    rarest = np.full(n, labels.num_labels, np.int64)  # images without positives sort last
    rank = np.argsort(np.argsort(frequency, kind="stable"), kind="stable")  # 0 = rarest label
    np.minimum.at(rarest, where, rank[label])
    order = np.lexsort((rng.random(n), rarest))
    cumulative = np.cumsum(fractions / fractions.sum())
    phase = (np.arange(n) + rng.random()) * 0.6180339887498949 % 1.0  # golden-ratio sequence
    folds = np.empty(n, np.int64)
    folds[order] = np.searchsorted(cumulative, phase, side="right").clip(0, len(fractions) - 1)
    return folds
