"""``python -m mlabel.data RECIPE [key=value ...] [--out DIR]``: what a dataset holds before you
train on it. Prints counts, label frequency, imbalance, label cardinality, co-occurring pairs,
unknown-label rate and unreadable files; writes ``summary.json`` and ``summary.png`` to DIR.
``python -m mlabel.data shard RECIPE --out DIR`` writes the same splits as WebDataset shards;
``python -m mlabel.data convert RECIPE --to csv|jsonl --out FILE`` one split as a csv or JSON lines file."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from ..cli import ArgumentParser, guarded
from ..checks import load_checked
from ..defaults import loader_workers
from ..io import atomic_path, check_output, refuse_inside, write_json
from . import DataError, build_splits, label_counts
from .check import find_bad_images
from .sparse import SparseLabels

TOP_PAIRS = 10


def _cooccurring(table: SparseLabels) -> dict[tuple[int, int], int]:
    """Images per pair of positive labels (a < b), from the positive lists: work in the pairs."""
    rows = np.repeat(np.arange(len(table)), np.diff(table.pos_ptr))
    idx = table.pos_idx.astype(np.int64)
    keys = []
    for d in range(1, int(np.diff(table.pos_ptr).max(initial=0))):
        same = rows[:-d] == rows[d:]  # label lists are sorted: the pair (idx[i], idx[i + d]) has a < b
        keys.append(idx[:-d][same] * table.num_labels + idx[d:][same])
    found, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
    return {(int(k // table.num_labels), int(k % table.num_labels)): int(c) for k, c in zip(found, counts)}


def summarise(splits, workers: int = 4) -> dict:
    """The data set's figures, from each split's label lists (a dense table is made sparse first):
    memory and time grow with the positives, not images x labels."""
    tables = {n: getattr(splits, n) for n in ("train", "val", "test") if getattr(splits, n) is not None}
    sparse = {n: t.targets if t.sparse else SparseLabels.from_dense(t.targets) for n, t in tables.items()}
    labels = splits.labels
    stats = [t.label_stats() for t in tables.values()]
    n_pos = sum(np.asarray(s["positive"]) for s in stats)
    n_neg = sum(np.asarray(s["negative"]) for s in stats)
    known = n_pos + n_neg
    total = sum(len(t) for t in tables.values())
    per_image = np.concatenate([t.positives_per_image() for t in sparse.values()])
    together: dict[tuple[int, int], int] = {}
    for table in sparse.values():
        for pair, count in _cooccurring(table).items():
            together[pair] = together.get(pair, 0) + count
    pairs = [{"labels": [labels[a], labels[b]], "images": both, "jaccard": both / (n_pos[a] + n_pos[b] - both)}
             for (a, b), both in together.items()]
    pairs.sort(key=lambda p: (-p["images"], p["labels"]))
    label_sets = {t.pos_idx[t.pos_ptr[i]:t.pos_ptr[i + 1]].tobytes() for t in sparse.values() for i in range(len(t))}
    bad = [b for t in tables.values() for b in find_bad_images(t, workers)]
    with_pos = n_pos[n_pos > 0]
    return {
        "task": splits.task, "labels": labels,
        "images": {name: len(t) for name, t in tables.items()}, "total_images": int(total),
        "label_counts": {name: label_counts(t) for name, t in tables.items()},
        "label_frequency": {n: float(p / max(k, 1)) for n, p, k in zip(labels, n_pos, known)},
        "negatives_per_positive": {n: (float(ng / p) if p else None) for n, ng, p in zip(labels, n_neg, n_pos)},
        "imbalance_ratio": float(with_pos.max() / with_pos.min()) if len(with_pos) else None,
        "label_cardinality": float(per_image.mean()),
        "label_density": float(per_image.mean() / len(labels)),
        "images_without_positive": int((per_image == 0).sum()),
        "distinct_label_sets": len(label_sets),
        "top_cooccurring_pairs": [{**p, "jaccard": float(p["jaccard"])} for p in pairs[:TOP_PAIRS]],
        "unknown_rate": float(1 - known.sum() / (total * len(labels))),
        "unreadable_images": [{"path": p, "reason": r} for p, r in bad],
    }


def _chart(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    # label names are text: "$x$" must be drawn as written, never parsed as TeX (mathtext)
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        _draw_chart(summary, path)


def _draw_chart(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    labels = summary["labels"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.4, 1]})
    splits = summary["label_counts"]
    width = 0.8 / len(splits)
    x = np.arange(len(labels))
    for k, (name, counts) in enumerate(splits.items()):
        left.bar(x + k * width, [counts[n]["positive"] for n in labels], width, label=f"{name} ({counts['images']})")
    left.set_xticks(x + width * (len(splits) - 1) / 2, labels, rotation=45, ha="right")
    left.set(ylabel="positive images", title="positives per label and split")
    left.legend(), left.grid(axis="y", alpha=0.3)
    matrix = np.zeros((len(labels), len(labels)))
    for pair in summary["top_cooccurring_pairs"]:
        a, b = (labels.index(n) for n in pair["labels"])
        matrix[a, b] = matrix[b, a] = pair["jaccard"]
    image = right.imshow(matrix, cmap="Blues", vmin=0)
    right.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    right.set_yticks(range(len(labels)), labels)
    right.set_title(f"co-occurrence (Jaccard) of the top {TOP_PAIRS} pairs")
    fig.colorbar(image, ax=right, shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _print(summary: dict) -> None:
    print(f"task {summary['task']}, {len(summary['labels'])} labels, {summary['total_images']} images "
          f"({', '.join(f'{k} {v}' for k, v in summary['images'].items())})")
    print(f"{'label':<20}{'positives':>10}{'frequency':>11}{'neg/pos':>9}")
    train = summary["label_counts"]
    for name in summary["labels"]:
        pos = sum(c[name]["positive"] for c in train.values())
        ratio = summary["negatives_per_positive"][name]
        print(f"{name:<20}{pos:>10}{summary['label_frequency'][name]:>11.3f}"
              f"{'-' if ratio is None else f'{ratio:.1f}':>9}")
    imbalance = summary["imbalance_ratio"]
    print(f"imbalance (most / fewest positives): {'-' if imbalance is None else f'{imbalance:.1f}'}; "
          f"label cardinality {summary['label_cardinality']:.2f} (density {summary['label_density']:.3f}); "
          f"images without a positive {summary['images_without_positive']}; "
          f"distinct label sets {summary['distinct_label_sets']}; unknown targets {summary['unknown_rate']:.1%}")
    if summary["top_cooccurring_pairs"]:
        print("most frequent pairs: " + ", ".join(
            f"{'+'.join(p['labels'])} {p['images']} (J {p['jaccard']:.2f})" for p in summary["top_cooccurring_pairs"][:5]))
    bad = summary["unreadable_images"]
    print(f"unreadable images: {len(bad)}" + "".join(f"\n  {b['reason']}" for b in bad[:10]))


def data_folders(data) -> list[Path]:
    """The folders a data set lives in (never written into): data.root, or for yolo the yaml's
    folder and its ``path``."""
    root = Path(data.root).resolve()
    if data.format != "yolo":
        return [root]
    from .yolo import read_yolo_yaml
    return [root.parent, Path(read_yolo_yaml(root)["base"]).resolve()]


def check_outside_data(out: Path, data, flag: str) -> Path:
    """Refuse an output inside the data set; returns the data set's first folder."""
    folders = data_folders(data)
    refuse_inside(out, folders, "mlabel never writes into a data folder: give a folder elsewhere", flag)
    return folders[0]


