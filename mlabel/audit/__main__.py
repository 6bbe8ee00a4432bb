"""``python -m mlabel.audit RECIPE [key=value ...] --out DIR`` (``mlabel audit``): find the wrong
labels; ``python -m mlabel.audit apply DIR corrections.csv --out NEW_LABELS``: write the reviewed
corrections into a new label file."""
from __future__ import annotations

import sys

from ..cli import ArgumentParser, guarded
from .core import BUDGETS, DEFAULT_TOP
from .rank import DEFAULT_SCORING, SCORINGS

__all__ = ["main"]


def _audit_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="mlabel audit", description="Score every train and val image out of fold, rank the suspected label "
        "errors, and write issues.csv, suggestions.csv, summary.json and audit.html into --out. "
        "Then: mlabel audit apply DIR corrections.csv --out NEW_LABELS.")
    parser.add_argument("recipe", help="a YAML path or a shipped recipe name (as mlabel train takes)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value over the recipe")
    parser.add_argument("--out", required=True, help="the audit's folder (outside the data folder)")
    parser.add_argument("--folds", type=int, default=5, help="K folds (default 5)")
    parser.add_argument("--budget", choices=BUDGETS, default="fast",
                        help="fast: pooled features once, linear heads per fold; full: K trainings with the recipe")
    parser.add_argument("--from", dest="from_run", help="a run (or model folder) whose trained backbone gives the features")
    parser.add_argument("--feature-size", type=int, default=None,
                        help="fast budget: the side images are scored at (default: the recipe's, raised to 128 px "
                        "for a pretrained backbone)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the heads")
    parser.add_argument("--scoring", choices=SCORINGS, default=DEFAULT_SCORING, help="suspicion scoring")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"rows of issues.csv (default {DEFAULT_TOP})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _apply_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mlabel audit apply",
                                     description="Write the decisions of corrections.csv into a new label file.")
    parser.add_argument("folder", help="the audit's --out folder")
    parser.add_argument("corrections", help="corrections.csv (image,label,decision) as audit.html downloads it")
    parser.add_argument("--out", required=True, help="the new label file (.csv or .jsonl), outside the data folder")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="whose label file to write when val has a file of its own (default train)")
    return parser


@guarded
def main(argv: list[str]) -> int:
    if argv[:1] == ["apply"]:
        args = _apply_parser().parse_args(argv[1:])
        from .apply import apply_corrections
        done = apply_corrections(args.folder, args.corrections, args.out, args.split)
        print(f"{done['changed']} cells changed; new labels: {done['file']} (train with data.{args.split}={done['file']})")
        if done["other_split"]:
            other = "val" if args.split == "train" else "train"
            print(f"{done['other_split']} corrections concern data.{other}'s file and were left out: "
                  f"apply them with --split {other} --out ANOTHER_FILE")
        return 0
    args = _audit_parser().parse_intermixed_args(argv)
    from .core import audit
    result = audit(args.recipe, args.overrides, out=args.out, folds=args.folds, budget=args.budget,
                   from_run=args.from_run, seed=args.seed, scoring=args.scoring, top=args.top, quiet=args.quiet,
                   feature_size=args.feature_size)
    print(f"audit: {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
