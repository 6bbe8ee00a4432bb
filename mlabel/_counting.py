"""The counting core shared by the metrics, the threshold tuner and the report.

Every ranking figure (AP, AUROC, the tuner's objectives, LRAP, coverage, the report's curves)
comes from one primitive: sort a block of rows descending with each element's target packed
into its key, then read the cumulative true/false-positive counts at the last element of each
run of equal scores (only there is a cut-off ``score >= value`` realisable). Those run ends,
:class:`Runs`, are all that the figures need.

The sort is exact for every floating dtype:

- float32 in [0, 2) (probabilities): the value bits shifted left by two lose nothing (bits 31 and
  30 are zero), so one uint32 key per element carries the value and the target;
- any other float32 or float16 (logits, margins, negatives): a uint64 key of the order-preserving
  bit pattern and the target;
- float64 that float32 represents exactly: as float32; other float64: an argsort.

Unknown targets get the smallest key, so they sit after every known score of their row and a
row's counts stop at its known elements. Work is done in blocks of rows of about
``BLOCK_ELEMENTS`` scores, so memory is bounded by the block size, not by N x L; blocks run on a
thread per core (NumPy's sort and reductions release the GIL).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, NamedTuple

import numpy as np

BLOCK_ELEMENTS = 1 << 21
POSITIVE, NEGATIVE, UNKNOWN = 1, 0, 2  # target codes (``codes_of``)

_POOL: ThreadPoolExecutor | None = None


def thread_map(fn: Callable, items: Iterable) -> list:
    """``list(map(fn, items))`` on a pool of one thread per usable core."""
    global _POOL
    if _POOL is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        _POOL = ThreadPoolExecutor(max(1, cores or 1), thread_name_prefix="mlabel-count")
    return list(_POOL.map(fn, items))


_CODE_OF_BYTE = np.full(256, UNKNOWN, dtype=np.uint8)
_CODE_OF_BYTE[0], _CODE_OF_BYTE[1] = NEGATIVE, POSITIVE


def codes_of(targets: np.ndarray) -> np.ndarray:
    """uint8 codes: 1 where the target is 1, 0 where it is 0, 2 (unknown) for anything else."""
    codes = np.empty(targets.shape, dtype=np.uint8)
    if targets.size == 0:
        return codes
    byte = targets.dtype in (np.int8, np.uint8, np.bool_)

    def block(b):
        if byte:  # one table look-up per element (int8 -1 reads as byte 255: unknown)
            codes[b] = _CODE_OF_BYTE[targets[b].view(np.uint8)]
        else:
            part = codes[b]
            part.fill(UNKNOWN)
            part[targets[b] == 1] = POSITIVE
            part[targets[b] == 0] = NEGATIVE

    flat = targets.ndim < 2
    if flat:
        targets, codes = targets.reshape(1, -1), codes.reshape(1, -1)
    thread_map(block, row_blocks(*targets.shape))
    return codes.reshape(-1) if flat else codes


def label_blocks(n_rows: int, n_labels: int, block: int = BLOCK_ELEMENTS) -> list[slice]:
    """Slices of labels holding about ``block`` scores each."""
    step = max(1, block // max(n_rows, 1))
    return [slice(s, min(s + step, n_labels)) for s in range(0, n_labels, step)]


def row_blocks(n_rows: int, n_labels: int, block: int = BLOCK_ELEMENTS // 4) -> list[slice]:
    """Slices of whole rows (images) holding about ``block`` scores each."""
    step = max(1, block // max(n_labels, 1))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _as_float32_exactly(scores: np.ndarray) -> np.ndarray | None:
    """``scores`` as float32 when that changes no value (float16 always), else None."""
    if scores.dtype in (np.float32, np.float16):
        return scores.astype(np.float32, copy=False)
    single = scores.astype(np.float32)
    return single if np.array_equal(single, scores) else None


def key_kind(scores: np.ndarray) -> str:
    """How ``scores`` sort exactly: "small" (float32 in [0, 2)), "wide" (other float32 values)
    or "float" (float64 that float32 does not represent: argsort)."""
    rows = scores.reshape(1, -1) if scores.ndim < 2 else scores

    def block(b):  # (float32 represents every value, they lie in [0, 2))
        single = _as_float32_exactly(rows[b])
        if single is None:
            return False, False
        return True, single.size == 0 or (single.min() >= 0 and single.max() < 2)

    found = thread_map(block, row_blocks(*rows.shape))
    if not all(exact for exact, _ in found):
        return "float"
    return "small" if all(small for _, small in found) else "wide"


def ordered_bits(single: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (-0.0 and 0.0 map to the same key)."""
    bits = (single + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))


