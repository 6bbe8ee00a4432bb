"""Function lengths and parameter counts of a package (issues 13 and 28): median, distribution,
the longest functions and those with the most parameters.

    python tools/function_lengths.py            # mlabel/
    python tools/function_lengths.py mlabel --over 50 --params-over 7
    python tools/function_lengths.py --whole-config    # also list the functions that take the whole config

Exits 1 when a function is longer than ``--over`` lines or takes more than ``--params-over``
parameters (the house rules: 50 and 7), so CI can run it as a check.

A function's length is its body's source lines (from its ``def`` to its last statement,
docstring included); nested functions count in their parent and on their own. Its parameters
are every named one (positional, keyword-only, ``*args`` and ``**kwargs``), ``self`` and ``cls``
of methods left out.
"""
from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path


def _functions(root: Path):
    """(path, node) of every function and method under ``root``."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def lengths(root: Path) -> list[tuple[int, str]]:
    return [(node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}") for path, node in _functions(root)]


def _count_parameters(args: ast.arguments) -> int:
    names = [x.arg for x in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [x.arg for x in (args.vararg, args.kwarg) if x is not None]
    return len([n for n in names if n not in ("self", "cls")])


def parameters(root: Path) -> list[tuple[int, str]]:
    return [(_count_parameters(node.args), f"{path}:{node.lineno} {node.name}") for path, node in _functions(root)]


WHOLE_CONFIG = ("Config", "ResolvedConfig")


def whole_config(root: Path) -> list[str]:
    """Functions outside ``config.py`` with a parameter that is the whole config: annotated
    ``Config`` or ``ResolvedConfig``, or named ``cfg`` / ``config`` without another annotation
    (issue 28, item 3: functions take the section they use)."""
    found = []
    for path, node in _functions(root):
        if path.name == "config.py":
            continue
        args = node.args
        for arg in (*args.posonlyargs, *args.args, *args.kwonlyargs):
            kind = ast.unparse(arg.annotation).split(".")[-1].strip("'\"") if arg.annotation else None
            if kind in WHOLE_CONFIG or (kind is None and arg.arg in ("cfg", "config")):
                found.append(f"{path}:{node.lineno} {node.name}({arg.arg})")
                break
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="mlabel")
    parser.add_argument("--over", type=int, default=50, help="list functions longer than this")
    parser.add_argument("--params-over", type=int, default=7, help="list functions with more parameters than this")
    parser.add_argument("--whole-config", action="store_true", help="list the functions that take the whole config")
    args = parser.parse_args()
    found = lengths(Path(args.package))
    sizes = [n for n, _ in found]
    print(f"{len(sizes)} functions; median {statistics.median(sizes):.0f} lines, "
          f"90th percentile {statistics.quantiles(sizes, n=10)[-1]:.0f}, longest {max(sizes)}")
    for low, high in ((1, 10), (11, 20), (21, 30), (31, 50), (51, 10**6)):
        count = sum(low <= n <= high for n in sizes)
        print(f"  {low:>3}-{'' if high > 10**5 else high:<4} {count:>4}")
    for n, where in sorted(found, reverse=True):
        if n > args.over:
            print(f"  {n:>4}  {where}")
    counts = parameters(Path(args.package))
    numbers = [n for n, _ in counts]
    print(f"parameters: median {statistics.median(numbers):.0f}, most {max(numbers)}; "
          f"{sum(n > args.params_over for n in numbers)} functions over {args.params_over}")
    for n, where in sorted(counts, reverse=True):
        if n > args.params_over:
            print(f"  {n:>4}  {where}")
    modules = sorted((len(p.read_text().splitlines()), str(p)) for p in Path(args.package).rglob("*.py"))
    print(f"modules over 300 lines: {sum(n > 300 for n, _ in modules)} of {len(modules)}")
    takers = whole_config(Path(args.package))
    print(f"functions taking the whole config (outside config.py): {len(takers)}")
    for where in takers if args.whole_config else ():
        print(f"  {where}")
    return 1 if max(sizes) > args.over or max(numbers) > args.params_over else 0


if __name__ == "__main__":
    raise SystemExit(main())
