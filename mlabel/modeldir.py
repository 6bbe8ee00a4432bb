"""A model directory as one unit: ``model.safetensors`` and ``mlabel.json`` are written so that
a reader sees the old pair or the new pair, never a mix, and the metadata is checked before a
model is built from it.

Writing (:func:`write_model`) is a small roll-forward journal. The new weights go to a temporary
file; the new metadata, which records the weights' SHA-256, goes to ``mlabel.json.pending``;
then the weights replace ``model.safetensors`` and the pending file replaces ``mlabel.json``
(each ``os.replace`` is atomic). A kill at any point leaves one of three states, and
:func:`read_model` resolves each: the old metadata matches the old weights (old model); the
weights are new and ``mlabel.json`` old, but the pending file matches them (new model); or the
pair is complete (new model). Weights that match neither are refused, naming the fix.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

from .io import atomic_path, remove_stale_temps, write_json
from .labelnames import check_label_names
from .modelfiles import META_FILE, PENDING, WEIGHTS_FILE
from .preprocess import INTERPOLATION

__all__ = ["DIGEST_KEY", "META_FILE", "WEIGHTS_FILE", "ModelFiles", "check_preprocessing", "read_model",
           "read_model_files", "validate_meta", "weights_digest", "write_metadata", "write_model"]

DIGEST_KEY = "weights_sha256"


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable where the OS lets a folder be synced (POSIX);
    Windows cannot open a folder (its renames need no such step), and some file systems refuse."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_model(directory: Path, write_weights, meta: dict) -> None:
    """Replace the model in ``directory``: ``write_weights(path)`` writes the safetensors file."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, PENDING, META_FILE):
        remove_stale_temps(directory / name)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        write_weights(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        write_json(directory / PENDING, {**meta, DIGEST_KEY: weights_digest(tmp)})
    # the weights are in place (atomic_path renamed them); the metadata follows
    os.replace(directory / PENDING, directory / META_FILE)
    _fsync_dir(directory)


def write_metadata(directory: Path, meta: dict, digest: str | None = None) -> Path:
    """Replace ``mlabel.json`` alone (the weights stay): its digest is that of the weights on disk,
    ``digest`` when the caller has just verified it (:func:`read_model`), else computed here."""
    path = directory / META_FILE
    write_json(path, {**meta, DIGEST_KEY: digest or weights_digest(directory / WEIGHTS_FILE)})
    (directory / PENDING).unlink(missing_ok=True)  # an interrupted save this one completes
    return path


def _parse(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # ValueError: also a 5,000-digit number
        raise ValueError(f"{path} is not valid JSON ({str(err)[:200] or 'nested too deeply'}); the model "
                         "directory is damaged: re-save or retrain the model") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object; the model directory is damaged")
    return meta


class ModelFiles(NamedTuple):
    """One save's metadata and the bytes of its weights (None: no ``model.safetensors``)."""
    meta: dict
    weights: bytes | None


READ_ATTEMPTS = 6  # a save replaces both files within milliseconds; 6 reads span ~0.3 s of back-off


def read_model_files(directory: Path) -> ModelFiles:
    """The metadata and the weights of one save in ``directory`` (see the module docstring).

    The weights are read once and the same bytes are hashed and returned for parsing: a save
    that replaces the files between reading the metadata and the weights shows as a digest
    mismatch, and both are read again (a few times, with back-off) rather than mixed.
    """
    for attempt in range(READ_ATTEMPTS):
        meta = _parse(directory / META_FILE)
        weights = _read_bytes(directory / WEIGHTS_FILE)
        if DIGEST_KEY not in meta or weights is None:
            # written before digests were recorded, or pickle-only weights (checked later)
            return ModelFiles(meta, weights)
        digest = hashlib.sha256(weights).hexdigest()
        if meta[DIGEST_KEY] == digest:
            return ModelFiles(meta, weights)
        pending = _parse_pending(directory / PENDING)
        if pending is not None and pending.get(DIGEST_KEY) == digest:
            return ModelFiles(pending, weights)  # a save's weights landed, its metadata not yet
        if attempt + 1 < READ_ATTEMPTS:
            # a save may be replacing the pair right now (files of two saves of one model are alike,
            # so "nothing changed since the last read" cannot tell a race from damage: wait and see)
            time.sleep(0.01 * 2 ** attempt)
    raise ValueError(f"{directory / WEIGHTS_FILE} does not match {directory / META_FILE} (its SHA-256 differs "
                     "from the one recorded): the files come from different saves or were edited (or a save "
                     "into this folder kept replacing them); re-save the model (save_pretrained) or restore "
                     "both files together")


def read_model(directory: Path) -> dict:
    """The metadata that belongs to the weights in ``directory`` (:func:`read_model_files`)."""
    return read_model_files(directory).meta


def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as handle:  # one open: a file replaced meanwhile is read whole, old or new
            return handle.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a weights file; the model directory is damaged") from None


def _parse_pending(path: Path) -> dict | None:
    """The pending metadata of an interrupted save; None when there is none (or a save has just
    moved it into place, or a writer is mid-way: the caller reads again)."""
    try:
        return _parse(path)
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- metadata checks

# Bounds on the numbers a model is rebuilt from: wide enough for any trained model, narrow enough
# that none overflows float32 (1e308 becomes inf there, and inf - inf is NaN) or allocates without end.
RANGES = {
    "calibration.scale": (1e-7, 1e5),  # fitted within [1e-6, 1e4] (mlabel.calibration), stored as float32
    "calibration.bias": (-1e5, 1e5),
    "regression.mean": (-1e30, 1e30),
    "regression.std": (1e-30, 1e30),
    "preprocessing.mean": (0.0, 1.0),  # of pixels scaled to [0, 1]: timm's configs use 0 to 0.5
    "preprocessing.std": (1e-3, 10.0),  # timm's: 0.14 to 1; zero gives NaN probabilities
    "preprocessing.crop_pct": (0.5, 2.0),  # timm's: 0.875 to 1.15; the resized side is size / crop_pct
}
IMAGE_SIZES = (8, 4096)  # data.image_size's range: 60,000 would allocate 40 GiB per image
RESIZE = ("crop", "squish")
TASKS = ("multilabel", "binary")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(values, name: str, source, count: int | None = None) -> list[float]:
    """``values``: a list of finite numbers (``count`` of them), each within ``RANGES[name]`` if given."""
    if not isinstance(values, list) or not all(_number(v) for v in values):
        raise ValueError(f"{source}: {name} must be a list of numbers, got {values!r:.80}")
    if count is not None and len(values) != count:
        raise ValueError(f"{source}: {name} has {len(values)} values for {count} labels")
    low, high = RANGES.get(name, (-math.inf, math.inf))
    # a comparison, not float(): a 400-digit integer overflows float() but compares fine
    if not all(v == v and -math.inf < v < math.inf for v in values):
        raise ValueError(f"{source}: {name} holds NaN or infinite values")
    if not all(low <= v <= high for v in values):
        kind = "positive numbers" if low > 0 else "numbers"  # a zero scale: every prediction the same
        raise ValueError(f"{source}: {name} must be {kind} in [{low:g}, {high:g}], got {values!r:.80}")
    return values


def validate_meta(meta: dict, source) -> None:
    """Every field a model is rebuilt from (``mlabel.json``, or the metadata inside an ONNX export),
    checked before it is used: refused with the file, the key and the valid values."""
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: the model metadata must be a JSON object; re-export or re-save the model")
    labels = check_label_names(meta.get("labels"), source)  # the rules every data reader applies too
    _check_task(meta, source, labels)
    n = len(labels)
    if meta.get("thresholds") is not None:
        thresholds = _finite(meta["thresholds"], "thresholds", source, n)
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"{source}: thresholds are probabilities in [0, 1], got {thresholds!r:.80}; "
                             "retune the model (mlabel tune)")
    _check_calibration(meta.get("calibration"), source, n)
    _check_regression(meta.get("regression"), source, labels)
    backbone = meta.get("backbone")
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"{source}: backbone must be a timm architecture name, got {backbone!r:.80}")
    if backbone.split(":", 1)[0] in ("hf-hub", "hf_hub", "timm", "local-dir"):
        raise ValueError(f"{source}: backbone {backbone!r:.80} would be fetched from a hub or a folder; loading a "
                         "model never downloads: save it with a plain timm architecture name")
    check_preprocessing(meta.get("preprocessing"), source)


