"""Error galleries: per label the most confident false positives and false negatives, and the
images with the highest loss overall, as small JPEG thumbnails made at report time.

The counts are bounded (:data:`PER_LABEL` of each kind for at most :data:`MAX_LABELS` labels, the
:data:`WORST` highest-loss images, thumbnails of at most :data:`THUMB` pixels, each image encoded
once), so the page stays small at any data size. An image that is missing or unreadable becomes a
note in its tile, never an error.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

__all__ = ["error_galleries"]

THUMB = 112
PER_LABEL = 6
MAX_LABELS = 30
WORST = 12
MAX_NAMES = 6


class _Thumbs:
    """Thumbnails as data URIs, one per image however often it is shown; ``None`` marks a failure."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.uris: list[str | None] = []

    def add(self, path: str) -> int:
        if path not in self.ids:
            self.ids[path] = len(self.uris)
            self.uris.append(_thumbnail(path))
        return self.ids[path]


def _thumbnail(path: str) -> str | None:
    from PIL import Image, ImageOps

    from ..data.shards import shard_image_bytes
    data = shard_image_bytes(path)  # an image inside a wds shard: SHARD#KEY
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEG: decode at a reduced size
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMB, THUMB))
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _names(row: np.ndarray, wrong: np.ndarray, labels: list[str]) -> str:
    """The labels set in ``row``, those in ``wrong`` (missed or false) in red."""
    shown = [f'<span class="bad">{html.escape(labels[j])}</span>' if wrong[j] else html.escape(labels[j])
             for j in np.flatnonzero(row)]
    more = f" +{len(shown) - MAX_NAMES}" if len(shown) > MAX_NAMES else ""
    return ", ".join(shown[:MAX_NAMES]) + more or "none"


def _tile(i: int, caption: str, paths, targets, decisions, labels, thumbs: _Thumbs) -> str:
    path = str(paths[i])
    ident = thumbs.add(path)
    picture = (f'<img data-thumb="{ident}" alt="{html.escape(path)}">' if thumbs.uris[ident] else
               f'<div class="missing">image not readable: {html.escape(path)}</div>')
    return (f'<figure class="tile" title="{html.escape(path)}">{picture}<figcaption>{caption}<br>'
            f"true: {_names(targets[i] == 1, ~decisions[i], labels)}<br>"
            f"predicted: {_names(decisions[i], targets[i] == 0, labels)}"
            "</figcaption></figure>")


def _per_label(j: int, probs, targets, decisions, show) -> str:
    fp = np.flatnonzero((targets[:, j] == 0) & decisions[:, j])
    fn = np.flatnonzero((targets[:, j] == 1) & ~decisions[:, j])
    fp = fp[np.argsort(-probs[fp, j], kind="stable")[:PER_LABEL]]
    fn = fn[np.argsort(probs[fn, j], kind="stable")[:PER_LABEL]]
    rows = []
    for kind, chosen in (("false positives (most confident first)", fp), ("false negatives (lowest score first)", fn)):
        tiles = "".join(show(i, f"p = {probs[i, j]:.3f}") for i in chosen) or "<p>none</p>"
        rows.append(f'<div class="kind">{kind}</div><div class="tiles">{tiles}</div>')
    return "".join(rows)


def image_losses(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image: the binary cross-entropy of its probabilities, summed over the known labels."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = -np.where(targets == 1, np.log(p), np.log1p(-p))
    return np.where(targets >= 0, loss, 0.0).sum(1)


def error_galleries(probs: np.ndarray, targets: np.ndarray, decisions: np.ndarray, paths, labels: list[str],
                    split: str) -> tuple[str, list[str | None]]:
    """The galleries' HTML and the thumbnails it refers to (``data-thumb`` = index)."""
    if paths is None:
        return (f"<h2>Errors ({split})</h2><p>No image paths are stored for {split} (the run has no "
                "predictions/ file), so there are no galleries; rebuild the report after a new run.</p>", [])
    thumbs = _Thumbs()

    def show(i, caption):
        return _tile(i, caption, paths, targets, decisions, labels, thumbs)

    errors = ((targets == 0) & decisions).sum(0) + ((targets == 1) & ~decisions).sum(0)
    order = [j for j in np.argsort(-errors, kind="stable")[:MAX_LABELS] if errors[j] > 0]
    if len(labels) <= MAX_LABELS:
        order.sort()
    losses = image_losses(probs, targets)
    worst = np.argsort(-losses, kind="stable")[:WORST]
    parts = [f"<h2>Errors ({split})</h2><p>At the saved thresholds. Highest loss overall (binary cross-entropy "
             "summed over the image's known labels):</p>",
             '<div class="tiles">' + "".join(show(i, f"loss {losses[i]:.2f}") for i in worst) + "</div>"]
    which = "each label" if len(order) == len(labels) else (
        f"the {len(order)} labels with the most errors" if len(labels) > MAX_LABELS else "each label with an error")
    parts.append(f"<p>Per label, for {which}:</p>")
    parts += [f'<h3>{html.escape(labels[j])}: {errors[j]} errors</h3>'
              + _per_label(j, probs, targets, decisions, show) for j in order]
    missing = sum(uri is None for uri in thumbs.uris)
    if missing:
        parts.insert(1, f'<p class="lost-note">{missing} of {len(thumbs.uris)} images could not be read (moved or '
                        "deleted since the run?); their tiles show the path instead.</p>")
    return '<div id="galleries">' + "".join(parts) + "</div>", thumbs.uris
