"""The threshold explorer's data: per split and label, every cut point a threshold can fall
between, with the positives and negatives scoring at it, so the page computes precision, recall,
F1, the four counts and the PR curve at any threshold without the model.

Two encodings, both exact where the slider can stop:

- ``exact`` (up to :data:`EXACT_LIMIT` scores per split): the distinct scores of each label.
  The page's counts at any threshold ``t`` are those of ``prob >= t`` in
  :func:`mlabel.evaluate_predictions` (float32 scores compared with a float64 threshold).
- ``histogram`` (past it, so the page stays small): per label, the positives and negatives in
  ``BINS + 1`` bins ``[k / BINS, (k + 1) / BINS)`` (the last holds scores of 1). Exact at the bin
  edges, so the slider moves in steps of ``1 / BINS``.

Arrays travel gzip-compressed and base64-encoded; the page decodes them with the browser's
``DecompressionStream`` (no network, no library).
"""
from __future__ import annotations

import base64
import gzip

import numpy as np

from ..metrics import label_curves, row_blocks

__all__ = ["EXACT_LIMIT", "BINS", "explorer_data", "histogram_counts"]

EXACT_LIMIT = 300_000
BINS = 1000


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(gzip.compress(np.ascontiguousarray(array).tobytes(), 6, mtime=0)).decode("ascii")


def _exact_split(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Per label, the distinct known scores (descending) and the positives and negatives at each,
    from the counting core the metrics and the threshold tuner use (:func:`~mlabel.metrics.label_curves`)."""
    offsets, cuts, tps, fps = [0], [], [], []
    for values, tp, fp, _, _ in label_curves(probs, targets):
        cuts.append(values), tps.append(np.diff(tp, prepend=0)), fps.append(np.diff(fp, prepend=0))
        offsets.append(offsets[-1] + len(values))
    return {"offsets": _pack(np.asarray(offsets, np.uint32)), "cuts": _pack(np.concatenate(cuts).astype(np.float32)),
            "tp": _pack(np.concatenate(tps).astype(np.uint32)), "fp": _pack(np.concatenate(fps).astype(np.uint32))}


def histogram_counts(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives), each (L, bins + 1): known scores in ``[k / bins, (k + 1) / bins)``,
    the last bin holding scores >= 1. ``score >= k / bins`` exactly when its bin is ``>= k``."""
    n_labels = probs.shape[1]
    counts = np.zeros((2, n_labels * (bins + 1)), np.int64)
    edges = np.arange(bins + 2) / bins
    for block in row_blocks(*probs.shape):
        p = probs[block].astype(np.float64)
        k = np.clip(np.floor(p * bins), 0, bins).astype(np.int64)
        k -= p < edges[k]  # floor(p * bins) may round across an edge: the float64 comparison decides
        k += (k < bins) & (p >= edges[k + 1])
        flat = k + np.arange(n_labels) * (bins + 1)
        t = targets[block]
        for row, which in enumerate((t == 1, t == 0)):
            counts[row] += np.bincount(flat[which], minlength=counts.shape[1])
    return counts[0].reshape(n_labels, bins + 1), counts[1].reshape(n_labels, bins + 1)


def _histogram_split(probs: np.ndarray, targets: np.ndarray) -> dict:
    pos, neg = histogram_counts(probs, targets)
    dtype = np.uint16 if max(pos.max(initial=0), neg.max(initial=0)) < 2 ** 16 else np.uint32
    return {"dtype": np.dtype(dtype).name, "pos": _pack(pos.astype(dtype)), "neg": _pack(neg.astype(dtype))}


def explorer_data(splits: dict[str, tuple[np.ndarray, np.ndarray]], labels: list[str], thresholds: np.ndarray,
                  tune_command: str) -> dict:
    """The JSON the page's explorer reads: ``splits`` maps a split to its (probabilities, targets)."""
    largest = max(probs.size for probs, _ in splits.values())
    mode = "exact" if largest <= EXACT_LIMIT else "histogram"
    encode = _exact_split if mode == "exact" else _histogram_split
    return {"labels": list(labels), "thresholds": [float(t) for t in thresholds], "mode": mode, "bins": BINS,
            "tune": tune_command, "splits": {split: {"images": int(len(probs)), **encode(
                np.asarray(probs, np.float32), np.asarray(targets))} for split, (probs, targets) in splits.items()}}


def explorer_html(data: dict) -> str:
    """The explorer's controls and one panel per split (filled in by ``report.js``)."""
    import html

    from .page import inline_json
    options = "".join(f'<option value="{j}">{html.escape(name)}</option>' for j, name in enumerate(data["labels"]))
    rows = "".join(f'<tr><th>{name}</th><td id="{{s}}-{key}"></td></tr>' for name, key in (
        ("precision", "precision"), ("recall", "recall"), ("F1", "f1"), ("TP", "tp"), ("FP", "fp"),
        ("FN", "fn"), ("TN", "tn"), ("F1 at saved", "saved"), ("F1 at 0.5", "half")))
    panels = "".join(
        f'<div class="panel"><h3>{split} ({info["images"]} images)</h3><canvas id="{split}-curve" width="280" '
        f'height="260"></canvas><table>{rows.format(s=split)}</table></div>' for split, info in data["splits"].items())
    payload = inline_json(data)
    return f"""<h2>Threshold explorer</h2><div id="explorer">
<p>Pick a label and move the slider (or type a threshold): the counts, precision, recall and F1 on each
split follow, and the red dot moves along the precision-recall curve (green: the saved threshold; grey: 0.5).
Predicted positive means <code>probability &gt;= threshold</code>, as in <code>mlabel.evaluate_predictions</code>.</p>
<label>label <select id="explorer-label">{options}</select></label>
<input id="explorer-slider" type="range" min="0" max="1" step="0.001">
<input id="explorer-value" type="number" min="0" max="1" step="any">
<button id="explorer-reset">saved threshold</button> <span id="explorer-note"></span>
<div class="panels">{panels}</div>
<p><span id="explorer-changed"></span>. <button id="explorer-download">download thresholds.json</button>
then apply it: <code id="explorer-command"></code></p></div>
<script type="application/json" id="explorer-data">{payload}</script>"""
