"""``python -m mlabel.evaluate MODEL_DIR [RECIPE] [key=value ...] [--split test]``.

Also the steps the trainer and ``mlabel.tune`` share: find a saved model and the config that
made its splits, run it over a split, calibrate and tune thresholds, and score the outputs.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .calibration import apply_calibration, fit_calibration
from .cli import guarded
from .config import Config, ConfigError, load_config
from .data import DataError, ImageDataset, build_splits, build_transform, make_loader
from .defaults import loader_workers
from .distributed import resolve_device
from .engine import collect_predictions
from .io import check_output, write_json
from .metrics import nanmean, calibration_error, cutoff_metrics, evaluate_predictions
from .models import MultiLabelClassifier, load, locate_model
from .outputs import Outputs, Targets
from .policy import choose_thresholds
from .rundir import hold_run_dir
from .thresholds import cross_fit_predictions

__all__ = ["calibrate_and_tune", "evaluate_outputs", "locate_model", "split_outputs", "main"]


def calibrate_and_tune(model: MultiLabelClassifier, logits: torch.Tensor, targets: torch.Tensor, *,
                       calibration: str = "platt", policy: str = "auto", metric: str = "f1",
                       mode: str = "exact", bins: int = 2048, bootstrap: int = 200, seed: int = 0,
                       fallback: float = 0.5, **objective) -> dict:
    """Fit the ``calibration`` (``none``, ``temperature``, ``platt``) on the val label logits
    (N, L) and their targets, then choose thresholds on the calibrated probabilities with
    ``policy`` for ``metric`` (``objective``: beta, min_recall, min_precision; ``mode``/``bins``:
    how the exact tuner under the policy runs); both are stored in ``model``. Returns the policy's
    record for metrics.json (policy, and per label the threshold, its val objective and bootstrap
    interval)."""
    if calibration == "none":
        model.set_calibration(None)
    else:
        scale, bias = fit_calibration(logits, targets, calibration)
        model.set_calibration(calibration, scale, bias)
    probs = model.probabilities(logits)
    choice = choose_thresholds(probs, targets, policy, metric, labels=model.labels, bootstrap=bootstrap,
                               seed=seed, fallback=fallback, mode=mode, bins=bins, **objective)
    model.set_thresholds(torch.from_numpy(choice.thresholds))
    return choice.to_dict(model.labels)


def evaluate_outputs(model: MultiLabelClassifier, outputs: Outputs, targets: Targets, *,
                     cross_fit: int = 0, seed: int = 0, policy: str = "auto", metric: str = "f1",
                     fallback: float = 0.5, **objective) -> dict:
    """Metrics of ``model``'s probabilities and thresholds on its named outputs and targets.

    With a calibration, ``macro_ece_uncalibrated`` and per-label ``ece_uncalibrated`` give the
    ECE of the plain sigmoid beside the calibrated ``ece``. With ``cross_fit`` folds (0: off),
    ``cross_fit`` holds the F1 reached by thresholds chosen (``policy``, ``metric``,
    ``objective``) on the other folds (the honest
    estimate next to the in-sample ``macro_f1``). With regression outputs, ``regression`` gets
    their MSE and MAE (in the targets' units) over known targets.
    """
    regression = None if outputs.regression is None else \
        _regression_metrics(model, outputs.regression, targets.regression)
    logits, targets = outputs.logits, targets.labels
    probs = model.probabilities(logits)
    # Ranking metrics from float64 scores: float32 probabilities of large or strongly scaled
    # logits tie, and ties change AP. (The map is increasing, so the ranking is the logits'.)
    scores = apply_calibration(logits.double(), model.calibration_scale, model.calibration_bias)
    metrics = evaluate_predictions(probs, targets, model.thresholds.cpu(), model.labels,
                                   binary=model.task == "binary", scores=scores)
    metrics["calibration"] = model.calibration or "none"
    if model.calibration is not None:
        raw = calibration_error(torch.sigmoid(logits.double()), targets)
        metrics["macro_ece_uncalibrated"] = nanmean(raw)
        for name, value in zip(model.labels, raw.tolist()):
            metrics["per_label"][name]["ece_uncalibrated"] = None if math.isnan(value) else value
    if cross_fit:
        folds = min(cross_fit, len(probs))
        rows = cross_fit_predictions(probs, targets, folds, seed, metric=metric, policy=policy,
                                     fallback=fallback, **objective)
        # only the cut-off figures: the ranking metrics do not depend on the thresholds
        crossed, per = cutoff_metrics(probs, targets, rows)
        metrics["cross_fit"] = {
            "folds": folds, **{k: crossed[k] for k in ("macro_f1", "micro_f1", "samples_f1", "weighted_f1")},
            "per_label_f1": {n: (None if math.isnan(f) else float(f)) for n, f in zip(model.labels, per["f1"])}}
    if regression is not None:
        metrics["regression"] = regression
    return metrics


def _regression_metrics(model: MultiLabelClassifier, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    values = model.regression_values(outputs).double().cpu()
    targets = targets.double()
    result = {}
    for j, name in enumerate(model.regression_names):
        known = ~torch.isnan(targets[:, j])
        error = values[known, j] - targets[known, j]
        result[name] = {"mse": float(error.square().mean()) if known.any() else None,
                        "mae": float(error.abs().mean()) if known.any() else None, "n": int(known.sum())}
    return result


def load_run(model_dir: str, recipe: str | None, overrides: list[str], trust_pickle: bool = False):
    """The model, the config that describes its data, and where to write results."""
    model_path, run_dir = locate_model(model_dir)
    if recipe is None:
        if run_dir is None:
            raise ConfigError(f"no config.yaml next to {model_path}: give the RECIPE whose data to use")
        recipe = str(run_dir / "config.yaml")
    cfg = load_config(recipe, overrides)
    model = load(model_path, trust_pickle=trust_pickle)
    return model, cfg, model_path, run_dir or model_path.parent


def split_outputs(model: MultiLabelClassifier, cfg: Config, split: str, device: torch.device,
                  quiet: bool = False) -> tuple[Outputs, Targets]:
    """Run ``model`` over one split of ``cfg``'s data; targets in the model's label order."""
    loader = split_loader(model, cfg, split, device)
    outputs, targets, _ = collect_predictions(model, loader, device, channels_last=cfg.train.channels_last,
                                              quiet=quiet, desc=split)
    return outputs, targets


def split_loader(model: MultiLabelClassifier, cfg: Config, split: str, device: torch.device):
    """The evaluation loader of one split of ``cfg``'s data, targets in the model's label order;
    the model is moved to ``device``."""
    splits = build_splits(cfg.data, cfg.task if cfg.task != "auto" else model.task, cfg.seed)
    table = getattr(splits, split, None)
    if table is None:
        have = [s for s in ("train", "val", "test") if getattr(splits, s) is not None]
        raise DataError(f"the data has no {split!r} split; available: {have} "
                        "(set data.test or data.test_fraction for a test split)")
    if splits.labels != model.labels:
        missing = sorted(set(model.labels) - set(splits.labels))
        extra = sorted(set(splits.labels) - set(model.labels))
        if missing or extra:
            raise DataError(f"the data's labels do not match the model's: missing {missing}, "
                            f"not known to the model {extra}")
        order = [splits.labels.index(name) for name in model.labels]
        table.targets = table.targets.reorder(order) if table.sparse else table.targets[:, order]
    loader = make_loader(ImageDataset(table, build_transform(model.preprocessing, False)),
                         batch_size=cfg.data.batch_size, train=False, num_workers=loader_workers(cfg.data.num_workers),
                         seed=cfg.seed, pin_memory=device.type == "cuda")
    model.to(device)
    return loader


def split_arguments(rest: list[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE] [key=value ...]`` -> (recipe or None, overrides)."""
    plain = [a for a in rest if "=" not in a]
    if len(plain) > 1:
        raise ConfigError(f"expected at most one RECIPE before the key=value overrides, got {plain}")
    return (plain[0] if plain else None), [a for a in rest if "=" in a]


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_line(name: str, m: dict) -> str:
    """One line of a split's figures; a figure no known target defines (``None``, e.g. mAP of a
    split without positives) shows as ``n/a``, and labels without a positive are counted."""
    acc = f"  accuracy {_figure(m['accuracy'])}" if "accuracy" in m else ""
    cross = f"  (cross-fitted {_figure(m['cross_fit']['macro_f1'])})" if "cross_fit" in m else ""
    per = m.get("per_label", {})
    no_ap = sum(row.get("ap") is None for row in per.values())
    note = (f"  ({no_ap} of {len(per)} labels have no known positive here: no AP, left out of mAP)"
            if no_ap else "")
    return (f"{name}: mAP {_figure(m['mAP'])}  macro_f1 {_figure(m['macro_f1'])}{cross}  "
            f"(at 0.5: {_figure(m['macro_f1@0.5'])})  micro_f1 {_figure(m['micro_f1'])}{acc}{note}")


# What a user's mistake raises in the model commands: reported in one line, exit status 2.


def model_command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments ``mlabel.evaluate`` and ``mlabel.tune`` share."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model_dir", help="a model directory or a run directory")
    parser.add_argument("rest", nargs="*", metavar="[RECIPE] [key=value]",
                        help="the recipe whose data to use (default: the run's config.yaml) and overrides")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the config's)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickle-based weights file")
    parser.add_argument("--quiet", action="store_true")
    return parser


