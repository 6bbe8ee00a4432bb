"""The audit's files: ``issues.csv``, ``suggestions.csv``, ``summary.json``, ``oof.npz`` and
``audit.html``, each written atomically by this module alone."""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import atomic_path, read_text, write_json, write_text
from ..metrics import average_precision, defined_mean
from ..report.gallery import jpeg_thumbnail
from ..version import __version__
from .rank import Cells, flagged_cells, noise_rates, suggested_cells

__all__ = ["COLUMNS", "PAGE_TILES", "write_outputs", "read_listed"]

COLUMNS = ["image", "label", "given", "probability", "kind", "score", "rank"]
PAGE_TILES = 2000  # tiles on audit.html: the top of issues.csv, then of suggestions.csv
THUMB = 96
# Below this out-of-fold macro AP against the given labels the ranking is mostly the model's own
# mistakes: on the digit canvases (ImageNet features, AP 0.62 against the noisy labels) 0.32 of
# the removed labels were in the top k, on the quickstart scenes (0.87) 0.77.
WEAK_AP = 0.75


def _rows(result, cells: Cells) -> list[list]:
    return [[result.paths[r], result.labels[c], int(result.given[r, c]), f"{float(result.probs[r, c]):.6f}", kind,
             f"{float(s):.6f}", rank] for rank, (r, c, kind, s) in
            enumerate(zip(cells.rows, cells.cols, cells.kind, cells.score), start=1)]


def _write_csv(path: Path, rows: list[list], columns=COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_listed(folder: Path, counts: dict | None = None) -> dict[tuple[str, str], tuple[str, int]]:
    """(image, label) -> (kind, given) of every row of an audit's issues.csv and suggestions.csv;
    with ``counts`` (summary.json's), each file must hold as many rows as the audit wrote. A
    damaged file raises :class:`DataError` naming it (and the line)."""
    listed = {}
    for name in ("issues.csv", "suggestions.csv"):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing: is {folder} an audit's --out folder? Run mlabel audit again "
                            "into a new --out")
        rows = 0
        try:
            reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
            for rows, row in enumerate(reader, start=1):
                listed[(row["image"], row["label"])] = (row["kind"], int(row["given"]))
        except (KeyError, TypeError, ValueError, csv.Error) as exc:
            raise DataError(f"{path}:{rows + 2} cannot be read ({type(exc).__name__}: {str(exc)[:80]}): the audit "
                            "folder is damaged; run mlabel audit again into a new --out") from None
        expected = (counts or {}).get(name.removesuffix(".csv"))
        if expected is not None and rows != expected:
            raise DataError(f"{path} holds {rows} rows where the audit wrote {expected} (see summary.json): the "
                            "audit folder is damaged; run mlabel audit again into a new --out")
    return listed


def _thumbnail(path: str) -> bytes:
    """A JPEG (q70) of the image scaled to fit 96 px (also inside a shard); a grey square where it cannot be read."""
    jpeg = jpeg_thumbnail(path, THUMB, 70)
    if jpeg is None:
        from PIL import Image
        buffer = io.BytesIO()
        Image.new("RGB", (THUMB, THUMB), (128, 128, 128)).save(buffer, format="JPEG", quality=70)
        jpeg = buffer.getvalue()
    return jpeg


def _tiles(result, listed: list[list]) -> list:
    from .page import Tile
    names = np.asarray(result.labels, dtype=object)
    row_of = {path: i for i, path in enumerate(result.paths)}
    tiles, thumbs = [], {}
    for image, label, _, probability, kind, score, rank in listed[:PAGE_TILES]:
        r = row_of[image]
        if image not in thumbs:
            thumbs[image] = (r, _thumbnail(image))
        tiles.append(Tile(image, thumbs[image][1], list(names[result.given[r] == 1]), list(names[result.given[r] < 0]),
                          list(names[result.probs[r] >= result.thresholds]), label, kind, float(probability),
                          float(score), rank))
    return tiles


def _page(result, issues: list[list], suggestions: list[list]) -> int:
    from .page import write_audit_page
    # suggestions are ranked among themselves; on the page they follow the issues, so no two tiles share a rank
    after = [[*row[:-1], row[-1] + len(issues)] for row in suggestions]
    tiles = _tiles(result, issues + after)
    return write_audit_page(result.out / "audit.html", tiles, result.labels, f"mlabel audit: {result.out.name}")


