"""``audit(recipe, ...)``: out-of-fold probabilities of every train and val image, the suspicion of
every known cell, and the audit's files in ``out``. Everything the data or the settings can refute
is checked before the first file is written."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..calibration import apply_calibration, fit_calibration
from ..checks import load_checked as load_config
from ..config import DataConfig, ModelConfig
from ..data import build_splits
from ..data.synthetic import scenes_root
from ..data.tables import LabelTable
from ..distributed import resolve_device
from ..errors import DataError
from ..io import file_sha256, refuse_inside
from ..resolve import Machine, ResolvedConfig, resolve
from ..rundir import hold_run_dir
from .oof import FeatureJob, FullJob, HeadSettings, cached_features, check_folds, fit_heads, fold_of, full_logits
from .rank import BLOCK_CELLS, DEFAULT_SCORING, SCORINGS, label_thresholds, suspicion

__all__ = ["AuditResult", "AuditSettings", "audit", "DEFAULT_TOP", "BUDGETS"]

DEFAULT_TOP = 5000  # rows of issues.csv: more than a person reviews, few enough to open in a spreadsheet
BUDGETS = ("fast", "full")


@dataclass
class AuditSettings:
    """The audit's own settings (the recipe's keys come with the recipe)."""
    folds: int = 5
    budget: str = "fast"
    from_run: str | Path | None = None
    seed: int = 0
    scoring: str = DEFAULT_SCORING
    top: int = DEFAULT_TOP
    quiet: bool = False
    feature_size: int | None = None  # the fast budget's input side; None: see :func:`feature_size`

    def check(self) -> None:
        if self.budget not in BUDGETS:
            raise DataError(f"--budget {self.budget!r}: choose one of {list(BUDGETS)}")
        if self.scoring not in SCORINGS:
            raise DataError(f"--scoring {self.scoring!r}: choose one of {list(SCORINGS)}")
        if self.top < 1:
            raise DataError(f"--top {self.top}: give at least 1")
        if not 0 <= self.seed < 2 ** 32:
            raise DataError(f"--seed {self.seed}: give an integer from 0 to {2 ** 32 - 1}")
        if self.from_run is not None and self.budget == "full":
            raise DataError("--from RUN gives the fast budget its features; --budget full trains its own models")
        if self.feature_size is not None and not 16 <= self.feature_size <= 1024:
            raise DataError(f"--feature-size {self.feature_size}: give a side in pixels from 16 to 1024")

    def to_dict(self) -> dict:
        return {"folds": self.folds, "budget": self.budget, "from_run": None if self.from_run is None else
                str(self.from_run), "seed": self.seed, "scoring": self.scoring, "top": self.top,
                "feature_size": self.feature_size}


@dataclass
class AuditResult:
    """What :func:`audit` leaves; the arrays are in the row order of ``paths`` (train then val)."""
    paths: list[str]  # (N,) image ids as in the label table
    labels: list[str]  # (L,)
    given: np.ndarray  # (N, L) int8: 1, 0, -1 unknown
    probs: np.ndarray  # (N, L) float32 calibrated out-of-fold probabilities
    missing: np.ndarray  # (N, L) float32 suspicion of given-0 cells, NaN elsewhere
    spurious: np.ndarray  # (N, L) float32 suspicion of given-1 cells, NaN elsewhere
    summary: dict
    out: Path
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (L,) on the OOF probs
    fold: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (N,)


@dataclass
class Plan:
    """The checked inputs of one audit."""
    cfg: ResolvedConfig
    table: LabelTable  # train rows then val rows
    given: np.ndarray  # (N, L) int8
    sources: list  # per split: {"split", "file", "rows"}
    model: torch.nn.Module | None  # the fast budget's feature model
    device: torch.device  # where the features are computed (the device the config was resolved for)
    skipped: list = field(default_factory=list)  # (split, path, reason) left out by data.on_bad_image=skip


def _log(settings: AuditSettings, text: str) -> None:
    if not settings.quiet:
        print(text, file=sys.stderr, flush=True)


def _joined(splits) -> LabelTable:
    tables = [splits.train, splits.val]
    targets = np.concatenate([t.dense_targets() for t in tables])
    return LabelTable([p for t in tables for p in t.paths], targets, splits.labels, splits.train.source)


def _data_folders(data: DataConfig) -> list[Path]:
    """The folders the data live in: data.root (a generated set's own folder) and the folders of the
    split files."""
    root = Path(scenes_root(data.root, data.cache_dir) if data.generate else data.root).resolve()
    files = [getattr(data, s) for s in ("train", "val", "test") if getattr(data, s)]
    return [root, *{(root / f).resolve().parent for f in files}]


def image_folders(paths) -> set[Path]:
    """The folders the images are in (a shard member ``SHARD#KEY``: the shard's), links followed."""
    folders = {os.path.dirname(str(p).split("#", 1)[0]) or "." for p in paths}
    return {Path(f).resolve() for f in folders}


_NEVER_IN_DATA = "the audit never writes into the user's data: choose a folder outside it"


def _check_out(out: Path, data: DataConfig) -> None:
    """Refuse an ``--out`` in the data (``data.root``, the label files' folders), in a model
    directory, or over a file (the images' folders are checked once the table is read)."""
    from ..modelfiles import META_FILE, WEIGHTS_FILE
    refuse_inside(out, _data_folders(data), _NEVER_IN_DATA)
    target = out.resolve()
    for folder in (target, *target.parents):
        if (folder / META_FILE).is_file() or (folder / WEIGHTS_FILE).is_file():
            raise DataError(f"--out {out} is inside the model directory {folder}, which holds the model alone: "
                            "choose a folder outside it")
    if target.exists() and not target.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")


def _check_unique(table: LabelTable, n_train: int) -> None:
    """Refuse an image listed twice: its copies would land in different folds (each scored by a
    model that saw the other's labels), and the audit's cells are keyed by image."""
    first: dict[str, int] = {}
    for i, path in enumerate(table.paths):
        j = first.setdefault(str(path), i)
        if j != i:
            where = [f"data.{'train' if r < n_train else 'val'} row {r + 1 if r < n_train else r - n_train + 1}"
                     for r in (j, i)]
            raise DataError(f"image {path} is listed twice ({where[0]} and {where[1]}): the audit scores each image "
                            "once, by a model that never saw it; remove the duplicate row (keep one with the right labels)")


def _source_of(data: DataConfig, split: str, rows: int) -> dict:
    name = getattr(data, split)
    carved = split == "val" and not name
    path = None if carved else Path(name) if Path(name).is_absolute() else Path(data.root) / name
    file = str((path if path else Path(data.root) / data.train).resolve())
    exists = Path(file).is_file()
    return {"split": split, "file": file if exists else None, "rows": rows, "carved": carved,
            "sha256": file_sha256(file) if exists else None}


# The smallest side a pretrained backbone's features are computed at (small images are upscaled to
# it, never past the backbone's own pretrained input size). On the quickstart scenes (64 px, noise
# injected) the out-of-fold macro AP against the clean labels is 0.858 / 0.903 / 0.925 / 0.944 /
# 0.955 at 64 / 96 / 128 / 160 / 224 px and missing-label R@k 0.626 / 0.716 / 0.770 / 0.797 /
# 0.793, at about 1 / 2 / 3.5 / 5.5 / 10 times the 64-px feature time: 128 px keeps the audit of
# 3,000 64-px images within a minute on two cores (docs/audit.md).
FEATURE_MIN_SIZE = 128


def feature_size(image_size: int, pretrained: bool, settings: AuditSettings, native: int) -> int:
    """The fast budget's input side: ``--feature-size`` when given; ``image_size`` for a run's
    model (``--from``: the size it was trained at) or a backbone from scratch; else ``image_size``
    (the recipe's) raised to :data:`FEATURE_MIN_SIZE`, at most the backbone's pretrained size ``native``."""
    if settings.feature_size is not None:
        return settings.feature_size
    if settings.from_run is not None or not pretrained:
        return image_size
    return max(image_size, min(FEATURE_MIN_SIZE, native))


def _feature_model(model_cfg: ModelConfig, data: DataConfig, splits, settings: AuditSettings):
    """The model whose backbone gives the features: ``--from RUN``'s, else the ``model`` section's
    backbone with its (resolved) pretrained weights, at :func:`feature_size`."""
    from ..models import create_model, load
    if settings.from_run is not None:
        model = load(settings.from_run)
        if list(model.labels) != list(splits.labels):
            raise DataError(f"--from {settings.from_run}: its model has labels {model.labels}, the recipe's data "
                            f"has {splits.labels}; audit with the run that was trained on these labels")
        image_size = model.preprocessing["image_size"]  # the size the run was trained at
    else:
        torch.manual_seed(settings.seed)  # a backbone from scratch: the same random features on every rerun
        model = create_model(model_cfg.backbone, splits.labels, model_cfg.pretrained, task=splits.task,
                             resize=data.resize)  # at the backbone's pretrained size, first
        image_size = data.image_size
    size = feature_size(image_size, bool(model_cfg.pretrained), settings, model.preprocessing["image_size"])
    model.preprocessing = {**model.preprocessing, "image_size": size}
    return model


def prepare(recipe, overrides: Sequence[str], out: Path, settings: AuditSettings) -> Plan:
    """Load and check everything; nothing is written."""
    settings.check()
    config = load_config(recipe, list(overrides))
    if not config.data.train:
        raise DataError(f"recipe {recipe}: data.train is not set; the audit scores the training split: "
                        "give data.train=FILE")
    _check_out(out, config.data)
    splits = build_splits(config.data, config.task, config.seed)
    skipped = _drop_unreadable(splits, config.data.on_bad_image, settings, out)
    table = _joined(splits)
    refuse_inside(out, sorted(image_folders(table.paths)), _NEVER_IN_DATA)
    _check_unique(table, len(splits.train))
    given = table.targets.astype(np.int8)
    check_folds(given, settings.folds, splits.labels)
    device = resolve_device("auto")
    cfg = resolve(config, splits, Machine.here(device), log=lambda text: _log(settings, text), scored=())
    model = _feature_model(cfg.model, cfg.data, splits, settings) if settings.budget == "fast" else None
    sources = [_source_of(cfg.data, "train", len(splits.train)), _source_of(cfg.data, "val", len(splits.val))]
    return Plan(cfg, table, given, sources, model, device, skipped)


def _drop_unreadable(splits, policy: str, settings: AuditSettings, out: Path) -> list[tuple[str, str, str]]:
    """With ``data.on_bad_image=skip`` the train and val images that do not decode are left out of
    the audit, as training leaves them out (listed in DIR/skipped.csv); with ``error`` the first one
    met while scoring stops the audit with its name."""
    if policy != "skip":
        return []
    from ..data.check import find_bad_images, kept_rows
    rows = []
    for name in ("train", "val"):
        table = getattr(splits, name)
        found = find_bad_images(table)
        keep = kept_rows(table, found)
        if not len(keep):
            raise DataError(f"every image of the {name} split is unreadable ({found[0][1]}, ...); nothing to audit")
        if found:
            setattr(splits, name, table.subset(keep, table.source))
            rows += [(name, path, reason) for path, reason in found]
    if rows:
        _log(settings, f"left out {len(rows)} unreadable images (data.on_bad_image=skip); listed in {out / 'skipped.csv'}")
    return rows


def oof_logits(plan: Plan, recipe, overrides, out: Path, settings: AuditSettings, fold: np.ndarray):
    """Out-of-fold logits (N, L) and what the features came from."""
    if settings.budget == "full":
        job = FullJob(str(recipe), tuple(overrides), plan.table, out.resolve() / "folds", plan.cfg.data.batch_size,
                      plan.cfg.data.num_workers)
        return full_logits(job, fold), {"models": f"{settings.folds} trainings with the recipe"}
    job = FeatureJob(plan.table, plan.model.to(plan.device), plan.cfg.data.batch_size, plan.cfg.data.num_workers,
                      out / "cache")
    features, key, cached = cached_features(job, lambda text: _log(settings, text))
    rule = plan.cfg.loss.pos_weight  # ratio (auto), sqrt, none, or a list: the heads take the ratio then
    heads = HeadSettings(rule if isinstance(rule, str) else "ratio", plan.cfg.loss.pos_weight_max, seed=settings.seed)
    logits = fit_heads(features, plan.given, fold, heads)
    return logits, {"features": key, "feature_width": int(features.shape[1]), "cache_used": cached,
                    "backbone": plan.model.backbone_name, "weight_decay": heads.weight_decay,
                    "feature_size": int(plan.model.preprocessing["image_size"])}


def calibrate_per_fold(logits: np.ndarray, given: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Calibrated probabilities (N, L) float32: per fold a per-label Platt map fitted on that fold's
    own out-of-fold logits against the given labels (two parameters per label and fold, so the
    fit hardly sees any one cell), which puts the folds' differently scaled heads on one scale.
    Fitted in blocks of labels of about ``BLOCK_CELLS`` cells, so the fit's float64 temporaries
    stay a block's size whatever N and L."""
    probs = np.zeros(logits.shape, dtype=np.float32)
    for k in np.unique(fold):
        held = np.flatnonzero(fold == k)
        width = max(1, BLOCK_CELLS // max(1, len(held)))  # labels are fitted apart: blocks give the same maps
        for start in range(0, logits.shape[1], width):
            part = slice(start, start + width)
            x = torch.from_numpy(logits[held, part])
            scale, bias = fit_calibration(x, torch.from_numpy(given[held, part].astype(np.float32)), "platt")
            probs[held, part] = apply_calibration(x, scale, bias).numpy()
    return probs


def audit(recipe, overrides: Sequence[str] = (), *, out, **options) -> AuditResult:
    """Audit the labels of a recipe's train and val images (see :mod:`mlabel.audit`).

    Args:
        recipe: a recipe name or YAML path, as ``mlabel train`` takes.
        overrides: dotted ``key=value`` strings over the recipe.
        out: the audit's folder (outside the data folder).
        **options: :class:`AuditSettings` fields: folds (5), budget ("fast" | "full"), from_run
            (a run or model folder whose backbone gives the features), seed (0), scoring
            ("abs" | "margin" | "zscore"), top (rows of issues.csv, 5000), quiet.
    """
    settings = AuditSettings(**options)
    started, out = time.perf_counter(), Path(out)
    plan = prepare(recipe, overrides, out, settings)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with hold_run_dir(out, "mlabel audit"):  # a second audit (or an apply) into it stops, naming this one
            _remove_stale_temps(out)
            return _audit(plan, recipe, overrides, out, settings, started)
    except DataError:
        if created:  # a refusal found while scoring (an unreadable image, ...) leaves no half folder
            shutil.rmtree(out, ignore_errors=True)
        raise


def _remove_stale_temps(out: Path) -> None:
    """The temporary files a killed audit left (its writes are atomic: a kill leaves a ``.NAME.*.tmp``
    beside the file, never half a file); only called while the folder is held."""
    for folder in (out, out / "cache", out / "folds"):
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def _audit(plan: Plan, recipe, overrides, out: Path, settings: AuditSettings, started: float) -> AuditResult:
    from .outputs import write_outputs
    fold = fold_of(plan.given, settings.folds, settings.seed)
    logits, origin = oof_logits(plan, recipe, overrides, out, settings, fold)
    scored = time.perf_counter()
    probs = calibrate_per_fold(logits, plan.given, fold)
    thresholds = label_thresholds(probs, plan.given)
    missing, spurious = suspicion(probs, plan.given, settings.scoring, thresholds)
    result = AuditResult(list(plan.table.paths), list(plan.table.labels), plan.given, probs, missing, spurious,
                         {}, out, thresholds, fold)
    timings = {"scores_s": round(scored - started, 3), "rank_s": round(time.perf_counter() - scored, 3)}
    result.summary = write_outputs(result, plan, settings, {**origin, "timings": timings}, lambda t: _log(settings, t))
    return result

