"""Check every image of every split before training: all problems at once, then fail or skip."""
from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import write_text
from ..preprocess import read_rgb

__all__ = ["find_bad_images", "drop_bad_images", "image_problem", "kept_rows"]

SHOWN = 20


def image_problem(item, read=read_rgb) -> str | None:
    """Why ``read(item)`` (a path, or a table row) gives no RGB image; None when it does."""
    try:
        read(item, draft=64)  # JPEGs decode at 1/8 size: the check reads every byte but fast
        return None
    except DataError as err:
        return str(err)


def find_bad_images(table, workers: int = 4) -> list[tuple[str, str]]:
    """(path, reason) for every image of ``table`` that does not decode to an RGB image, read as
    training reads it (from its file or its shard)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(lambda row: image_problem(row, table.read_image), range(len(table)), chunksize=32))
    return [(table.paths[i], r) for i, r in enumerate(reasons) if r is not None]


def kept_rows(table, found: list[tuple[str, str]]) -> np.ndarray:
    """Rows of ``table`` whose image is not among ``found`` (path, reason) pairs."""
    dropped = {path for path, _ in found}
    return np.array([i for i, p in enumerate(table.paths) if p not in dropped], dtype=np.int64)


def drop_bad_images(splits, policy: str, out_dir: Path | None, workers: int = 4, log=print, known=None):
    """Check train/val/test. ``policy="error"`` raises a :class:`DataError` listing every bad
    image; ``"skip"`` removes them and writes ``out_dir/skipped.csv`` (split, path, reason).
    ``known`` ({split: [(path, reason)]}, e.g. from building the decoded cache) replaces the check
    of the splits it names. The training split of wds shards is not read here: it is streamed, and
    checked as it is read (samples the shards' reader already left out, ``splits.skipped``, are
    listed with the rest)."""
    bad = {}
    for name in ("train", "val", "test"):
        table = getattr(splits, name)
        if table is None or (name == "train" and table.members is not None):
            continue
        problems = known[name] if known is not None and name in known else find_bad_images(table, workers)
        if problems:
            bad[name] = problems
    earlier = list(getattr(splits, "skipped", []))
    if not bad and not earlier:
        return splits
    rows = earlier + [(split, path, reason) for split, found in bad.items() for path, reason in found]
    if policy == "error":
        shown = "\n  ".join(f"{split}: {reason}" for split, _, reason in rows[:SHOWN])
        more = f"\n  ... and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
        raise DataError(f"{len(rows)} images cannot be used:\n  {shown}{more}\nReplace or remove them, "
                        "or set data.on_bad_image=skip to train without them (they are then listed in skipped.csv)")
    for split, found in bad.items():
        table = getattr(splits, split)
        keep = kept_rows(table, found)
        if not len(keep):
            raise DataError(f"every image of the {split} split is unreadable; nothing left to use")
        setattr(splits, split, table.subset(keep, table.source))
    if out_dir is not None:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([("split", "path", "reason"), *rows])
        write_text(Path(out_dir) / "skipped.csv", buffer.getvalue())
    log(f"skipped {len(rows)} unreadable images (data.on_bad_image=skip); listed in "
        f"{Path(out_dir or '.') / 'skipped.csv'}")
    return splits
