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


def load_predictions(run_dir: Path, split: str, labels: list[str] | None = None) -> dict | None:
    """The arrays of ``predictions/SPLIT.npz`` (None when the run has none), checked for shape
    and, when ``labels`` is given, for the model's label order."""
    path = Path(run_dir) / "predictions" / f"{split}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable predictions file ({err}); delete it to score again") from None
    missing = {"logits", "targets", "paths", "labels"} - set(arrays)
    n = len(arrays.get("paths", ()))
    if missing or arrays["logits"].shape != arrays["targets"].shape or len(arrays["logits"]) != n:
        raise ValueError(f"{path} is damaged (missing {sorted(missing)} or shapes that disagree); delete it")
    if labels is not None and list(arrays["labels"]) != list(labels):
        return None  # written for another label set: score afresh
    return arrays


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
    except (OSError, ValueError, KeyError):
        return None
    return [str(p) for p in paths] if len(paths) == count else None
