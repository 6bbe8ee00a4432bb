"""``python -m mlabel.tune MODEL_DIR [RECIPE] [key=value ...] [--metric f1 ...]``.

Re-tunes the per-label thresholds (and the calibration) of a saved model on the validation split
of the run's data and stores them in the model's ``mlabel.json``; the weights are not touched.
Prints old and new threshold and val score per label, and writes ``RUN_DIR/tune.json``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from .calibration import CALIBRATION_METHODS
from .cli import guarded
from .distributed import resolve_device
from .errors import DataError
from .evaluate import load_run, model_command_parser, split_arguments, summary_line
from .evaluation import EvalSettings, evaluate_outputs, scorer, split_loader, split_outputs
from .io import write_json
from .models import locate_model
from .policy import CONSTRAINTS, POLICIES
from .rundir import hold_run_dir
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
        extra += f"  ({row['kept']})" if "kept" in row else ""
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
    model_path, run_dir = locate_model(args.model_dir)
    # held from reading the model to the last write: a second tune (or a report, or a training)
    # cannot slip its mlabel.json or report.html between ours
    with hold_run_dir(run_dir or model_path.parent, "mlabel tune"):
        return apply_json(args) if args.from_json else _tune(args)


def _tune(args) -> int:
    """Tune on val, everything computed before the first write: mlabel.json, tune.json, the report."""
    recipe, overrides = split_arguments(args.rest)
    tuned = [f"thresholds.{key}={getattr(args, key)}" for key in
             ("metric", "beta", "min_recall", "min_precision", "policy", "mode", "cross_fit")
             if getattr(args, key) is not None]  # checked like any override, ranges included
    if args.calibration:
        tuned.append(f"calibration.method={args.calibration}")
    model, config, model_path, out_dir = load_run(args.model_dir, recipe, [*overrides, *tuned], args.trust_pickle)
    device = resolve_device(args.device or config.train.device)
    cfg, loader = split_loader(model, config, "val", device)
    th_cfg, cal_cfg = cfg.thresholds, cfg.calibration
    val = scorer(model, loader, device, EvalSettings.from_config(cfg), quiet=args.quiet, desc="val")
    streamed = val.streamed  # thresholds.streaming: histograms, no (N, L) scores held
    previous = _Previous.of(model)
    params = {"beta": th_cfg.beta, "min_recall": th_cfg.min_recall, "min_precision": th_cfg.min_precision,
              "mode": "histogram" if streamed else th_cfg.mode, **({"bins": th_cfg.bins} if streamed else {})}
    before = val.metrics()
    kept = _untunable(before, model.labels, cfg.data.val)
    with warnings.catch_warnings():  # the tuner's "keep 0.5" warning: these labels keep their previous one
        warnings.filterwarnings("ignore", message="labels .* have no positive or no negative")
        policy = val.tune()
    previous.restore(model, kept, policy)
    after = val.metrics(cross_fit=True)
    table = _streamed_table(policy, model.labels, before, th_cfg) if streamed else \
        policy_table(policy, model.labels, before)
    after["threshold_policy"] = policy
    lines = [table, summary_line("val before", before), summary_line("val after", after)]
    from .report import report_inputs
    report = report_inputs(out_dir, model, streamed)  # a damaged predictions/ file stops us here
    # the writes, last
    meta_path = model.save_metadata(model_path, {
        "threshold_metric": th_cfg.metric, "threshold_policy": policy["policy"], "threshold_params": params})
    write_json(Path(out_dir) / "tune.json", {"metric": th_cfg.metric, "policy": policy["policy"],
                                             "calibration": cal_cfg.method, "threshold_policy": policy,
                                             "val_before": before, "val_after": after})
    print("\n".join(lines))
    how = "streamed histograms" if streamed else f"policy {policy['policy']}"
    print(f"thresholds ({th_cfg.metric}, {how}) stored in {meta_path}")
    report(args.device, args.quiet)  # a run's report follows the new thresholds, or says it does not
    return 0


class _Previous:
    """The model's decision before tuning, to give back to labels val cannot tune."""

    def __init__(self, thresholds, method, scale, bias):
        self.thresholds, self.method, self.scale, self.bias = thresholds, method, scale, bias

    @classmethod
    def of(cls, model) -> "_Previous":
        copy = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return cls(copy(model.thresholds), model.calibration, copy(model.calibration_scale),
                   copy(model.calibration_bias))

    def restore(self, model, kept: dict[str, str], policy: dict) -> None:
        """Labels in ``kept`` (name -> why) take back their previous decisions: the previous
        threshold and calibration, or without a calibration now, the threshold on the plain
        sigmoid that decides the same (``sigmoid((logit(t) - bias) / scale)``)."""
        if not kept:
            return
        idx = torch.tensor([model.labels.index(name) for name in kept])
        n = model.num_labels
        old_scale = self.scale if self.scale is not None else torch.ones(n)
        old_bias = self.bias if self.bias is not None else torch.zeros(n)
        thresholds = model.thresholds.detach().cpu().clone().double()
        old = self.thresholds.double()
        if model.calibration is not None:
            scale, bias = model.calibration_scale.cpu().clone(), model.calibration_bias.cpu().clone()
            scale[idx], bias[idx] = old_scale[idx], old_bias[idx]
            model.set_calibration(model.calibration, scale, bias)
            thresholds[idx] = old[idx]
        else:
            thresholds[idx] = torch.sigmoid((torch.logit(old[idx]) - old_bias[idx].double()) / old_scale[idx].double())
        model.set_thresholds(thresholds.float())
        for name, why in kept.items():
            row = policy["per_label"][name]
            row["threshold"] = float(model.thresholds[model.labels.index(name)])
            row["kept"] = f"{why}: previous threshold kept"