def shard(argv: list[str]) -> int:
    """``python -m mlabel.data shard RECIPE [key=value ...] --out DIR [--shard-size N]``."""
    from .shards import write_shards
    parser = ArgumentParser(prog="mlabel data shard", description="write the recipe's splits (as "
                                     "training would read them, val carved from train where the recipe says so) "
                                     "as WebDataset tar shards with their vocabulary in labels.json")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.root=/x")
    parser.add_argument("--out", required=True, help="folder for the shards (new, or an interrupted run's)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    args = parser.parse_intermixed_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")
    cfg = load_checked(args.recipe, args.overrides)
    if cfg.data.format == "wds":
        raise DataError("the recipe's data are shards already (data.format=wds)")
    splits = build_splits(cfg.data, cfg.task, cfg.seed)
    out = Path(args.out).resolve()
    root = check_outside_data(out, cfg.data, "--out")
    tree = write_shards(splits, out, args.shard_size, root, skip_bad=cfg.data.on_bad_image == "skip")
    for name, split in tree["splits"].items():
        print(f"{name}: {sum(split['samples'])} samples in {len(split['shards'])} shards")
    if tree["skipped"]:
        print(f"left out {len(tree['skipped'])} unreadable images (data.on_bad_image=skip), listed in "
              f"{out / 'labels.json'} under 'skipped'")
    print(f"written: {out} (train with data.format=wds data.root={out} data.train=train data.val=val"
          + (" data.test=test" if "test" in tree["splits"] else "") + ")")
    return 0


