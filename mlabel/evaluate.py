"""``python -m mlabel.evaluate MODEL_DIR [RECIPE] [key=value ...] [--split test]``.

Also what the model commands share: find a saved model and the config that made its splits,
their arguments, and the one-line summary of a split's figures. Scoring itself is
:mod:`mlabel.evaluation`'s.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import ArgumentParser, guarded
from .checks import load_checked
from .config import ConfigError
from .distributed import resolve_device
from .evaluation import EvalSettings, scorer, split_loader
from .io import check_output, write_json
from .models import load, locate_model
from .rundir import hold_run_dir

__all__ = ["load_run", "locate_model", "main", "model_command_parser", "split_arguments", "summary_line"]


def load_run(model_dir: str, recipe: str | None, overrides: list[str], trust_pickle: bool = False):
    """The model, the config that describes its data, and where to write results."""
    model_path, run_dir = locate_model(model_dir)
    if recipe is None:
        if run_dir is None:
            raise ConfigError(f"no config.yaml next to {model_path}: give the RECIPE whose data to use")
        recipe = str(run_dir / "config.yaml")
    cfg = load_checked(recipe, overrides)
    model = load(model_path, trust_pickle=trust_pickle)
    return model, cfg, model_path, run_dir or model_path.parent


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


def model_command_parser(prog: str, description: str) -> ArgumentParser:
    """The arguments ``mlabel.evaluate`` and ``mlabel.tune`` share."""
    parser = ArgumentParser(prog=prog, description=description)
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
    model, config, _, out_dir = load_run(args.model_dir, recipe, overrides, args.trust_pickle)
    out = Path(args.out) if args.out else Path(out_dir) / f"eval-{args.split}.json"
    check_output(out)  # never over the model's own files
    device = resolve_device(args.device or config.train.device)
    cfg, loader = split_loader(model, config, args.split, device)
    split = scorer(model, loader, device, EvalSettings.from_config(cfg), quiet=args.quiet, desc=args.split)
    streamed = split.streamed  # thresholds.streaming: no (N, L) scores held
    metrics = split.metrics()
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