@guarded
def main(argv: list[str]) -> int:
    parser = model_command_parser("mlabel evaluate", "Metrics of a saved model on one split, written as JSON.")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval-SPLIT.json)")
    args = parser.parse_intermixed_args(argv)
    model_path, run_dir = locate_model(args.model_dir)
    if run_dir is None or not (run_dir / "run.json").is_file():
        return _evaluate(args)
    with hold_run_dir(run_dir, "mlabel evaluate"):  # its report is rebuilt from the model read now
        return _evaluate(args)


def _evaluate(args) -> int:
    """Score the split, then write the metrics and rebuild the run's report (after everything is read)."""
    recipe, overrides = split_arguments(args.rest)
    model, cfg, _, out_dir = load_run(args.model_dir, recipe, overrides, args.trust_pickle)
    out = Path(args.out) if args.out else Path(out_dir) / f"eval-{args.split}.json"
    check_output(out)  # never over the model's own files
    device = resolve_device(args.device or cfg.train.device)
    loader = split_loader(model, cfg, args.split, device)
    from .loop import stream_metrics, streams
    streamed = streams(cfg, loader)  # thresholds.streaming: no (N, L) scores held
    if streamed:
        from .distributed import World
        metrics = stream_metrics(model, loader, device, World(), cfg, args.quiet)
    else:
        outputs, targets, _ = collect_predictions(model, loader, device, channels_last=cfg.train.channels_last,
                                                  quiet=args.quiet, desc=args.split)
        metrics = evaluate_outputs(model, outputs, targets)
    line = summary_line(args.split, metrics) + (f"  (streamed: histograms of {cfg.thresholds.bins} bins)"
                                                if streamed else "")
    from .report import report_inputs
    # the model is unchanged, so a streamed evaluation leaves the report as it is (it needs per-image scores)
    report = (lambda device=None, quiet=False: None) if streamed else report_inputs(out_dir, model)
    write_json(out, {args.split: metrics})
    print(line)
    print(f"metrics written to {out}")
    report(device, args.quiet)  # a run's report follows the saved model
    return 0


if __name__ == "__main__":
    sys.exit(main())
