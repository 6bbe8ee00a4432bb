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
_IN_KEY = np.array([1, 2, 0], dtype=np.uint8)  # code -> its two key bits: unknown lowest

_POOL: ThreadPoolExecutor | None = None


def thread_map(fn: Callable, items: Iterable) -> list:
    """``list(map(fn, items))`` on a pool of one thread per usable core."""
    global _POOL
    if _POOL is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        _POOL = ThreadPoolExecutor(max(1, cores or 1), thread_name_prefix="mlabel-count")
    return list(_POOL.map(fn, items))


def codes_of(targets: np.ndarray) -> np.ndarray:
    """uint8 codes: 1 where the target is 1, 0 where it is 0, 2 (unknown) for anything else."""
    codes = np.full(targets.shape, UNKNOWN, dtype=np.uint8)
    codes[targets == 1] = POSITIVE
    codes[targets == 0] = NEGATIVE
    return codes


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
    small = True
    for b in label_blocks(*scores.shape) if scores.ndim == 2 else [slice(None)]:
        single = _as_float32_exactly(scores[:, b] if scores.ndim == 2 else scores)
        if single is None:
            return "float"
        small = small and (single.size == 0 or (single.min() >= 0 and single.max() < 2))
    return "small" if small else "wide"


def ordered_bits(single: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (-0.0 and 0.0 map to the same key)."""
    bits = (single + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))


def _from_ordered_bits(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    return np.where(keys >> np.uint32(31), keys & np.uint32(0x7FFFFFFF), ~keys).view(np.float32)


def pack_keys(scores: np.ndarray, codes: np.ndarray, kind: str) -> np.ndarray:
    """Sortable keys carrying value and target ("small": uint32, "wide": uint64); 0 if unknown."""
    single = scores.astype(np.float32, copy=False)
    if kind == "small":
        keys = ((single + np.float32(0.0)).view(np.uint32) << np.uint32(2)) | _IN_KEY[codes]
        zero = np.uint32(0)
    else:
        keys = (ordered_bits(single).astype(np.uint64) << np.uint64(2)) | _IN_KEY[codes]
        zero = np.uint64(0)
    np.putmask(keys, codes == UNKNOWN, zero)
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
        if self.kind == "small":
            return np.ascontiguousarray(rank, dtype=np.uint32).view(np.float32).astype(np.float64)
        if self.kind == "wide":
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
    blocks = label_blocks(*scores.shape)
    sizes = [int(np.count_nonzero(known[:, b])) for b in blocks]
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
        part = pack_keys(scores[:, b], codes[:, b], kind)
        keys[offsets[i]:offsets[i + 1]] = part.ravel() if sizes[i] == part.size else part[known[:, b]]

    thread_map(pack, range(len(blocks)))
    keys.sort()
    ascending, keys = keys, keys[::-1]
    shift = keys.dtype.type(2)
    bounds = [0]
    while bounds[-1] < n_known:  # each chunk ends where a run of equal scores ends
        end = min(bounds[-1] + chunk, n_known)
        if end < n_known:  # descending position of the first element ranked below keys[end - 1]
            end = n_known - int(np.searchsorted(ascending, (keys[end - 1] >> shift) << shift))
        bounds.append(end)
    pieces = list(zip(bounds[:-1], bounds[1:]))
    positives = np.cumsum([0] + thread_map(lambda p: int(np.count_nonzero(keys[p[0]:p[1]] & shift)), pieces))

    def piece(i):
        start, end = pieces[i]
        rank = (keys[start:end] >> shift)[None]
        part = Sorted(rank, ((keys[start:end] & shift) != 0)[None], np.array([n_known]), kind)
        tp0 = float(positives[i])
        carry = RankingSums(np.zeros(1), np.zeros(1), np.array([tp0]), np.array([start - tp0]))
        return ranking_sums(runs(part, tp0=tp0, seen0=start), 1, carry)

    sums = thread_map(piece, range(len(pieces)))
    return RankingSums(sum(s.ap for s in sums), sum(s.auc for s in sums), sums[-1].tp, sums[-1].fp)
