"""Label Studio's JSON export of an image classification project with a ``Choices`` control.

Each task holds its image in ``data`` (a local path; Label Studio's ``/data/local-files/?d=...``
and ``/data/upload/...`` forms are resolved under ``data.root``) and its annotations. An
annotation's chosen classes are positive and the others negative for that annotator. With
several completed annotations a class is positive when every annotator chose it, negative when
none did, and unknown when they disagree: mlabel trains on what the annotators agree on and
leaves the rest unlabelled instead of picking a side. Cancelled (skipped) annotations do not
count; a task without a completed annotation is left out and counted in a warning.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

from ..errors import DataError
from .formats import multi_hot
from ..io import read_text
from .tables import LabelTable, check_files

__all__ = ["read_labelstudio_table"]

_LOCAL = "/data/local-files/?d="
_UPLOAD = "/data/upload/"


def _load_tasks(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"Label Studio export {path} not found (relative paths are taken from data.root)")
    try:
        tasks = json.loads(read_text(path))
    except RecursionError:
        raise DataError(f"{path}: the JSON nests too deeply to be a Label Studio export") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); export the "
                        "project as JSON (not JSON-MIN or CSV)") from None
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{path}: expected Label Studio's JSON export, a non-empty list of tasks")
    return tasks


def _image_value(task: dict, key: str | None, at: str) -> str:
    """The task's image reference: ``data[key]``, else ``data['image']``, else its only value."""
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f'{at}: a task needs a "data" object holding its image path')
    if key is None:
        key = "image" if "image" in data else (next(iter(data)) if len(data) == 1 else None)
    value = data.get(key) if key is not None else None
    if not isinstance(value, str) or not value:
        raise DataError(f'{at}: no image path in data (keys {sorted(data)}); set data.image_column to the '
                        "key that holds it")
    return value


def _resolve(root: Path, value: str, at: str) -> Path:
    """A local path for the task's image; URLs are refused (mlabel reads no network here)."""
    if value.startswith(_LOCAL):
        return root / unquote(value[len(_LOCAL):])
    if value.startswith(_UPLOAD):
        rest = unquote(value[len(_UPLOAD):])
        for candidate in (root / "upload" / rest, root / rest, root / Path(rest).name):
            if candidate.exists():
                return candidate
        return root / rest
    if "://" in value:
        raise DataError(f"{at}: image {value[:80]!r} is a URL; download the images and give local paths "
                        "(relative to data.root)")
    return root / value


def _choices(annotation: dict, at: str) -> set[str]:
    """The classes one annotation chose, over all its Choices results."""
    chosen: set[str] = set()
    for result in annotation.get("result") or []:
        if not isinstance(result, dict) or result.get("type") != "choices":
            continue
        values = (result.get("value") or {}).get("choices")
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise DataError(f"{at}: a choices result has {values!r:.80}; expected a list of class names")
        chosen.update(values)
    return chosen


def _task_row(task, at: str) -> tuple[set, set] | None:
    """(positive, unknown) of one task from its completed annotations; None without one."""
    annotations = task.get("annotations") or task.get("completions") or []
    if not isinstance(annotations, list):
        raise DataError(f'{at}: "annotations" must be a list')
    done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    sets = [_choices(a, at) for a in done]
    everyone, anyone = set.intersection(*sets), set.union(*sets)
    return everyone, anyone - everyone


def read_labelstudio_table(path: Path, root: Path, *, labels: Sequence[str] | None = None,
                           image_key: str | None = None) -> LabelTable:
    """Tasks of a Label Studio JSON export as a label table (see the module's rules).

    Args:
        labels: the training split's label order; ``None``: every chosen class, sorted.
        image_key: the task ``data`` key of the image; ``None``: ``image`` or the only key.
    """
    images, rows, where, skipped = [], [], [], 0
    first_at: dict[str, str] = {}
    for index, task in enumerate(_load_tasks(path)):
        at = f"{path} (task {task.get('id', index) if isinstance(task, dict) else index}, #{index + 1})"
        if not isinstance(task, dict):
            raise DataError(f"{at}: a task must be an object, got {type(task).__name__}")
        image = _resolve(root, _image_value(task, image_key, at), at)
        row = _task_row(task, at)
        if row is None:
            skipped += 1
            continue
        key = os.path.normpath(os.path.abspath(image))
        if key in first_at:
            raise DataError(f"{at}: image {image} is also the image of {first_at[key]}; one task per image "
                            "(merge the duplicates in Label Studio)")
        first_at[key] = at
        images.append(image)
        rows.append(row)
        where.append(at)
    if not images:
        raise DataError(f"{path}: none of its {skipped} tasks has a completed annotation")
    if skipped:
        print(f"warning: {path}: {skipped} of {skipped + len(images)} tasks have no completed annotation "
              "and are left out", file=sys.stderr)
    names, targets = multi_hot(rows, labels, str(path), where)
    check_files(images, str(path))
    return LabelTable([str(p) for p in images], targets, names, str(path))
