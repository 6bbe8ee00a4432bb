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

__all__ = ["error_galleries", "heat_map_thumbnails", "image_losses", "jpeg_thumbnail", "label_losses"]

THUMB = 112
PER_LABEL = 6
MAX_LABELS = 30
WORST = 12
MAX_NAMES = 6


class _Thumbs:
    """Thumbnails as data URIs, one per image however often it is shown, and heat-map overlays,
    one per (image, label) (``explain(path, label) -> data URI or None``); ``None`` marks a failure."""

    def __init__(self, explain=None):
        self.ids: dict = {}
        self.uris: list[str | None] = []
        self.explain = explain

    def add(self, path: str) -> int:
        return self._add(path, lambda: _thumbnail(path))

    def add_map(self, path: str, label: int) -> int | None:
        """The overlay of ``label`` on ``path`` (None without an explainer, or when it fails)."""
        if self.explain is None:
            return None
        ident = self._add((path, label), lambda: self.explain(path, label))
        return ident if self.uris[ident] else None

    def _add(self, key, make) -> int:
        if key not in self.ids:
            self.ids[key] = len(self.uris)
            self.uris.append(make())
        return self.ids[key]


def jpeg_thumbnail(path: str, size: int, quality: int) -> bytes | None:
    """The image at ``path`` (a file or a shard's SHARD#KEY) as a JPEG fitting ``size`` px, or None
    where it cannot be read."""
    from PIL import Image, ImageOps

    from ..data.shards import shard_image_bytes
    data = shard_image_bytes(path)  # an image inside a wds shard: SHARD#KEY
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced size
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((size, size))
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=quality)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return buffer.getvalue()


def _thumbnail(path: str) -> str | None:
    jpeg = jpeg_thumbnail(path, THUMB, 80)
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _names(row: np.ndarray, wrong: np.ndarray, labels: list[str]) -> str:
    """The labels set in ``row``, those in ``wrong`` (missed or false) in red."""
    shown = [f'<span class="bad">{html.escape(labels[j])}</span>' if wrong[j] else html.escape(labels[j])
             for j in np.flatnonzero(row)]
    more = f" +{len(shown) - MAX_NAMES}" if len(shown) > MAX_NAMES else ""
    return ", ".join(shown[:MAX_NAMES]) + more or "none"


def _tile(i: int, caption: str, shown: tuple, thumbs: _Thumbs, about: int) -> str:
    """One image's tile; ``shown``: the split's (paths, targets, decisions, labels); ``about``:
    the label it is shown for (its heat map, when there is one)."""
    paths, targets, decisions, labels = shown
    path = str(paths[i])
    ident = thumbs.add(path)
    picture = (f'<img class="plain" data-thumb="{ident}" alt="{html.escape(path)}">' if thumbs.uris[ident] else
               f'<div class="missing">image not readable: {html.escape(path)}</div>')
    heat = thumbs.add_map(path, about) if thumbs.uris[ident] else None
    if heat is not None:
        picture += f'<img class="cam" data-thumb="{heat}" alt="heat map of {html.escape(labels[about])}">'
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
        tiles = "".join(show(i, f"p = {probs[i, j]:.3f}", j) for i in chosen) or "<p>none</p>"
        rows.append(f'<div class="kind">{kind}</div><div class="tiles">{tiles}</div>')
    return "".join(rows)


def label_losses(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, L): the binary cross-entropy of each known cell (0 where unknown)."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = -np.where(targets == 1, np.log(p), np.log1p(-p))
    return np.where(targets >= 0, loss, 0.0)


def image_losses(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image: the binary cross-entropy of its probabilities, summed over the known labels."""
    return label_losses(probs, targets).sum(1)


def error_galleries(probs: np.ndarray, targets: np.ndarray, decisions: np.ndarray, paths, labels: list[str],
                    split: str, explain=None) -> tuple[str, list[str | None]]:
    """The galleries' HTML and the thumbnails it refers to (``data-thumb`` = index). With
    ``explain(path, label) -> data URI``, each tile also holds the heat map of the label it is
    about (a per-label tile's label; a highest-loss tile's costliest label), shown by a checkbox."""
    if paths is None:
        return (f"<h2>Errors ({split})</h2><p>No image paths are stored for {split} (the run has no "
                "predictions/ file), so there are no galleries; rebuild the report after a new run.</p>", [])
    thumbs = _Thumbs(explain)

    def show(i, caption, about):
        return _tile(i, caption, (paths, targets, decisions, labels), thumbs, about)

    errors = ((targets == 0) & decisions).sum(0) + ((targets == 1) & ~decisions).sum(0)
    order = [j for j in np.argsort(-errors, kind="stable")[:MAX_LABELS] if errors[j] > 0]
    if len(labels) <= MAX_LABELS:
        order.sort()
    losses = image_losses(probs, targets)
    worst = np.argsort(-losses, kind="stable")[:WORST]
    costliest = label_losses(probs, targets).argmax(1)
    parts = [f"<h2>Errors ({split})</h2><p>At the saved thresholds. Highest loss overall (binary cross-entropy "
             "summed over the image's known labels):</p>",
             '<div class="tiles">' + "".join(show(i, f"loss {losses[i]:.2f}", costliest[i]) for i in worst) + "</div>"]
    which = "each label" if len(order) == len(labels) else (
        f"the {len(order)} labels with the most errors" if len(labels) > MAX_LABELS else "each label with an error")
    parts.append(f"<p>Per label, for {which}:</p>")
    parts += [f'<h3>{html.escape(labels[j])}: {errors[j]} errors</h3>'
              + _per_label(j, probs, targets, decisions, show) for j in order]
    images = [i for key, i in thumbs.ids.items() if not isinstance(key, tuple)]
    missing = sum(thumbs.uris[i] is None for i in images)
    if missing:
        parts.insert(1, f'<p class="lost-note">{missing} of {len(images)} images could not be read (moved or '
                        "deleted since the run?); their tiles show the path instead.</p>")
    if any(isinstance(key, tuple) and thumbs.uris[i] for key, i in thumbs.ids.items()):
        parts.insert(1, '<p><label><input type="checkbox" onchange="document.getElementById(\'galleries\')'
                        '.classList.toggle(\'show-maps\', this.checked)"> show heat maps (where the model looked '
                        'for the label each tile is about)</label></p>')
    return '<div id="galleries">' + "".join(parts) + "</div>", thumbs.uris


def heat_map_thumbnails(model, quality: int = 70):
    """``explain(path, label) -> data URI``: the label's heat map (:meth:`model.explain
    <mlabel.models.MultiLabelClassifier.explain>`, ``auto``) over the pixels the model saw, as a
    thumbnail JPEG; None for an image it cannot read or a model it cannot explain."""
    import torch
    from PIL import Image

    from ..explain import input_view, overlay
    from ..preprocess import preprocess_image

    def explain(path: str, label: int) -> str | None:
        try:
            image = torch.from_numpy(preprocess_image(path, model.preprocessing))[None]
            got = model.explain(image.to(next(model.parameters()).device), labels=[model.labels[label]])
            small = overlay(input_view(image[0], model.preprocessing), got.maps[0][0])
        except (OSError, ValueError, RuntimeError, ImportError):
            return None
        small.thumbnail((THUMB, THUMB), Image.BILINEAR)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=quality)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return explain
