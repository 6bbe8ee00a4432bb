"""Seeded iterative stratification for multi-label splits (Sechidis, Tsoumakas & Vlahavas, 2011).

Rare labels are placed first, each example going to the fold that still wants most of that
label, so every fold keeps close to the global frequency of every label. Examples with no
positive label are kept and spread by fold size.
"""
from __future__ import annotations

import numpy as np

__all__ = ["iterative_split"]


def iterative_split(targets: np.ndarray, fractions: list[float], seed: int = 0) -> np.ndarray:
    """Assign each row to a fold.

    Args:
        targets: (N, L) with 1 positive, 0 negative, -1 unknown (treated as not positive).
        fractions: fold sizes as fractions summing to 1, e.g. ``[0.8, 0.2]``.
        seed: makes the split reproducible.

    Returns:
        (N,) int fold index per row.
    """
    rng = np.random.default_rng(seed)
    positive = np.asarray(targets) == 1
    n, _ = positive.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    want_size = fractions * n
    want_label = fractions[:, None] * positive.sum(0)[None, :]
    fold = np.full(n, -1, dtype=np.int64)
    remaining = positive.copy()
    while remaining.any():
        counts = remaining.sum(0).astype(np.float64)
        counts[counts == 0] = np.inf
        label = int(np.argmin(counts))
        rows = np.flatnonzero(remaining[:, label])
        for row in rng.permutation(rows):
            demand = want_label[:, label]
            best = np.flatnonzero(demand == demand.max())
            if len(best) > 1:
                sizes = want_size[best]
                best = best[sizes == sizes.max()]
            chosen = int(rng.choice(best))
            fold[row] = chosen
            want_label[chosen] -= positive[row]
            want_size[chosen] -= 1
            remaining[row] = False
    for row in rng.permutation(np.flatnonzero(fold < 0)):
        best = np.flatnonzero(want_size == want_size.max())
        chosen = int(rng.choice(best))
        fold[row] = chosen
        want_size[chosen] -= 1
    return fold