def _check_task(meta: dict, source, labels: list[str]) -> None:
    task = meta.get("task", "multilabel")
    if task not in TASKS:
        raise ValueError(f"{source}: task must be one of {list(TASKS)}, got {task!r:.80}")
    if task == "binary" and len(labels) != 1:
        raise ValueError(f"{source}: a binary task has exactly one label, got {len(labels)}")


def _check_calibration(calibration, source, n: int) -> None:
    if calibration is None:
        return
    if not isinstance(calibration, dict) or calibration.get("method") not in ("temperature", "platt"):
        raise ValueError(f"{source}: calibration must be null or {{method: temperature | platt, scale, bias}}")
    _finite(calibration.get("scale"), "calibration.scale", source, n)
    _finite(calibration.get("bias"), "calibration.bias", source, n)


def _check_regression(regression, source, labels: list[str]) -> None:
    if regression is None or regression == {}:
        return
    names = regression.get("names") if isinstance(regression, dict) else None
    if names is None or names == []:
        raise ValueError(f"{source}: regression must be null or {{names, mean, std}} with the targets' names")
    check_label_names(names, f"{source}: regression.names")
    if set(names) & set(labels):
        raise ValueError(f"{source}: regression targets {sorted(set(names) & set(labels))} share names with labels")
    for key in ("mean", "std"):
        if key in regression:
            _finite(regression[key], f"regression.{key}", source, len(names))