def _from_ordered_bits(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    return np.where(keys >> np.uint32(31), keys & np.uint32(0x7FFFFFFF), ~keys).view(np.float32)


def pack_keys(scores: np.ndarray, codes: np.ndarray, kind: str, drop_unknown: bool = True) -> np.ndarray:
    """Sortable keys carrying value and target ("small": uint32, "wide": uint64); 0 if unknown
    (with ``drop_unknown=False`` an unknown element's key is undefined: the caller drops it)."""
    single = scores.astype(np.float32, copy=False)
    if kind == "small":  # -0.0 has only bit 31 set: shifted out, it packs as 0.0
        keys = single.view(np.uint32) << np.uint32(2)
    else:
        keys = ordered_bits(single).astype(np.uint64) << np.uint64(2)
    code = codes + np.uint8(1)  # negative 1, positive 2 (unknown 3, cleared below)
    keys |= code
    if drop_unknown:
        np.putmask(keys, codes == UNKNOWN, keys.dtype.type(0))
    return keys


class Sorted(NamedTuple):
    """Rows sorted descending: ``rank`` compares like the scores (``!=`` finds runs of equal
    scores), ``positive`` marks positive targets, ``known`` (r,) counts each row's known
    targets (they come first), ``value(rank)`` decodes scores."""
    rank: np.ndarray
    positive: np.ndarray
    known: np.ndarray
    kind: str

    def value(self, rank: np.ndarray) -> np.ndarray:
        """float64 scores of some elements of ``rank``."""
        return decode(rank, self.kind)


def decode(rank: np.ndarray, kind: str) -> np.ndarray:
    """float64 scores of ranks (packed keys shifted right by two, or float64 values)."""
    if kind == "small":
        return np.ascontiguousarray(rank, dtype=np.uint32).view(np.float32).astype(np.float64)
    if kind == "wide":
        return _from_ordered_bits(np.ascontiguousarray(rank)).astype(np.float64)
    return np.asarray(rank, dtype=np.float64)


def _unpack(keys: np.ndarray, kind: str, known: np.ndarray) -> Sorted:
    """Ascending packed keys -> a descending :class:`Sorted` (reversed views)."""
    keys = keys[..., ::-1]
    return Sorted(keys >> keys.dtype.type(2), (keys & keys.dtype.type(3)) == 2, known, kind)


def sort_rows(scores: np.ndarray, codes: np.ndarray, kind: str | None = None) -> Sorted:
    """Sort each row of ``scores`` (r, n) descending, carrying the target ``codes`` (r, n)."""
    kind = kind or key_kind(scores)
    known = np.count_nonzero(codes != UNKNOWN, axis=-1)
    if kind != "float":
        keys = pack_keys(scores, codes, kind)
        keys.sort(axis=-1)
        return _unpack(keys, kind, known)
    values = np.where(codes == UNKNOWN, -np.inf, scores)
    order = np.argsort(-values, axis=-1, kind="stable")
    return Sorted(np.take_along_axis(values, order, -1),
                  np.take_along_axis(codes == POSITIVE, order, -1), known, "float")


class Positives(NamedTuple):
    """The positive elements of sorted rows, each with the counts at its run of equal scores.

    Every figure the metrics and the tuner need changes only where a run holds a positive (AP
    adds precision there, the ROC area adds the negatives below, F-scores and the constrained
    objectives peak there), so O(positives) work after the sort replaces a pass over all runs.
    Per positive (in row order): ``row``; ``tp``/``seen``: positives and known elements ranked at
    or above the end of its run; ``tp_above``/``above``: the same strictly above the run;
    ``lo``: ascending index of the run's first element (its lowest-ranked end). Per row:
    ``n_pos``, ``n_known`` and ``first``, the index of the row's first positive in these arrays.
    """
    row: np.ndarray
    tp: np.ndarray
    seen: np.ndarray
    tp_above: np.ndarray
    above: np.ndarray
    lo: np.ndarray
    n_pos: np.ndarray
    n_known: np.ndarray
    first: np.ndarray

    def ranking_sums(self, carry: "RankingSums | None" = None, n_neg=None) -> "RankingSums":
        """:class:`RankingSums` per row (``n_neg``: the negatives of the whole ranking when a
        chunk of one long row is counted; ``carry`` adds earlier chunks' sums)."""
        n_rows = len(self.n_pos)
        fp, fp_above = self.seen - self.tp, self.above - self.tp_above
        neg = (self.n_known - self.n_pos)[self.row] if n_neg is None else n_neg
        ap = np.bincount(self.row, self.tp / self.seen, n_rows)
        auc = np.bincount(self.row, (neg - fp) + (fp - fp_above) / 2, n_rows)
        if carry is not None:
            ap, auc = ap + carry.ap, auc + carry.auc
        return RankingSums(ap, auc, self.n_pos.astype(np.float64),
                           (self.n_known - self.n_pos).astype(np.float64))


def positives(keys: np.ndarray, known: np.ndarray, seen0: int = 0, tp0: int = 0) -> Positives:
    """:class:`Positives` of rows of ascending packed keys (r, n) (see :func:`pack_keys`), with
    ``known`` (r,) known targets per row. A chunk of one long row passes the elements and the
    positives ranked above it (``seen0``, ``tp0``); its ``n_pos``/``n_known`` are then its own."""
    n_rows, n = keys.shape
    shift, code = keys.dtype.type(2), keys.dtype.type(3)
    flat = keys.ravel()
    index = np.flatnonzero((flat & code) == shift)  # positive code 2; ascending, row after row
    row, asc = np.divmod(index, n) if n else (index, index)
    n_pos = np.bincount(row, minlength=n_rows)
    ends = np.cumsum(n_pos)  # positives before the end of each row
    first = ends - n_pos
    rank = flat[index] >> shift
    lo, hi = asc.copy(), asc.copy()
    # A positive whose neighbours hold other scores is a run of its own (the common case); runs
    # of ties are found by binary search on keys made ascending across rows.
    left = np.zeros(len(index), bool)
    right = np.zeros(len(index), bool)
    has_left, has_right = asc > 0, asc < n - 1
    left[has_left] = (flat[index[has_left] - 1] >> shift) == rank[has_left]
    right[has_right] = (flat[index[has_right] + 1] >> shift) == rank[has_right]
    tied = np.flatnonzero(left | right)
    below = np.arange(len(index), dtype=np.int64)  # positives ascending-before lo, counted globally
    after = below + 1  # positives ascending-at-or-before hi
    if len(tied) and n_rows == 1:  # one row: search its keys directly
        r_t = rank[tied].astype(np.uint64)
        lo[tied] = np.searchsorted(flat, (r_t << np.uint64(2)).astype(keys.dtype))
        top = (r_t + np.uint64(1)) << np.uint64(2)
        fits = top <= np.iinfo(keys.dtype).max
        hi[tied] = np.where(fits, np.searchsorted(flat, np.where(fits, top, 0).astype(keys.dtype)), n) - 1
        below[tied] = np.searchsorted(index, lo[tied])
        after[tied] = np.searchsorted(index, hi[tied], side="right")
    elif len(tied):
        width = 32 if keys.dtype == np.uint32 else 34
        rows_t = np.unique(row[tied])
        wide = (np.arange(len(rows_t), dtype=np.uint64)[:, None] << np.uint64(width)) + keys[rows_t].astype(np.uint64)
        at = np.searchsorted(rows_t, row[tied])
        base = at.astype(np.uint64) << np.uint64(width)
        r_t = rank[tied].astype(np.uint64)
        offset = at.astype(np.int64) * n
        lo[tied] = np.searchsorted(wide.ravel(), base + (r_t << np.uint64(2))) - offset
        hi[tied] = np.searchsorted(wide.ravel(), base + ((r_t + np.uint64(1)) << np.uint64(2))) - offset - 1
        row_start = row[tied].astype(np.int64) * n
        below[tied] = np.searchsorted(index, row_start + lo[tied])
        after[tied] = np.searchsorted(index, row_start + hi[tied], side="right")
    row_end = ends[row]
    seen = np.minimum(n - lo, known[row]).astype(np.float64) + seen0
    return Positives(row, (row_end - below + tp0).astype(np.float64), seen, (row_end - after + tp0).astype(np.float64),
                     (n - 1 - hi + seen0).astype(np.float64), lo, n_pos, np.asarray(known), first)


def sorted_keys(scores: np.ndarray, codes: np.ndarray, kind: str) -> np.ndarray:
    """Packed keys of each row of (r, n) sorted ascending (``kind`` "small" or "wide")."""
    keys = pack_keys(scores, codes, kind)
    keys.sort(axis=-1)
    return keys


class Runs(NamedTuple):
    """The ends of the runs of equal scores of sorted rows, row after row.

    ``tp``/``fp`` (float64): cumulative counts at each run end; ``col`` (int32): its position in
    the sorted row; ``start``/``end`` (r,): index of each row's first and last run end (every row
    of a non-empty block has one). A run of only unknown targets (the last of a row) adds nothing.
    """
    tp: np.ndarray
    fp: np.ndarray
    col: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def previous(self, counts: np.ndarray, carry) -> np.ndarray:
        """``counts`` at the previous run end of the same row (``carry`` (r,) before the first)."""
        prev = np.empty_like(counts)
        prev[1:] = counts[:-1]
        prev[self.start] = carry
        return prev

    def spread(self, values: np.ndarray) -> np.ndarray:
        """A per-row array (r,) repeated at each of the row's run ends."""
        return np.repeat(values, self.end - self.start + 1)

    def per_row(self, values: np.ndarray) -> np.ndarray:
        """Sum of ``values`` (one per run end) over each row."""
        return np.add.reduceat(values, self.start) if len(values) else np.zeros(len(self.start))


def runs(sorted_: Sorted, next_rank=None, tp0=0.0, seen0=0) -> Runs:
    """Run ends of sorted rows. A long row continued in chunks passes the first rank of the next
    chunk (``next_rank`` (r,), None at the row's end) and the positives and elements before the
    chunk (``tp0``, ``seen0``)."""
    rank = sorted_.rank
    n_rows, n = rank.shape
    last = np.empty(rank.shape, dtype=bool)
    np.not_equal(rank[:, :-1], rank[:, 1:], out=last[:, :-1])
    last[:, -1] = True if next_rank is None else rank[:, -1] != next_rank
    counts = np.count_nonzero(last, axis=1)
    start = np.zeros(n_rows, dtype=np.int64)
    np.cumsum(counts[:-1], out=start[1:])
    end = start + counts - 1
    tp = np.cumsum(sorted_.positive, axis=1, dtype=np.int32)[last].astype(np.float64)
    col = np.broadcast_to(np.arange(n, dtype=np.int32), rank.shape)[last]
    seen = col + np.float64(1 + seen0)
    if tp0:
        tp += tp0
    # Unknown targets sort last: only a row's last run can hold them; counts stop at the known.
    if next_rank is None and len(col):
        seen[end] = np.minimum(seen[end], sorted_.known)
    return Runs(tp, seen - tp, col, start, end)


class RankingSums(NamedTuple):
    """Unnormalised sums per row: ``ap`` = sum over runs of delta-tp x precision,
    ``auc`` = sum over runs of delta-fp x (tp + previous tp) / 2, and the counts at the end."""
    ap: np.ndarray
    auc: np.ndarray
    tp: np.ndarray
    fp: np.ndarray


def ranking_sums(r: Runs, n_rows: int, carry: RankingSums | None = None) -> RankingSums:
    """AP and ROC-area sums of sorted rows (chunks of one long row continue with ``carry``).

    AP = ap / positives (scikit-learn's sum of (R_n - R_{n-1}) P_n); AUROC = auc / (positives x
    negatives) (the trapezoidal area, ties as one step); LRAP of an image = ap / its positives.
    """
    zero = np.zeros(n_rows)
    carry = carry or RankingSums(zero, zero, zero, zero)
    if len(r.tp) == 0:  # a chunk inside one run of equal scores
        return carry
    prev_tp, prev_fp = r.previous(r.tp, carry.tp), r.previous(r.fp, carry.fp)
    precision = r.tp / np.maximum(r.tp + r.fp, 1.0)
    ap = r.per_row((r.tp - prev_tp) * precision)
    auc = r.per_row((r.fp - prev_fp) * (r.tp + prev_tp)) / 2
    return RankingSums(carry.ap + ap, carry.auc + auc, r.tp[r.end], r.fp[r.end])


def micro_sums(scores: np.ndarray, codes: np.ndarray, kind: str | None = None,
               chunk: int = BLOCK_ELEMENTS) -> RankingSums:
    """:func:`ranking_sums` of every known element of (N, L) as one ranking (micro AP/AUROC).

    The known elements' packed keys are gathered block by block into one array (4 or 8 bytes per
    element) and sorted in place. Chunks of it that start and end at run boundaries are then
    independent given the counts before them, so they are counted on a thread per core.
    """
    kind = kind or key_kind(scores)
    known = codes != UNKNOWN
    blocks = row_blocks(*scores.shape)
    sizes = thread_map(lambda b: int(np.count_nonzero(known[b])), blocks)
    n_known = sum(sizes)
    if n_known == 0:
        zero = np.zeros(1)
        return RankingSums(zero, zero, zero, zero)
    if kind == "float":
        s = sort_rows(scores[known][None], codes[known][None], "float")
        return ranking_sums(runs(s), 1)
    keys = np.empty(n_known, dtype=np.uint32 if kind == "small" else np.uint64)
    offsets = np.cumsum([0] + sizes)

    def pack(i):
        b = blocks[i]
        part = pack_keys(scores[b], codes[b], kind, drop_unknown=False)
        keys[offsets[i]:offsets[i + 1]] = part.ravel() if sizes[i] == part.size else part[known[b]]

    thread_map(pack, range(len(blocks)))
    keys.sort()
    shift = keys.dtype.type(2)
    bounds = [n_known]
    while bounds[-1] > 0:  # chunks of the ascending keys, each starting where a run starts
        start = max(bounds[-1] - chunk, 0)
        if start > 0:
            start = int(np.searchsorted(keys, (keys[start] >> shift) << shift))
        bounds.append(start)
    pieces = list(zip(bounds[1:], bounds[:-1]))  # highest scores first
    counts = thread_map(lambda p: int(np.count_nonzero(keys[p[0]:p[1]] & shift)), pieces)
    tp_above = np.cumsum([0] + counts)
    n_pos = int(tp_above[-1])
    n_neg = n_known - n_pos

    def piece(i):
        lo, hi = pieces[i]
        found = positives(keys[None, lo:hi], np.array([hi - lo]), seen0=n_known - hi, tp0=int(tp_above[i]))
        return found.ranking_sums(n_neg=n_neg)

    sums = thread_map(piece, range(len(pieces)))
    return RankingSums(sum(s.ap for s in sums), sum(s.auc for s in sums), np.array([float(n_pos)]),
                       np.array([float(n_neg)]))
