"""``audit.html``: the review page of ``mlabel audit``. One self-contained file (no network): the
suspected label errors as tiles sorted by suspicion, filters by label, kind and decision, and
keep / fix / unknown buttons whose decisions download as ``corrections.csv``
(``image,label,decision``), the file ``mlabel audit apply`` reads.

Everything user-controlled (image ids, label names, the title) reaches the page as inline JSON
(:func:`~mlabel.report.page.inline_json`) that ``page.js`` puts into the document as text, never
as markup; the title is HTML-escaped. Thumbnails are embedded once per distinct JPEG, so an
image shown for several of its labels costs its bytes once.

Size: the thumbnails are nearly all of it, a third more in base64 than as JPEG; a tile's other
data is about 200 bytes. 2,000 tiles of 96-px JPEG thumbnails at quality 70 (mean 2.2 kB on the
cats-and-dogs photos, 1.9 kB on the MIML scenes) make a page of 6.3 MB and 5.6 MB, which headless
Chromium opens in 1-2 s and filters in milliseconds. The caller caps the number of tiles
(``mlabel.audit.outputs.PAGE_TILES``); ``tests/test_audit_page.py`` measures the size per tile.
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from ..io import atomic_path
from ..report.page import inline_json

__all__ = ["KINDS", "Tile", "audit_data", "write_audit_page"]

KINDS = ("missing", "spurious", "suggested_positive", "suggested_negative")


@dataclass(frozen=True)
class Tile:
    """One suspected label error (a cell of the label matrix) as the page shows it.

    Attributes:
        image: the image id, as in ``issues.csv``.
        thumbnail: JPEG bytes (embedded as a data URI); empty when the image could not be read.
        given: the label names the given labels say are present.
        unknown: the label names whose given cell is unknown (-1).
        predicted: the label names the model predicts present (at its thresholds).
        label: the label of the cell this tile is about.
        kind: ``missing`` | ``spurious`` | ``suggested_positive`` | ``suggested_negative``.
        probability: the model's calibrated probability for (image, label).
        score: the suspicion score (higher = more suspicious).
        rank: 1 = the most suspicious.
    """

    image: str
    thumbnail: bytes
    given: list[str]
    unknown: list[str]
    predicted: list[str]
    label: str
    kind: str
    probability: float
    score: float
    rank: int


def write_audit_page(path: Path, tiles: Sequence[Tile], labels: Sequence[str], title: str) -> int:
    """Write the review page of ``tiles`` to ``path`` (atomically) and return its size in bytes.

    Args:
        path: where ``audit.html`` goes (the audit's output folder).
        tiles: the cells to review, in any order; the page shows them by ``rank``.
        labels: every label name, in the model's order (the label filter lists them in it).
        title: the page's heading (escaped).

    Raises:
        ValueError: a tile names a label not in ``labels``, has an unknown ``kind``, a
            probability or score that is not a finite number, or repeats another's (image, label).
    """
    path = Path(path)
    data = audit_data(tiles, labels, title, str(path.parent))
    document = _document(data, title).encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(document)
    return len(document)


def audit_data(tiles: Sequence[Tile], labels: Sequence[str], title: str, folder: str) -> dict:
    """The page's inline JSON: ``labels``, ``tiles`` sorted by rank (label names as indices into
    ``labels``; ``thumb`` an index into ``thumbs`` or None), ``thumbs`` (data URIs, one per
    distinct JPEG), ``apply`` (the ``mlabel audit apply`` command for the audit in ``folder``)
    and ``key`` (a digest of the rest, which keys the decisions the page keeps in the browser's
    storage)."""
    index = _label_index(labels)
    ordered = sorted(tiles, key=lambda tile: tile.rank)  # stable: equal ranks keep the caller's order
    _check_tiles(ordered, index)
    thumbs: dict[bytes, int] = {}
    rows = [_tile_row(tile, index, thumbs) for tile in ordered]
    apply = f"mlabel audit apply {shlex.quote(folder)} corrections.csv --out NEW_LABELS"
    data = {"title": title, "apply": apply, "labels": list(labels), "tiles": rows}
    key = hashlib.sha256(inline_json(data).encode("ascii")).hexdigest()[:16]
    uris = ["data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii") for jpeg in thumbs]
    return {**data, "key": key, "thumbs": uris}


def _label_index(labels: Sequence[str]) -> dict[str, int]:
    index = {name: j for j, name in enumerate(labels)}
    if len(index) != len(labels):
        repeated = sorted({name for name in labels if list(labels).count(name) > 1})
        raise ValueError(f"the audit page's labels repeat {repeated[:5]}; give each label once")
    return index


def _check_tiles(tiles: Sequence[Tile], index: dict[str, int]) -> None:
    seen: set[tuple[str, str]] = set()
    for tile in tiles:
        for name in (tile.label, *tile.given, *tile.unknown, *tile.predicted):
            if name not in index:
                raise ValueError(f"tile of image {tile.image!r} names label {name!r}, which is not among the "
                                 f"{len(index)} labels of the audit page")
        if tile.kind not in KINDS:
            raise ValueError(f"tile of image {tile.image!r} has kind {tile.kind!r}; expected one of {', '.join(KINDS)}")
        if not (math.isfinite(tile.probability) and math.isfinite(tile.score)):
            raise ValueError(f"tile of image {tile.image!r}, label {tile.label!r} has probability "
                             f"{tile.probability} and score {tile.score}; both must be finite numbers")
        if (tile.image, tile.label) in seen:
            raise ValueError(f"two tiles are about image {tile.image!r}, label {tile.label!r}; give each cell once")
        seen.add((tile.image, tile.label))


def _tile_row(tile: Tile, index: dict[str, int], thumbs: dict[bytes, int]) -> dict:
    """One tile's JSON; its thumbnail's index in ``thumbs`` (added when new)."""
    thumb = thumbs.setdefault(bytes(tile.thumbnail), len(thumbs)) if tile.thumbnail else None
    cell = 1 if tile.label in tile.given else -1 if tile.label in tile.unknown else 0
    return {"image": tile.image, "thumb": thumb, "label": index[tile.label], "kind": tile.kind, "given_value": cell,
            "probability": float(tile.probability), "score": float(tile.score), "rank": int(tile.rank),
            "given": [index[n] for n in tile.given], "unknown": [index[n] for n in tile.unknown],
            "predicted": [index[n] for n in tile.predicted]}


STYLE = """html{scroll-padding-top:9em}body{font-family:sans-serif;margin:1em 2em}h1{font-size:1.4em}[hidden]{display:none!important}
#controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:1}
#controls label{margin-right:1em}#audit-count{font-weight:bold;margin-right:1em}.hint{color:#555;font-size:12px}
#tiles{display:flex;flex-wrap:wrap;gap:8px;margin-top:.8em}
.tile{margin:0;width:220px;border:2px solid #ddd;border-radius:4px;padding:4px;font-size:12px;outline:none}
.tile:focus{border-color:#36c;box-shadow:0 0 0 2px #9bf}.tile img,.noimage{display:block;margin:auto;max-width:96px;max-height:96px}
.noimage{width:96px;height:60px;background:#eee;color:#777;font-size:10px}
.image{font-family:monospace;word-break:break-all;white-space:pre-wrap;margin:3px 0}
.cell{font-weight:bold}.kind-missing .cell{color:#a35a00}.kind-spurious .cell{color:#a11}
.kind-suggested_positive .cell,.kind-suggested_negative .cell{color:#2a6}.figures{color:#444}
.names{margin-top:2px}.what{color:#666}.bad{color:#c00;font-weight:bold}.about{text-decoration:underline}
.decide{display:flex;gap:3px;margin-top:4px}.decide button{flex:1;cursor:pointer;border:1px solid #999;background:#f6f6f6;border-radius:3px}
.decide button[aria-pressed=true]{color:#fff}.decide button.keep[aria-pressed=true]{background:#2a7a2a}
.decide button.fix[aria-pressed=true]{background:#c0392b}.decide button.unknown[aria-pressed=true]{background:#555}
.tile[data-decision=keep]{border-color:#2a7a2a}.tile[data-decision=fix]{border-color:#c0392b}
.tile[data-decision=unknown]{border-color:#555}"""


def _document(data: dict, title: str) -> str:
    """The whole page: the data as inline JSON, the style and ``page.js`` inlined."""
    script = resources.files(__package__).joinpath("page.js").read_text(encoding="utf-8")
    heading = html.escape(title)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{heading}</title><style>{STYLE}</style>'
            f"</head><body><h1>{heading}</h1>{_CONTROLS}<div id=\"tiles\"></div>"
            f'<script type="application/json" id="audit-data">{inline_json(data)}</script>'
            f"<script>{script}</script></body></html>")


_CONTROLS = """<div id="controls"><label>label <select id="audit-label"><option value="">all labels</option></select>
</label><label>kind <select id="audit-kind"><option value="">all kinds</option></select></label>
<label>decision <select id="audit-status"><option value="">any</option><option value="undecided">undecided</option>
<option value="keep">keep</option><option value="fix">fix</option><option value="unknown">unknown</option></select>
</label><span id="audit-count"></span><button type="button" id="audit-download">Download corrections.csv</button>
<div class="hint"><span id="audit-folder"></span> Keep the given value, fix it (set the cell to what
the model says) or mark it unknown (-1); click a chosen button again to clear it. Keys on a selected tile:
<b>k</b> keep, <b>f</b> fix, <b>u</b> unknown, arrows move. Decisions stay in this browser until you download
them; then run <code id="audit-apply"></code>.</div></div>"""