def check_preprocessing(preprocessing, source) -> None:
    """The evaluation preprocessing (size, resize, crop, interpolation, mean and std) within the
    ranges that give finite pixels at an affordable size; refused naming the field and its range."""
    if not isinstance(preprocessing, dict):
        raise ValueError(f"{source}: preprocessing must be an object (image_size, resize, crop_pct, "
                         f"interpolation, mean, std), got {preprocessing!r:.80}; re-save or re-export the model")
    size = preprocessing.get("image_size")
    low, high = IMAGE_SIZES
    if not (isinstance(size, int) and not isinstance(size, bool) and low <= size <= high):
        raise ValueError(f"{source}: preprocessing.image_size must be an integer in [{low}, {high}], got {size!r:.80}")
    choices = {"resize": RESIZE, "interpolation": tuple(INTERPOLATION)}
    for key, allowed in choices.items():
        if key in preprocessing and preprocessing[key] not in allowed:
            raise ValueError(f"{source}: preprocessing.{key} must be one of {list(allowed)}, got "
                             f"{preprocessing[key]!r:.80}")
    crop = preprocessing.get("crop_pct", 1.0)
    low, high = RANGES["preprocessing.crop_pct"]
    if not (_number(crop) and low <= crop <= high):
        raise ValueError(f"{source}: preprocessing.crop_pct must be a number in [{low:g}, {high:g}], got {crop!r:.80}")
    for key in ("mean", "std"):
        values = preprocessing.get(key)
        low, high = RANGES[f"preprocessing.{key}"]
        if not (isinstance(values, list) and len(values) == 3 and all(_number(v) and low <= v <= high
                                                                      for v in values)):
            raise ValueError(f"{source}: preprocessing.{key} must be 3 numbers in [{low:g}, {high:g}] (one per "
                             f"RGB channel), got {values!r:.80}")
