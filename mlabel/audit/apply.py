"""``mlabel audit apply DIR corrections.csv --out NEW_LABELS``: the reviewed decisions written into
a new label file; the original is never changed.

``corrections.csv`` has the columns ``image,label,decision`` (what audit.html downloads); a
decision is ``keep`` (no change), ``fix`` (missing and suggested_positive become 1, spurious and
suggested_negative 0) or ``unknown`` (-1; the ``unknown`` list in JSON lines). Every corrected
cell must be one the audit listed (issues.csv or suggestions.csv).

The new file keeps the source's own format where the source is a CSV (one-hot or a names column)
or JSON lines file and ``--out`` has its suffix: rows and cells not corrected are kept as they
were, byte for byte where the CSV has no quoted fields. Otherwise (a folder, COCO, VOC, ...; or
another suffix) it is a one-hot CSV (``.csv``, -1 unknown) or JSON lines (``.jsonl``) with absolute
image paths. Either way ``data.train=NEW_LABELS`` trains on it (keep ``data.root`` as it was).
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.tables import resolve_image
from ..errors import DataError
from ..io import check_output, file_sha256, read_text, refuse_inside, write_text
from ..rundir import hold_run_dir
from .core import image_folders
from .outputs import read_listed

__all__ = ["DECISIONS", "apply_corrections", "read_corrections"]

DECISIONS = ("keep", "fix", "unknown")
FIXED = {"missing": 1, "spurious": 0, "suggested_positive": 1, "suggested_negative": 0}


@dataclass
class Audited:
    """What an audit folder says about its data."""
    folder: Path
    summary: dict
    paths: list[str]  # (N,) train rows then val rows
    labels: list[str]
    given: np.ndarray  # (N, L) int8
    listed: dict  # (image, label) -> (kind, given)


AUDIT_FILES = ("summary.json", "oof.npz", "issues.csv", "suggestions.csv", "audit.html")


def _damaged(path: Path, why) -> DataError:
    return DataError(f"{path} cannot be read ({_short(str(why))}): the audit folder is damaged or not an audit's "
                     "--out; run mlabel audit again into a new --out")


def _summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.is_file():
        raise DataError(f"{folder} holds no summary.json: give the --out folder of mlabel audit")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        sources = {s["split"]: s for s in summary["sources"]}
        if not {"train", "val"} <= set(sources) or not isinstance(summary["data"], dict):
            raise ValueError("no train and val sources")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(path, exc) from None
    return summary


def load_audit(folder: Path) -> Audited:
    summary, path = _summary(folder), folder / "oof.npz"
    if not path.is_file():
        raise DataError(f"{folder} holds no oof.npz: the audit folder is incomplete; run mlabel audit again into a new --out")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            paths, labels = [str(p) for p in arrays["paths"]], [str(n) for n in arrays["labels"]]
            given = np.asarray(arrays["given"], dtype=np.int8)
        if given.shape != (len(paths), len(labels)):
            raise ValueError(f"given is {given.shape} for {len(paths)} images and {len(labels)} labels")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _damaged(path, exc) from None
    listed = read_listed(folder, summary.get("counts") if isinstance(summary.get("counts"), dict) else None)
    return Audited(folder, summary, paths, labels, given, listed)


def _short(text: str, most: int = 80) -> str:
    """``text`` clipped for a message (a hostile file can hold a field of any size)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def _closest(word: str, options, what: str) -> str:
    close = difflib.get_close_matches(word, list(options), n=1) if len(word) <= 1000 else []
    return f"{what} {_short(word)!r} is not in the audit" + (f" (did you mean {close[0]!r}?)" if close else "")


def _decision_row(row: dict, where: str, audited: Audited, images: set) -> tuple[tuple[str, str], str]:
    image, label, decision = [(row.get(k) or "").strip() for k in ("image", "label", "decision")]
    if decision not in DECISIONS:
        raise DataError(f"{where}: decision {_short(decision)!r}; give one of {list(DECISIONS)}")
    if image not in images and len(image) <= 4096:  # as the label file names it: relative to data.root
        image = str(resolve_image(Path(audited.summary["data"]["root"]), image)) if image else image
    if image not in images:
        raise DataError(f"{where}: {_closest(image, images, 'image')}; give the image as issues.csv names it")
    if label not in audited.labels:
        raise DataError(f"{where}: {_closest(label, audited.labels, 'label')}; labels: {_short(str(audited.labels), 300)}")
    if (image, label) not in audited.listed:
        raise DataError(f"{where}: the audit did not list {label!r} of {image} (not in issues.csv or "
                        "suggestions.csv); correct only the listed cells")
    return (image, label), decision


