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

__all__ = ["DIGEST_KEY", "META_FILE", "WEIGHTS_FILE", "ModelFiles", "read_model", "read_model_files", "validate_meta",
           "weights_digest", "write_metadata", "write_model"]

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mlabel.json"
PENDING = META_FILE + ".pending"
DIGEST_KEY = "weights_sha256"


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
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
        time.sleep(0.01 * 2 ** attempt)  # a save may be replacing the pair right now
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

def _finite(values, name: str, source, count: int | None = None) -> list[float]:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise ValueError(f"{source}: {name} must be a list of numbers, got {values!r:.80}")
    if count is not None and len(values) != count:
        raise ValueError(f"{source}: {name} has {len(values)} values for {count} labels")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{source}: {name} holds NaN or infinite values")
    return values


def validate_meta(meta: dict, source) -> None:
    """Values a model would silently misbehave with: refused with the key and the damage."""
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"{source}: labels must be a non-empty list of names")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{source}: labels repeat a name: {sorted({x for x in labels if labels.count(x) > 1})}")
    n = len(labels)
    if meta.get("thresholds") is not None:
        thresholds = _finite(meta["thresholds"], "thresholds", source, n)
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"{source}: thresholds are probabilities in [0, 1], got {thresholds}; "
                             "retune the model (mlabel tune)")
    calibration = meta.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict) or calibration.get("method") not in ("temperature", "platt"):
            raise ValueError(f"{source}: calibration must be null or {{method: temperature | platt, scale, bias}}")
        scale = _finite(calibration.get("scale"), "calibration.scale", source, n)
        _finite(calibration.get("bias"), "calibration.bias", source, n)
        if not all(s > 0 for s in scale):
            raise ValueError(f"{source}: calibration.scale must be positive")
    regression = meta.get("regression")
    if regression:
        names = regression.get("names") or []
        if "mean" in regression:
            _finite(regression["mean"], "regression.mean", source, len(names))
        if "std" in regression:
            std = _finite(regression["std"], "regression.std", source, len(names))
            if not all(s > 0 for s in std):
                raise ValueError(f"{source}: regression.std must be positive (a zero scale makes every "
                                 "prediction the mean)")
    backbone = meta.get("backbone")
    if not isinstance(backbone, str) or backbone.split(":", 1)[0] in ("hf-hub", "hf_hub", "timm", "local-dir"):
        raise ValueError(f"{source}: backbone {backbone!r} would be fetched from a hub or a folder; loading a "
                         "model never downloads: save it with a plain timm architecture name")
