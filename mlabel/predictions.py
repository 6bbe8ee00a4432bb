"""``RUN_DIR/predictions/{val,test}.npz``: what a run's model gave on its evaluation splits, so the
report and later tuning read scores instead of running the model again.

Each file is a NumPy ``.npz`` (no pickles; read with ``allow_pickle=False``) of:

- ``logits`` (N, L) float32: the raw label logits (apply the model's calibration and thresholds
  from ``model/mlabel.json`` to get its probabilities and decisions, as :mod:`mlabel.report` does);
- ``targets`` (N, L) float32: 1 / 0 / -1 (unknown);
- ``paths`` (N,) str: the image files, in the split's order;
- ``labels`` (L,) str: the label names, in column order;
- ``regression`` (N, R) float32 and ``regression_targets`` (N, R) (NaN = missing), only with
  regression columns: the standardised outputs and the targets in their own units.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path
from .outputs import Outputs, Targets

__all__ = ["save_predictions", "load_predictions", "load_scores", "load_paths"]


def save_predictions(run_dir: Path, split: str, outputs: Outputs, targets: Targets, paths: list[str],
                     labels: list[str]) -> Path:
    """Write ``predictions/SPLIT.npz`` atomically from a split's named outputs and targets."""
    def array(x):
        return np.asarray(x.numpy() if torch.is_tensor(x) else x, np.float32)

    logits, codes = array(outputs.logits), array(targets.labels)
    if len(logits) != len(paths) or len(codes) != len(paths) or logits.shape[1] != len(labels):
        raise ValueError(f"{split}: {logits.shape} outputs and {codes.shape} targets for {len(paths)} images "
                         f"and {len(labels)} labels")
    arrays = {"logits": logits, "targets": codes, "paths": np.asarray(paths, dtype=str),
              "labels": np.asarray(labels, dtype=str)}
    if outputs.regression is not None:
        arrays.update(regression=array(outputs.regression), regression_targets=array(targets.regression))
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return path


# What a damaged .npz raises while it is read: a truncated zip, a bad CRC or deflate stream, a
# member that is not an array, a header NumPy cannot parse.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def load_predictions(run_dir: Path, split: str, labels: list[str] | None = None) -> dict | None:
    """The arrays of ``predictions/SPLIT.npz`` (None when the run has none), checked for shape,
    dtype and values and, when ``labels`` is given, for the model's label order. A damaged file
    is a ``ValueError`` naming it."""
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except _UNREADABLE as err:
        raise ValueError(f"{path} is not a readable predictions file ({type(err).__name__}: {err}); "
                         "delete it to score again") from None
    problem = _problem(arrays)
    if problem:
        raise ValueError(f"{path} is damaged ({problem}); delete it to score again")
    if labels is not None and list(arrays["labels"]) != list(labels):
        return None  # written for another label set: score afresh
    return arrays


def _problem(arrays: dict) -> str | None:
    """What is wrong with the arrays of a predictions file, or None."""
    missing = {"logits", "targets", "paths", "labels"} - set(arrays)
    if missing:
        return f"missing {sorted(missing)}"
    logits, targets, paths, labels = (arrays[k] for k in ("logits", "targets", "paths", "labels"))
    if paths.ndim != 1 or labels.ndim != 1 or paths.dtype.kind != "U" or labels.dtype.kind != "U":
        return "paths and labels must be lists of text"
    for key in ("logits", "targets", "regression", "regression_targets"):
        if key in arrays and (arrays[key].dtype.kind not in "fiu" or arrays[key].ndim != 2):
            return f"{key} must be a 2-D array of numbers, not {arrays[key].dtype} of shape {arrays[key].shape}"
    if logits.shape != targets.shape or logits.shape != (len(paths), len(labels)):
        return (f"logits {logits.shape} and targets {targets.shape} disagree with {len(paths)} paths and "
                f"{len(labels)} labels")
    if np.isnan(logits).any():
        return "logits hold NaN"
    if ("regression" in arrays) != ("regression_targets" in arrays) or (
            "regression" in arrays and arrays["regression"].shape != arrays["regression_targets"].shape):
        return "regression and regression_targets must come together, of one shape"
    return None


def load_scores(run_dir: Path, split: str, labels: list[str]) -> tuple[Outputs, Targets] | None:
    """The named outputs and targets (tensors) of ``predictions/SPLIT.npz``, as training had them
    (the inverse of :func:`save_predictions`); None when there is no file for these labels."""
    saved = load_predictions(run_dir, split, labels)
    if saved is None:
        return None
    tensor = lambda key: torch.from_numpy(saved[key]) if key in saved else None  # noqa: E731
    return (Outputs(tensor("logits"), tensor("regression")),
            Targets(tensor("targets"), tensor("regression_targets")))


def load_paths(run_dir: Path, split: str, count: int) -> list[str] | None:
    """The image files of ``predictions/SPLIT.npz`` (None when there is no file, or it holds
    another number of images than the scores in hand)."""
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            paths = data["paths"]
    except _UNREADABLE:
        return None
    return [str(p) for p in paths] if len(paths) == count else None