def read_corrections(path: Path, audited: Audited) -> dict[tuple[str, str], int]:
    """(image, label) -> new value (1, 0, -1) of every fix and unknown decision, checked."""
    if not path.is_file():
        raise DataError(f"corrections file {path} " + ("is a folder: give the corrections.csv file" if path.is_dir()
                                                       else "not found"))
    reader = csv.DictReader(read_text(path).splitlines())
    if reader.fieldnames is None or not {"image", "label", "decision"} <= {f.strip() for f in reader.fieldnames}:
        raise DataError(f"{path}: the header must be image,label,decision (as audit.html downloads it), "
                        f"found {reader.fieldnames}")
    images, seen, values = set(audited.paths), {}, {}
    for line, row in enumerate(reader, start=2):
        cell, decision = _decision_row(row, f"{path}:{line}", audited, images)
        if cell in seen:
            raise DataError(f"{path}:{line}: {cell[1]!r} of {cell[0]} is decided twice (also on line {seen[cell]}); "
                            "keep one row per cell")
        seen[cell] = line
        if decision != "keep":
            values[cell] = -1 if decision == "unknown" else FIXED[audited.listed[cell][0]]
    return values


def _split_rows(audited: Audited, split: str) -> tuple[dict, range]:
    """The source entry of ``split`` and the audit rows its file holds (a val carved from train
    lives in train's file)."""
    sources = {s["split"]: s for s in audited.summary["sources"]}
    n_train = sources["train"]["rows"]
    if split == "train":
        whole = sources["val"]["carved"]
        return sources["train"], range(0, len(audited.paths) if whole else n_train)
    if sources["val"]["carved"]:
        raise DataError("--split val: this audit's val rows were carved from data.train's file; apply with --split train")
    return sources["val"], range(n_train, len(audited.paths))


def _own_rows(values: dict, audited: Audited, rows: range, split: str) -> tuple[dict, int]:
    """The corrections of ``split``'s file, and how many concern the other split's file (the page
    downloads train and val decisions together: each file is written by its own ``apply``)."""
    inside = {audited.paths[i] for i in rows}
    own = {cell: value for cell, value in values.items() if cell[0] in inside}
    if values and not own:
        name = "val" if split == "train" else "train"
        raise DataError(f"none of the {len(values)} corrections concerns data.{split}'s file (they are about "
                        f"data.{name}'s images, e.g. {next(iter(values))[0]}): apply them with --split {name}")
    return own, len(values) - len(own)


def apply_corrections(folder, corrections, out, split: str = "train") -> dict:
    """Write ``out``: the label file of ``split`` with the corrections applied; returns counts.
    The audit folder is held meanwhile, so an audit rewriting it cannot change it under the reading."""
    if not (Path(folder) / "summary.json").is_file():  # checked before the lock: never a lock file in another folder
        raise DataError(f"{folder} holds no summary.json: give the --out folder of mlabel audit")
    with hold_run_dir(Path(folder), "mlabel audit apply"):
        return _apply(folder, corrections, out, split)


def _apply(folder, corrections, out, split: str) -> dict:
    audited = load_audit(Path(folder))
    values = read_corrections(Path(corrections), audited)
    source, rows = _split_rows(audited, split)
    _check_source(source)
    values, elsewhere = _own_rows(values, audited, rows, split)
    out = Path(out)
    _check_out(out, audited, [Path(corrections), *(Path(folder) / name for name in AUDIT_FILES)])
    data = audited.summary["data"]
    own = source["file"] is not None and data["format"] in ("csv", "jsonl") and \
        Path(out).suffix.lower() == Path(source["file"]).suffix.lower()
    if own and data["format"] == "csv":
        text = rewrite_csv(Path(source["file"]), data, values)
    elif own:
        text = rewrite_jsonl(Path(source["file"]), data, values, audited.labels)
    else:
        text = generic_table(audited, rows, values, out.suffix.lower())
    write_text(out, text)
    return {"changed": len(values), "file": str(out), "format": "source" if own else out.suffix.lstrip("."),
            "other_split": elsewhere}


def _check_source(source: dict) -> None:
    """The split's label file is the one the audit read: present, with the same bytes."""
    file = source["file"]
    if file is None or not source.get("sha256"):
        return  # no file of its own (a folder, COCO, ...): a generic table is written from the audit
    if not Path(file).is_file():
        raise DataError(f"{file}, the label file the audit read, is gone: restore it, or run mlabel audit again")
    if file_sha256(file) != source["sha256"]:
        raise DataError(f"{file} changed since the audit (its SHA-256 is not the one summary.json recorded): the "
                        "decisions may not fit its rows; run mlabel audit again on it and review anew")