def _untunable(before: dict, labels: list[str], val: str | None) -> dict[str, str]:
    """The labels val cannot tune (name -> why): no known positive or no known negative. When
    that is every label, nothing can be tuned: refused before anything is written (``val``:
    ``data.val``, named in the message)."""
    kept = {}
    for name in labels:
        row = before["per_label"][name]
        n_pos, n_neg = row["tp"] + row["fn"], row["fp"] + row["tn"]
        if not n_pos or not n_neg:
            kept[name] = "no positive in val" if not n_pos else "no negative in val"
    if len(kept) == len(labels):
        source = f"data.val={val}" if val else "the val split"
        raise DataError(f"{source} ({before['n_images']} images) has no label with both a positive and a "
                        "negative known target: there is nothing to tune on, and the model is left as it is; "
                        "give a val split with positives")
    return kept


def _streamed_table(policy: dict, labels: list[str], before: dict, t) -> str:
    lines = [f"{'label':<24}{'old':>8}{'new':>8}  {'val ' + t.metric:>14}  (best bin edge of {t.bins})"]
    for name in labels:
        row = policy["per_label"][name]
        extra = f"  ({row['kept']})" if "kept" in row else ""
        lines.append(f"{name:<24}{before['per_label'][name]['threshold']:8.3f}{row['threshold']:8.3f}  "
                     f"{_fmt(row['val_' + t.metric]):>14}{extra}")
    return "\n".join(lines)


TUNING_OPTIONS = ("metric", "beta", "min_recall", "min_precision", "policy", "mode", "cross_fit", "calibration")


def read_thresholds(path: str, labels: list[str]) -> dict[str, float]:
    """``{label: threshold}`` from a thresholds JSON, every name and value checked; any flaw is
    one ``ValueError`` naming the file and the key (duplicate keys included: JSON would keep the
    last one silently)."""
    import difflib
    import math
    file = Path(path)
    if not file.is_file() or file.stat().st_size > 50_000_000:
        raise ValueError(f"{path}: not a file of at most 50 MB; give the thresholds JSON the report downloads")
    data = _parse_json(file, path)
    chosen = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(chosen, dict) or not chosen:
        raise ValueError(f'{path} needs a non-empty "thresholds" object of label names to numbers, '
                         'e.g. {"thresholds": {"%s": 0.42}}' % labels[0])
    for name, value in chosen.items():
        if name not in labels:
            close = difflib.get_close_matches(name[:1000], labels, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; the labels are {', '.join(labels[:20])}"
            raise ValueError(f"{path}: label {_short(name)} is not one of the model's{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            shown = {type(None): "null", list: "a list", dict: "an object", bool: "a boolean"}.get(
                type(value)) or _short(value)
            raise ValueError(f"{path}: the threshold of {_short(name)} is {shown}; give a number in [0, 1]")
    return {name: float(value) for name, value in chosen.items()}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _parse_json(file: Path, path: str):
    """The JSON of ``file``: numbers of any size become floats (a 5,000-digit integer is ``inf``,
    not a conversion error), a repeated key in an object and nesting deeper than Python's
    parser goes are refused with the file named."""
    import json

    def unique(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{path}: the key {_short(key)} appears twice in one object (JSON would "
                                 "keep the last one silently); keep one")
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=unique, parse_int=float)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: the JSON nests too deeply; give the thresholds JSON the report downloads") from None


def apply_json(args) -> int:
    """``mlabel tune RUN --from-json FILE``: set the thresholds FILE names (the others stay), keep the
    calibration, store them in ``mlabel.json``, print val before and after, and rebuild the report.
    Everything is read and computed before the first write."""
    from .models import load
    from .predictions import load_scores
    given = [f"--{key.replace('_', '-')}" for key in TUNING_OPTIONS if getattr(args, key) is not None]
    if given or args.rest:
        raise ValueError(f"--from-json sets the thresholds as they are: drop {' '.join(given + args.rest)}")
    model_path, run_dir = locate_model(args.model_dir)
    model = load(model_path, trust_pickle=args.trust_pickle)
    chosen = read_thresholds(args.from_json, model.labels)
    scores = load_scores(run_dir, "val", model.labels) if run_dir is not None else None
    if scores is None and run_dir is not None:
        from .checks import load_checked
        cfg = load_checked(run_dir / "config.yaml")
        scores = split_outputs(model, cfg, "val", resolve_device(args.device or cfg.train.device), args.quiet)
    before = evaluate_outputs(model, *scores) if scores is not None else None
    old = model.thresholds.tolist()
    model.set_thresholds([chosen.get(name, t) for name, t in zip(model.labels, old)])
    lines = [f"{name:<24}{t_old:8.3f} -> {t_new:.3f}"
             for name, t_old, t_new in zip(model.labels, old, model.thresholds.tolist()) if name in chosen]
    if scores is not None:
        lines += [summary_line("val before", before), summary_line("val after", evaluate_outputs(model, *scores))]
    from .report import report_inputs
    report = report_inputs(run_dir, model)
    # the writes, last
    meta_path = model.save_metadata(model_path, {"threshold_metric": "manual", "threshold_policy": "manual",
                                                 "threshold_source": str(Path(args.from_json).resolve())})
    print("\n".join(lines[:len(chosen)]))
    print(f"{len(chosen)} of {model.num_labels} thresholds set from {args.from_json}; stored in {meta_path}")
    print("\n".join(lines[len(chosen):]))
    report(args.device, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
