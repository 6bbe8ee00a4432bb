"""``python -m mlabel.tune MODEL_DIR [RECIPE] [key=value ...] [--metric f1 ...]``.

Re-tunes the per-label thresholds (and the calibration) of a saved model on the validation split
of the run's data and stores them in the model's ``mlabel.json``; the weights are not touched.
Prints old and new threshold and val score per label, and writes ``RUN_DIR/tune.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .calibration import CALIBRATION_METHODS
from .cli import guarded
from .distributed import resolve_device
from .config import cross_fit_kwargs, threshold_kwargs
from .engine import collect_predictions
from .evaluate import (calibrate_and_tune, evaluate_outputs, load_run, model_command_parser,
                       split_arguments, split_loader, split_outputs, summary_line)
from .loop import stream_metrics, stream_tune, streams
from .io import write_json
from .policy import CONSTRAINTS, POLICIES
from .thresholds import OBJECTIVES

__all__ = ["main"]


def _fmt(x) -> str:
    return "    n/a" if x is None else f"{x:7.4f}"


def policy_table(policy: dict, labels: list[str], before: dict | None = None) -> str:
    """Per label: old and new threshold, the val objective at the new one and its interval."""
    metric = policy["metric"]
    level = round(policy["level"] * 100)
    lines = [f"threshold policy: {policy['policy']} (objective {metric}); interval: {level} % bootstrap of val",
             f"{'label':<24}{'old':>8}{'new':>8}  {'val ' + metric:>14}  {level} % interval"]
    for name in labels:
        row = policy["per_label"][name]
        old = f"{before['per_label'][name]['threshold']:8.3f}" if before else f"{'':8}"
        low, high = row[f"interval_{level}"]
        extra = f"  ({row['chosen']})" if "chosen" in row else ""
        if "holds_out_of_sample" in row:  # constraint objectives: checked on held-out folds
            figure = CONSTRAINTS[metric]
            low_c, high_c = row[f"{figure}_interval_{level}"]
            extra += (f"  {figure} [{_fmt(low_c)}, {_fmt(high_c)}], cross-fitted {_fmt(row['cross_fit_' + figure])},"
                      f" holds: {row['holds_out_of_sample']}")
        lines.append(f"{name:<24}{old}{row['threshold']:8.3f}  {_fmt(row['val_' + metric]):>14}  "
                     f"[{_fmt(low)}, {_fmt(high)}]{extra}")
    return "\n".join(lines)


@guarded
def main(argv: list[str]) -> int:
    parser = model_command_parser("mlabel tune", "(Re)tune per-label thresholds on the validation split.")
    parser.add_argument("--metric", choices=OBJECTIVES, help="objective (default: thresholds.metric of the config)")
    parser.add_argument("--beta", type=float, help="beta of fbeta")
    parser.add_argument("--min-recall", type=float, help="for precision_at_recall")
    parser.add_argument("--min-precision", type=float, help="for recall_at_precision")
    parser.add_argument("--policy", choices=POLICIES, help="threshold policy (default: thresholds.policy of the config)")
    parser.add_argument("--mode", choices=["exact", "histogram"])
    parser.add_argument("--cross-fit", type=int, metavar="K", help="folds for the cross-fitted F1 (0 = off)")
    parser.add_argument("--calibration", choices=CALIBRATION_METHODS,
                        help="refit the calibration (default: calibration.method of the config)")
    parser.add_argument("--from-json", metavar="FILE", help='apply the thresholds of FILE ({"thresholds": '
                        '{"label": 0.42, ...}}, as the report\'s explorer downloads it) instead of tuning')
    args = parser.parse_intermixed_args(argv)
    if args.from_json:
        return apply_json(args)
    recipe, overrides = split_arguments(args.rest)
    tuned = [f"thresholds.{key}={getattr(args, key)}" for key in
             ("metric", "beta", "min_recall", "min_precision", "policy", "mode", "cross_fit")
             if getattr(args, key) is not None]  # checked like any override, ranges included
    if args.calibration:
        tuned.append(f"calibration.method={args.calibration}")
    model, cfg, model_path, out_dir = load_run(args.model_dir, recipe, [*overrides, *tuned], args.trust_pickle)
    th_cfg, cal_cfg = cfg.thresholds, cfg.calibration
    device = resolve_device(args.device or cfg.train.device)
    loader = split_loader(model, cfg, "val", device)
    if streams(cfg, loader):
        return _tune_streamed(model, cfg, loader, device, model_path, out_dir, args.quiet)
    outputs, targets, _ = collect_predictions(model, loader, device, channels_last=cfg.train.channels_last,
                                              quiet=args.quiet, desc="val")
    before = evaluate_outputs(model, outputs, targets)
    policy = calibrate_and_tune(model, outputs.logits, targets.labels, calibration=cal_cfg.method, seed=cfg.seed,
                                **threshold_kwargs(th_cfg))
    after = evaluate_outputs(model, outputs, targets, seed=cfg.seed, **cross_fit_kwargs(th_cfg))
    after["threshold_policy"] = policy
    meta_path = model.save_metadata(model_path, {
        "threshold_metric": th_cfg.metric, "threshold_policy": policy["policy"],
        "threshold_params": {"beta": th_cfg.beta, "min_recall": th_cfg.min_recall,
                             "min_precision": th_cfg.min_precision, "mode": th_cfg.mode}})
    print(policy_table(policy, model.labels, before))
    print(summary_line("val before", before))
    print(summary_line("val after", after))
    write_json(Path(out_dir) / "tune.json", {"metric": th_cfg.metric, "policy": policy["policy"],
                                             "calibration": cal_cfg.method, "threshold_policy": policy,
                                             "val_before": before, "val_after": after})
    print(f"thresholds ({th_cfg.metric}, policy {policy['policy']}) stored in {meta_path}")
    from .report import rebuild_run_report
    rebuild_run_report(out_dir, model, device, args.quiet)  # a run's report follows the new thresholds
    return 0


def _tune_streamed(model, cfg, loader, device, model_path, out_dir, quiet: bool) -> int:
    """``thresholds.streaming``: calibration and thresholds from the val histograms, val scored
    before and after in streamed passes; no (N, L) scores held, no report (it needs them)."""
    from .distributed import World
    world, t = World(), cfg.thresholds
    before = stream_metrics(model, loader, device, world, cfg, quiet)
    policy = stream_tune(model, loader, device, world, cfg, quiet)
    after = stream_metrics(model, loader, device, world, cfg, quiet)
    after["threshold_policy"] = policy
    meta_path = model.save_metadata(model_path, {
        "threshold_metric": t.metric, "threshold_policy": policy["policy"],
        "threshold_params": {"beta": t.beta, "min_recall": t.min_recall, "min_precision": t.min_precision,
                             "mode": "histogram", "bins": t.bins}})
    print(f"{'label':<24}{'old':>8}{'new':>8}  {'val ' + t.metric:>14}  (best bin edge of {t.bins})")
    for name in model.labels:
        row = policy["per_label"][name]
        print(f"{name:<24}{before['per_label'][name]['threshold']:8.3f}{row['threshold']:8.3f}  "
              f"{_fmt(row['val_' + t.metric]):>14}")
    print(summary_line("val before", before))
    print(summary_line("val after", after))
    write_json(Path(out_dir) / "tune.json", {"metric": t.metric, "policy": policy["policy"],
                                             "calibration": cfg.calibration.method, "threshold_policy": policy,
                                             "val_before": before, "val_after": after})
    print(f"thresholds ({t.metric}, streamed histograms) stored in {meta_path}")
    return 0


TUNING_OPTIONS = ("metric", "beta", "min_recall", "min_precision", "policy", "mode", "cross_fit", "calibration")


def read_thresholds(path: str, labels: list[str]) -> dict[str, float]:
    """``{label: threshold}`` from a thresholds JSON, every name and value checked."""
    import difflib
    import json
    import math
    file = Path(path)
    if not file.is_file() or file.stat().st_size > 50_000_000:
        raise ValueError(f"{path}: not a file of at most 50 MB; give the thresholds JSON the report downloads")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    chosen = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(chosen, dict) or not chosen:
        raise ValueError(f'{path} needs a non-empty "thresholds" object of label names to numbers, '
                         'e.g. {"thresholds": {"%s": 0.42}}' % labels[0])
    for name, value in chosen.items():
        if name not in labels:
            close = difflib.get_close_matches(str(name), labels, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; the labels are {', '.join(labels[:20])}"
            raise ValueError(f"{path}: label {name!r} is not one of the model's{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise ValueError(f"{path}: the threshold of {name!r} is {value!r}; give a number in [0, 1]")
    return {name: float(value) for name, value in chosen.items()}


def apply_json(args) -> int:
    """``mlabel tune RUN --from-json FILE``: set the thresholds FILE names (the others stay), keep the
    calibration, store them in ``mlabel.json``, print val before and after, and rebuild the report."""
    from .models import load, locate_model
    from .predictions import load_scores
    given = [f"--{key.replace('_', '-')}" for key in TUNING_OPTIONS if getattr(args, key) is not None]
    if given or args.rest:
        raise ValueError(f"--from-json sets the thresholds as they are: drop {' '.join(given + args.rest)}")
    model_path, run_dir = locate_model(args.model_dir)
    model = load(model_path, trust_pickle=args.trust_pickle)
    chosen = read_thresholds(args.from_json, model.labels)
    scores = load_scores(run_dir, "val", model.labels) if run_dir is not None else None
    if scores is None and run_dir is not None:
        from .config import load_config
        cfg = load_config(run_dir / "config.yaml")
        scores = split_outputs(model, cfg, "val", resolve_device(args.device or cfg.train.device), args.quiet)
    before = evaluate_outputs(model, *scores) if scores is not None else None
    old = model.thresholds.tolist()
    model.set_thresholds([chosen.get(name, t) for name, t in zip(model.labels, old)])
    meta_path = model.save_metadata(model_path, {"threshold_metric": "manual", "threshold_policy": "manual",
                                                 "threshold_source": str(Path(args.from_json).resolve())})
    for name, t_old, t_new in zip(model.labels, old, model.thresholds.tolist()):
        if name in chosen:
            print(f"{name:<24}{t_old:8.3f} -> {t_new:.3f}")
    print(f"{len(chosen)} of {model.num_labels} thresholds set from {args.from_json}; stored in {meta_path}")
    if scores is not None:
        print(summary_line("val before", before))
        print(summary_line("val after", evaluate_outputs(model, *scores)))
    from .report import rebuild_run_report
    rebuild_run_report(run_dir, model, args.device, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