def _check_out(out: Path, audited: Audited, also: list[Path]) -> None:
    """Refuse an ``--out`` over any input (the label files, the corrections, the audit's own files)
    or in the data (the data root, the label files' and the images' folders)."""
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"--out {out}: give a .csv or .jsonl file name")
    data = audited.summary["data"]
    inputs = [s["file"] for s in audited.summary["sources"] if s["file"]]
    check_output(out, [*inputs, *also])
    folders = {Path(data["root"]).resolve(), *(Path(f).resolve().parent for f in inputs),
               *image_folders(audited.paths)}
    refuse_inside(out, sorted(folders), "the data are never changed: write the new labels outside it")


def _by_image(values: dict) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (image, label), value in values.items():
        out.setdefault(image, {})[label] = value
    return out


def _csv_rows(path: Path) -> tuple[list[list[str]], list[str] | None, bool]:
    """The parsed rows, the text lines when each line is one row (no quotes), and a BOM flag."""
    raw = path.read_bytes()
    text = read_text(path)
    lines = text.splitlines(keepends=True) if '"' not in text else None
    return list(csv.reader(text.splitlines(keepends=True))), lines, raw.startswith(b"\xef\xbb\xbf")


def rewrite_csv(path: Path, data: dict, values: dict) -> str:
    """The CSV at ``path`` with the corrected cells changed; other rows kept as they were."""
    rows, lines, bom = _csv_rows(path)
    header = [h.strip() for h in rows[0]]
    image_at = header.index(data["image_column"] or header[0])
    root, fixes = Path(data["root"]), _by_image(values)
    for n, row in enumerate(rows[1:], start=1):
        change = fixes.get(str(resolve_image(root, row[image_at].strip())))
        if not change:
            continue
        if data["labels_column"]:
            _fix_names(row, header.index(data["labels_column"]), data["label_delimiter"], change, path)
        else:
            for label, value in change.items():
                row[header.index(label)] = str(value)
        if lines is not None:
            ending = lines[n][len(lines[n].rstrip("\r\n")):]
            lines[n] = ",".join(row) + ending
    if lines is None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        lines = [buffer.getvalue()]
    return ("\ufeff" if bom else "") + "".join(lines)


def _fix_names(row: list[str], at: int, delimiter: str, change: dict, path: Path) -> None:
    names = [t for t in row[at].split(delimiter or None) if t.strip()]
    for label, value in change.items():
        if value < 0:
            raise DataError(f"{path}: a CSV names column cannot mark {label!r} unknown; write --out NEW.jsonl "
                            "(an unknown list per image) instead")
        names = [t for t in names if t.strip() != label] + ([label] if value == 1 else [])
    row[at] = (delimiter or " ").join(names)


def rewrite_jsonl(path: Path, data: dict, values: dict, labels: list[str]) -> str:
    """The JSON lines file with the corrected records re-serialised; other lines kept as they were."""
    root, fixes = Path(data["root"]), _by_image(values)
    lines = read_text(path).splitlines(keepends=True)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        record = json.loads(line)
        change = fixes.get(str(resolve_image(root, record["image"])))
        if not change:
            continue
        positive, unknown = set(record.get("labels", [])), set(record.get("unknown", []))
        for label, value in change.items():
            positive.discard(label)
            unknown.discard(label)
            {1: positive, -1: unknown}.get(value, set()).add(label)
        record["labels"] = [n for n in labels if n in positive]
        record["unknown"] = [n for n in labels if n in unknown]
        lines[n] = json.dumps(record) + line[len(line.rstrip("\r\n")):]
    return "".join(lines)


def generic_table(audited: Audited, rows: range, values: dict, suffix: str) -> str:
    """Rows ``rows`` of the audited table, corrected, as a one-hot CSV (-1 unknown) or JSON lines,
    image paths absolute."""
    col = {name: j for j, name in enumerate(audited.labels)}
    given = audited.given[rows.start:rows.stop].copy()
    row_of = {audited.paths[i]: i - rows.start for i in rows}
    for (image, label), value in values.items():
        given[row_of[image], col[label]] = value
    paths = [os.path.abspath(audited.paths[i]) for i in rows]
    if suffix == ".jsonl":
        return "".join(json.dumps({"image": p, "labels": [audited.labels[j] for j in np.flatnonzero(g == 1)],
                                   "unknown": [audited.labels[j] for j in np.flatnonzero(g < 0)]}) + "\n"
                       for p, g in zip(paths, given))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *audited.labels])
    writer.writerows([p, *(int(v) for v in g)] for p, g in zip(paths, given))
    return buffer.getvalue()