def model_quality(result) -> dict:
    """How well the out-of-fold probabilities rank the given labels (unknown cells left out):
    macro AP and per label. Label noise lowers it too, so it is a floor on the model's quality."""
    ap = average_precision(result.probs, result.given).numpy()
    return {"macro_ap": _rounded(defined_mean(ap)),
            "per_label_ap": {name: _rounded(v) for name, v in zip(result.labels, ap.tolist())}}


def _rounded(value) -> float | None:
    return None if value is None or value != value else round(float(value), 4)


def _warn_if_weak(quality: dict, settings) -> None:
    if quality["macro_ap"] is None or quality["macro_ap"] >= WEAK_AP:
        return
    way = ("train a run on these labels and audit with its backbone (--from RUN), or use --budget full"
           if settings.budget == "fast" and settings.from_run is None else "train longer or choose a stronger backbone")
    print(f"warning: the out-of-fold model ranks the given labels with macro AP {quality['macro_ap']:.2f} (below "
          f"{WEAK_AP}): many suspects will be its own mistakes, not wrong labels; {way}", file=sys.stderr)


def _summary(result, plan, settings, extra: dict, counts: dict) -> dict:
    return {"mlabel_version": __version__, "settings": settings.to_dict(), "scoring": settings.scoring,
            "images": len(result.paths), "labels": result.labels, "counts": counts,
            "model": model_quality(result),
            "calibration": "platt per label, fitted per fold on that fold's out-of-fold logits",
            "thresholds": "per label, F1-maximising on the calibrated out-of-fold probabilities",
            "noise_rate_estimator": "confident learning: given negatives at or above the mean probability of the "
                                    "label's given positives (missing), given positives at or below the mean of its "
                                    "given negatives (spurious), over the given class; 95 % Wilson interval",
            "per_label": noise_rates(result.probs, result.given, result.thresholds, result.labels),
            "sources": plan.sources, "data": _data_keys(plan.cfg.data), "skipped": len(plan.skipped), **extra}


def _data_keys(data) -> dict:
    keys = ("format", "root", "train", "val", "image_column", "label_columns", "labels_column", "label_delimiter")
    keys = {k: getattr(data, k) for k in keys}
    return {**keys, "root": str(Path(data.root).resolve())}  # apply may run from another folder


def write_outputs(result, plan, settings, extra: dict, log) -> dict:
    """Every file of the audit into ``result.out``; returns the summary."""
    issues = _rows(result, flagged_cells(result.probs, result.missing, result.spurious, result.thresholds,
                                         settings.top))
    suggestions = _rows(result, suggested_cells(result.probs, result.given, result.thresholds, settings.top))
    out = result.out
    with atomic_path(out / "oof.npz") as tmp:
        with tmp.open("wb") as handle:
            np.savez(handle, probs=result.probs, given=result.given, fold=result.fold, thresholds=result.thresholds,
                     paths=np.asarray(result.paths, dtype=str), labels=np.asarray(result.labels, dtype=str))
    _write_csv(out / "issues.csv", issues)
    _write_csv(out / "suggestions.csv", suggestions)
    if plan.skipped:
        _write_csv(out / "skipped.csv", plan.skipped, ("split", "path", "reason"))
    else:  # an earlier audit's list in this folder would name images this one read
        (out / "skipped.csv").unlink(missing_ok=True)
    kinds = [row[4] for row in issues + suggestions]
    counts = {"issues": len(issues), "suggestions": len(suggestions),
              **{kind: kinds.count(kind) for kind in ("missing", "spurious", "suggested_positive",
                                                      "suggested_negative")}}
    summary = _summary(result, plan, settings, extra, counts)
    _warn_if_weak(summary["model"], settings)
    summary["page_bytes"] = _page(result, issues, suggestions)
    write_json(out / "summary.json", summary)
    log(f"audit: {counts['missing']} suspected missing and {counts['spurious']} spurious labels in "
        f"{out / 'issues.csv'}, {len(suggestions)} suggestions for unknown cells in {out / 'suggestions.csv'}")
    if summary["page_bytes"]:
        log(f"review them in {out / 'audit.html'}, then: mlabel audit apply {out} corrections.csv --out NEW_LABELS")
    return summary