def _relative(path: str, folder: Path) -> str:
    """``path`` as the converted file names it: relative to the file's folder (a csv / jsonl
    ``data.root``), in forward slashes."""
    return Path(os.path.relpath(os.path.abspath(path), folder)).as_posix()


def _write_table(table, out: Path, kind: str) -> None:
    """The table as a csv (1 / 0 / empty = unknown columns) or JSON lines (labels, unknown),
    written a block of rows at a time (a sparse table is never made dense whole)."""
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if kind == "csv":
            writer.writerow(["image", *table.labels])
        for start in range(0, len(table), 4096):
            rows = table.target_rows(np.arange(start, min(start + 4096, len(table))))
            for offset, row in enumerate(rows):
                image = _relative(table.paths[start + offset], out.parent)
                if kind == "csv":
                    writer.writerow([image, *("1" if v == 1 else "0" if v == 0 else "" for v in row)])
                else:
                    handle.write(json.dumps({"image": image,
                                             "labels": [table.labels[j] for j in np.flatnonzero(row == 1)],
                                             "unknown": [table.labels[j] for j in np.flatnonzero(row < 0)]},
                                            ensure_ascii=False) + "\n")


def convert(argv: list[str]) -> int:
    """``python -m mlabel.data convert RECIPE [key=value ...] --to csv|jsonl --out FILE [--split S]``."""
    from . import read_split
    parser = ArgumentParser(prog="mlabel data convert", description="write one split of the recipe's "
                                     "data, as read (nothing carved), as a csv (1 / 0 / empty = unknown) or JSON "
                                     "lines file (unknowns kept), to look at or edit")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.root=/x")
    parser.add_argument("--to", required=True, choices=("csv", "jsonl"))
    parser.add_argument("--out", required=True, help="the file to write (outside the data folder)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    args = parser.parse_intermixed_args(argv)
    cfg = load_checked(args.recipe, args.overrides)
    if cfg.data.format == "wds":
        raise DataError("convert reads image files; wds shards hold the images inside their tars")
    out = Path(args.out).resolve()
    check_outside_data(out, cfg.data, "--out")
    check_output(out)  # a folder in its place, no permission: said before the data are read
    table = read_split(cfg.data, args.split, cfg.task)
    _write_table(table, out, args.to)
    image_key = f"data.train={out.name}" if args.to == "jsonl" else f"data.train={out.name} data.image_column=image"
    print(f"written: {out} ({len(table)} images, {len(table.labels)} labels; read it with data.format={args.to} "
          f"data.root={out.parent} {image_key})")
    return 0


@guarded
def main(argv: list[str]) -> int:
    if argv[:1] == ["shard"]:
        return shard(argv[1:])
    if argv[:1] == ["convert"]:
        return convert(argv[1:])
    parser = ArgumentParser(prog="mlabel data", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.root=/x")
    parser.add_argument("--out", default="data-summary", help="folder for summary.json and summary.png")
    args = parser.parse_intermixed_args(argv)
    cfg = load_checked(args.recipe, args.overrides)
    out = Path(args.out)
    check_outside_data(out.resolve(), cfg.data, "--out")
    splits = build_splits(cfg.data, cfg.task, cfg.seed)
    summary = summarise(splits, max(2, loader_workers(cfg.data.num_workers)))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    _chart(summary, out / "summary.png")
    _print(summary)
    print(f"written: {out / 'summary.json'}, {out / 'summary.png'}")
    return 1 if summary["unreadable_images"] else 0


if __name__ == "__main__":
    sys.exit(main())
