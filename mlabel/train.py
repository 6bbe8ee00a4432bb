"""``python -m mlabel.train RECIPE [key=value ...]`` — train, tune thresholds, evaluate, save.

The run directory receives ``config.yaml``, ``model/``, ``metrics.json``, ``history.csv``,
``run.json`` (label counts, pos_weight, best epoch, time), ``checkpoint.pt`` and ``report/``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Before torch allocates anything: CPU tensors of 2 MB and more on transparent huge pages (a
# PyTorch setting, no effect where the kernel has THP off). Fresh batch-sized buffers then cost
# about a third of the page faults (docs/INPUT_PIPELINE.md); a value already set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import yaml

from .version import __version__
from .cli import ArgumentParser, guarded
from .checks import load_checked
from .config import Config, ConfigError, DataConfig, LossConfig, ModelConfig, config_to_dict, describe_keys, head_kwargs, list_recipes
from .data import DataError, build_splits, label_counts
from .data.check import drop_bad_images, kept_rows
from .data.hf import data_keys
from .data.loaders import build_loaders, train_box_crop
from .distributed import World, broadcast_object, close_world, init_world
from .io import write_json, write_text
from .evaluation import EvalSettings, scorer
from .loop import CHECKPOINT, LoopSetup, TrainState, duration, fit_epochs
from .loop import log as _log
from .losses import TaskLoss, build_loss, loss_kwargs, pos_weight_from_counts
from .models import MultiLabelClassifier, create_model
from .policy import CONSTRAINTS
from .predictions import save_predictions
from .resume import FINISHED, finished_run, interrupted_siblings, load_resume, resume_guard
from .resolve import Machine, ResolvedConfig, resolve, saved_config
from .rundir import claim_run_dir

__all__ = ["main", "run"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_pos_weight(loss: LossConfig, train, labels: list[str]) -> torch.Tensor | None:
    """The resolved ``loss.pos_weight`` of the ``loss`` section for the training split ``train``
    (a LabelTable, dense or sparse): ``ratio`` and ``sqrt`` from its label counts."""
    spec = loss.pos_weight
    if spec == "none":
        return None
    if spec in ("ratio", "sqrt"):
        stats = train.label_stats()
        weight = pos_weight_from_counts(torch.as_tensor(np.asarray(stats["positive"])),
                                        torch.as_tensor(np.asarray(stats["negative"])), loss.pos_weight_max, labels)
        return weight.sqrt() if spec == "sqrt" else weight
    if len(spec) != len(labels):
        raise ConfigError(f"loss.pos_weight has {len(spec)} values for {len(labels)} labels {labels}")
    return torch.tensor(spec, dtype=torch.float32)


def _record_stream_skips(loader, out_dir: Path, quiet: bool, world: World) -> None:
    """Training images of wds shards that did not decode (``data.on_bad_image=skip``): counted
    per epoch they were met in, appended to ``skipped.csv`` (this rank's; rank 0 writes)."""
    skipped = getattr(loader, "skipped", None)
    if not skipped or not world.main:
        return
    found = {path: reason for path, reason in skipped}
    _log(quiet, f"skipped {len(found)} training images that did not decode (data.on_bad_image=skip; "
                f"{len(skipped)} times over the epochs); listed in {out_dir / 'skipped.csv'}")
    listed = out_dir / "skipped.csv"
    old = listed.read_text() if listed.is_file() else "split,path,reason\n"
    buffer = io.StringIO()
    csv.writer(buffer).writerows(("train", path, reason) for path, reason in found.items())
    write_text(listed, old + buffer.getvalue())


def _checked_images(data: DataConfig, splits, preprocessing: dict, out_dir: Path, world: World, quiet: bool):
    """Every image checked (``data.on_bad_image``), and with ``data.cache`` the decoded caches:
    building a cache decodes every image, so it is the check (and a later run reads the
    problems recorded with the cache instead of decoding again)."""
    log, folder = (lambda *a: _log(quiet, *a)), out_dir if world.main else None
    workers = max(2, data.num_workers)
    if not data.cache:
        return drop_bad_images(splits, data.on_bad_image, folder, workers, log=log), {}
    caches = _caches(data, splits, preprocessing, world, skip_train=train_box_crop(data, splits, preprocessing) is not None)
    tables = {name: getattr(splits, name) for name in caches}
    splits = drop_bad_images(splits, data.on_bad_image, folder, workers, log=log,
                             known={name: cache.bad for name, cache in caches.items()})
    return splits, {name: cache.without(kept_rows(tables[name], cache.bad)) if cache.bad else cache
                    for name, cache in caches.items()}


def _caches(data: DataConfig, splits, preprocessing: dict, world: World, skip_train: bool = False) -> dict:
    """Decoded caches of every split (but train where box-keeping crops read the files); rank 0
    builds them while the other ranks wait."""
    from .data.cache import DecodedCache
    tables = {n: getattr(splits, n) for n in ("train", "val", "test")
              if getattr(splits, n) is not None and not (skip_train and n == "train")}

    def build():
        return {n: DecodedCache(t, preprocessing, data.cache_dir, max(2, data.num_workers),
                                quiet=not world.main) for n, t in tables.items()}

    if world.distributed and not world.main:
        torch.distributed.barrier()  # wait until rank 0 has written the files, then map them
    caches = build()
    if world.distributed and world.main:
        torch.distributed.barrier()
    return caches


def _constraint_met(section: dict, thresholds) -> None:
    """For a constraint objective, whether each label's recall (precision) target holds here."""
    figure = CONSTRAINTS.get(thresholds.metric)
    if figure is None:
        return
    target = thresholds.min_recall if figure == "recall" else thresholds.min_precision
    for row in section["per_label"].values():
        row["constraint_met"] = None if row[figure] is None else row[figure] >= target


@dataclass
class FitResult:
    """What :func:`fit` leaves: the run directory, its ``metrics.json`` and the saved model."""
    run_dir: Path
    metrics: dict
    model: MultiLabelClassifier


def fit(recipe: str | Path, overrides: Sequence[str] = (), *, quiet: bool = False, **keys) -> FitResult:
    """Train from Python as ``python -m mlabel.train`` does: ``fit("quickstart", ["train.epochs=2"])``
    or ``fit("quickstart", train={"epochs": 2}, out_dir="runs/q")``. Keyword sections become
    dotted overrides after ``overrides``; the config is checked before anything is written."""
    if "data" in keys:  # a datasets.DatasetDict (or Dataset) becomes data.format=hf on a saved copy
        keys["data"] = data_keys(keys["data"])
    extra = []
    for key, value in keys.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        extra += [f"{key}.{sub}={json.dumps(v)}" if sub else f"{key}={json.dumps(v)}" for sub, v in items]
    out_dir, metrics = _claimed_run(load_checked(recipe, [*overrides, *extra]), quiet)
    from .models import load
    return FitResult(out_dir, metrics, load(out_dir / "model"))


def run(cfg: Config, quiet: bool = False) -> dict:
    """Train per ``cfg`` and write the run directory; returns the metrics dict. Under torchrun
    every rank trains on its shard and only rank 0 writes files."""
    return _claimed_run(cfg, quiet)[1]


def _claimed_run(cfg: Config, quiet: bool) -> tuple[Path, dict]:
    """(the run directory claimed for ``cfg.out_dir``, the metrics of the run trained into it)."""
    world, device = init_world(cfg.train.device)
    quiet = quiet or not world.main
    try:
        with claim_run_dir(cfg.out_dir, overwrite=cfg.overwrite, resume=bool(cfg.resume), main=world.main,
                           agree=lambda path: broadcast_object(path, world),
                           log=lambda text: _log(not world.main, text)) as out_dir:  # even with --quiet
            return Path(out_dir), _run(dataclasses.replace(cfg, out_dir=str(out_dir)), quiet, world, device)
    finally:
        close_world(world)


def rerunnable(saved: dict) -> dict:
    """The config as saved in ``config.yaml`` (``saved``: :func:`mlabel.resolve.saved_config`):
    rerunning it trains again (into a new directory), it neither resumes nor overwrites."""
    return {**saved, "resume": False, "overwrite": False}


def _run(config: Config, quiet: bool, world: World, device: torch.device) -> dict:
    """Resolve ``config`` on the data and this machine, then train, tune and write the run."""
    started = time.perf_counter()
    seed_everything(config.seed)
    splits = build_splits(config.data, config.task, config.seed)
    cfg = resolve(config, splits, Machine.here(device, world.size), log=lambda text: _log(quiet, text))
    saved, out_dir = saved_config(config, cfg), Path(cfg.out_dir)
    guard = resume_guard(splits, cfg.data.num_workers, world.size)
    # before anything is written, the resolved config against the checkpoint's resolved one
    resumed = load_resume(cfg.resume, saved, out_dir / CHECKPOINT, guard)
    done = finished_run(out_dir) if resumed is not None else None
    if done is not None:  # resuming it would only redo its post-training steps (and undo a later tune)
        _nothing_to_resume(out_dir, quiet)
        return done
    _check_against_data(cfg.thresholds.cross_fit, splits)
    model = _create_model(cfg.model, cfg.data, splits)
    splits, caches = _checked_images(cfg.data, splits, model.preprocessing, out_dir, world, quiet)
    counts = _describe_splits(splits, quiet)
    pos_weight = resolve_pos_weight(cfg.loss, splits.train, splits.labels)
    loss_fn = _prepare(cfg.loss, cfg.train.channels_last, model, splits, pos_weight, device, quiet)
    loaders = build_loaders(cfg.data, splits, model.preprocessing, device, world, caches, cfg.seed)
    if world.main:  # once the config, the data, the model and the loss are known to be good
        write_text(out_dir / "config.yaml", yaml.safe_dump(rerunnable(saved), sort_keys=False))
    setup = LoopSetup(device, out_dir, world, quiet, resumed, guard, saved)
    state = _train(cfg, model, loaders, loss_fn, setup)
    del resumed  # its tensors are in the model and the optimizer now
    setup.resumed = None
    metrics, outputs = _final_metrics(cfg, model, loaders[1], state, setup)
    if world.main:
        run_info = {"labels": splits.labels, "task": splits.task, "label_counts": counts,
                    "pos_weight": None if pos_weight is None else dict(zip(splits.labels, pos_weight.tolist())),
                    "best_epoch": state.best_epoch, "best_val_mAP": state.best_map,
                    "weights": state.best_weights, "stopped_early": state.stopped_early,
                    "device": str(device), "world_size": world.size, "wall_time_s": time.perf_counter() - started}
        _write_run(out_dir, cfg.thresholds.metric, model, metrics, Written(run_info, state.history, outputs, splits))
        _summarise(metrics, out_dir, time.perf_counter() - started, quiet)
    return metrics


def _create_model(model: ModelConfig, data: DataConfig, splits) -> MultiLabelClassifier:
    """The model of the ``model`` section, sized by ``data``, for the labels, task and regression
    columns of ``splits``."""
    return create_model(model.backbone, splits.labels, model.pretrained, head=model.head,
                        drop_rate=model.drop_rate, task=splits.task, image_size=data.image_size,
                        resize=data.resize, head_args=head_kwargs(model),
                        regression=splits.train.regression_names)


def _train(cfg: ResolvedConfig, model, loaders, loss_fn, setup: LoopSetup) -> TrainState:
    """The epochs, then the best weights in ``model``, saved (thresholds 0.5 until tuned)."""
    state = fit_epochs(cfg, model, loaders, loss_fn, setup)
    _record_stream_skips(loaders[0], setup.out_dir, setup.quiet, setup.world)
    model.load_state_dict(state.best_state)
    if setup.world.main:  # saved before the post-training steps, so none loses it
        model.save_pretrained(setup.out_dir / "model", extra={"mlabel_version": __version__, "threshold_metric": None})
    return state


def _nothing_to_resume(out_dir: Path, quiet: bool) -> None:
    others = "".join(f"; {d} holds an interrupted run: resume it with out_dir={d} resume=true"
                     for d in interrupted_siblings(out_dir))
    _log(quiet, f"nothing to resume: {out_dir} holds a finished run, left as it is (train more epochs into a new "
                f"out_dir, or retune with mlabel tune){others}")


def _check_against_data(folds: int, splits) -> None:
    """Settings that only the data can refute (``thresholds.cross_fit``: ``folds``), checked
    before training rather than after it."""
    n_val = len(splits.val)
    if folds and folds > n_val:
        raise ConfigError(f"thresholds.cross_fit={folds} folds need at least {folds} val images, val has "
                          f"{n_val}: set thresholds.cross_fit=0 or give a larger val split")


def _describe_splits(splits, quiet: bool) -> dict:
    """Label counts per split (for run.json and the report), logged."""
    counts = {name: label_counts(t) for name, t in (("train", splits.train), ("val", splits.val),
                                                     ("test", splits.test)) if t is not None}
    _log(quiet, f"task {splits.task}, labels {splits.labels}")
    for name, c in counts.items():
        _log(quiet, f"  {name}: {c['images']} images, positives " +
             ", ".join(f"{k} {v['positive']}" for k, v in c.items() if k != "images"))
    return counts


def _prepare(loss: LossConfig, channels_last: bool, model: MultiLabelClassifier, splits, pos_weight, device,
             quiet: bool):
    """Head bias at the label priors, the model on its device, and the loss (with the regression
    term and the model's regression scale when the data has regression columns)."""
    if pos_weight is not None:
        _log(quiet, "pos_weight: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(splits.labels, pos_weight.tolist())))
    stats = {k: torch.from_numpy(np.asarray(v)) for k, v in splits.train.label_stats().items()}
    known = (stats["positive"] + stats["negative"]).clamp(min=1)
    model.init_head_bias(stats["positive"] / known)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = TaskLoss(build_loss(loss.name, pos_weight, **loss_kwargs(loss)))
    if splits.train.regression_names:
        values = splits.train.regression
        mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
        if np.isnan(mean).any():
            missing = [n for n, m in zip(splits.train.regression_names, mean) if np.isnan(m)]
            raise DataError(f"regression columns {missing} have no value in the training split")
        model.set_regression_scale(mean, std)  # the loss standardises with the model's own scale
        loss_fn = TaskLoss(loss_fn.classification, loss.regression, loss.regression_weight,
                           model.regression_mean.cpu(), model.regression_std.cpu())
    return loss_fn.to(device)


def _final_metrics(cfg: ResolvedConfig, model, eval_loaders: dict, state: TrainState, setup: LoopSetup):
    """Calibration and thresholds tuned on val, then val (with cross-fitting) and test scored at
    them: exactly, or from histograms under ``thresholds.streaming`` (:mod:`mlabel.evaluation`
    decides). Returns the metrics and, when exact, each split's outputs and targets."""
    settings, quiet = EvalSettings.from_config(cfg), setup.quiet
    splits = {name: scorer(model, eval_loaders[name], setup.device, settings, world=setup.world, quiet=quiet)
              for name in ("val", "test") if name in eval_loaders}
    if splits["val"].streamed:
        asked = "auto" if "thresholds.streaming" in cfg.decided else str(cfg.thresholds.streaming).lower()
        _log(quiet, f"evaluation: streaming (thresholds.streaming={asked}): per-label "
                    f"histograms of {cfg.thresholds.bins} bins; no predictions/ or report")
    policy = splits["val"].tune()
    metrics = {name: split.metrics(cross_fit=name == "val") for name, split in splits.items()}
    metrics["val"]["threshold_policy"] = policy
    if "test" in metrics:
        _constraint_met(metrics["test"], cfg.thresholds)
    for section in metrics.values():  # which weights won on val and were saved: "model" or "ema"
        section["weights"] = state.best_weights
    return metrics, {name: split.scores() for name, split in splits.items() if not split.streamed}


@dataclass
class Written:
    """What a finished run writes besides the model and metrics: ``run_info`` (run.json), the
    epochs' ``history``, each exact split's ``outputs`` and targets, and the ``splits``."""
    run_info: dict
    history: list
    outputs: dict
    splits: object


def _write_run(out_dir: Path, metric: str, model, metrics: dict, written: Written) -> None:
    """The model (its thresholds tuned for ``metric``), metrics.json, run.json, predictions/ and
    the report into the run directory ``out_dir``; run.json is marked finished last (a resume of
    a finished run then leaves it as it is)."""
    run_info, history, outputs, splits = written.run_info, written.history, written.outputs, written.splits
    model.save_pretrained(out_dir / "model", extra={"mlabel_version": __version__, "threshold_metric": metric,
                                                     "threshold_policy": metrics["val"]["threshold_policy"]["policy"]})
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "run.json", run_info)
    for split, (named_outputs, targets) in outputs.items():
        save_predictions(out_dir, split, named_outputs, targets, getattr(splits, split).paths, model.labels)
    if outputs:  # streaming evaluation has no per-image scores to save or to plot
        from .report import Known, build_report
        paths = {split: getattr(splits, split).paths for split in outputs}
        build_report(out_dir, model, known=Known(metrics, history, outputs, paths))
    write_json(out_dir / "run.json", {**run_info, FINISHED: True})


def _summarise(metrics: dict, out_dir: Path, seconds: float, quiet: bool) -> None:
    from .evaluate import summary_line
    policy = metrics["val"].get("threshold_policy")
    if policy and policy["policy"] == "histogram":
        _log(quiet, "thresholds: the best bin edge per label on the val histograms (metrics.json: val.threshold_policy)")
    elif policy:
        _log(quiet, f"thresholds: policy {policy['policy']} on the calibrated val probabilities "
                    "(per label with its 90 % interval in metrics.json: val.threshold_policy)")
    for split, m in metrics.items():
        _log(quiet, summary_line(split, m))
    report = out_dir / "report" / "report.html"
    print(f"run directory: {out_dir}  ({duration(seconds)})" + (f"\nreport: {report}" if report.is_file() else ""),
          flush=True)


@guarded
def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="mlabel train", add_help=False, description="Train a multi-label or binary image classifier.",
        epilog=f"shipped recipes: {', '.join(list_recipes())}")
    parser.add_argument("recipe", nargs="?", help="a YAML path or a shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.epochs=3 data.root=/x")
    parser.add_argument("--quiet", action="store_true", help="no progress or per-epoch lines")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-h", "--help", action="store_true", help="this message and every config key")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_intermixed_args(argv)
    if args.help or args.recipe is None:
        parser.print_help()
        cfg = load_checked(args.recipe, args.overrides) if args.recipe else None
        print(f"\nconfig keys ({'values of ' + args.recipe if cfg else 'defaults'}; set with key=value):")
        print(describe_keys(cfg))
        return 0 if args.help else 2
    cfg = load_checked(args.recipe, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    run(cfg, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
