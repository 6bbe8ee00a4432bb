"""Shards at scale: writing them, and what a training process pays at start-up to read a split.

    python benchmarks/shards.py [--images 100000] [--labels 10000] [--shard-size 1000] [--work DIR]

Generates a split of N samples (one small JPEG, the same bytes for every sample, so the benchmark
measures the shards' bookkeeping, not image I/O) with about 10 positives each on a Zipf label
frequency, writes it with :func:`mlabel.data.shards.write_shards` (the image check switched off),
then reads the split back as a training process does: from the index written with the shards,
and by scanning every shard (what shards from elsewhere cost). Prints seconds, the peak RSS of
each step (``VmHWM``, reset through ``/proc/self/clear_refs``) and the ratio scan / index.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import timed  # noqa: E402
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    from PIL import Image

    from mlabel.data import Splits
    from mlabel.data import shards as shard_module
    from mlabel.data.shards import read as shard_reader
    from mlabel.data.sparse import SparseLabels
    from mlabel.data.tables import LabelTable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlabel-shards-"))
    image = work / "source" / "one.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, "JPEG")
    image.write_bytes(buffer.getvalue())

    rng = np.random.default_rng(0)
    n, labels = args.images, args.labels
    frequency = 1.0 / np.arange(1, labels + 1)
    per_image = np.maximum(rng.poisson(10, n), 1)
    rows = np.repeat(np.arange(n), per_image)
    cols = np.searchsorted(np.cumsum(frequency / frequency.sum()), rng.random(len(rows)), side="right").clip(0, labels - 1)
    targets = SparseLabels.from_pairs(rows, cols, n, labels)
    names = [f"tag{j:05d}" for j in range(labels)]
    table = LabelTable([str(image)] * n, targets, names, "generated")
    splits = Splits(names, "multilabel", table, table.subset(range(0), "none"), None)
    splits.val = None  # only the training split is written
    out = work / "shards"
    tree, seconds, peak = timed(lambda: shard_module.write_shards(
        splits, out, args.shard_size, image.parent, check=lambda path: None, log=lambda *a: None))
    size = sum(p.stat().st_size for p in out.glob("*.tar")) / 2**20
    print(f"{n:,} samples x {labels:,} labels ({len(rows):,} positives), {len(tree['splits']['train']['shards'])} shards, "
          f"{size:,.0f} MB: written in {seconds:.1f} s (peak RSS {peak:,.0f} MB), index "
          f"{(out / 'train.index.npz').stat().st_size / 2**20:.1f} MB")
    indexed, t_index, rss_index = timed(lambda: shard_module.read_wds_table(out, "train"))
    vocabulary = shard_module.read_vocabulary(out)
    vocabulary.splits["train"].pop("index")  # as shards without an index are read
    original = shard_reader.read_vocabulary
    shard_reader.read_vocabulary = lambda root: vocabulary
    try:
        scanned, t_scan, rss_scan = timed(lambda: shard_module.read_wds_table(out, "train"))
    finally:
        shard_reader.read_vocabulary = original
    assert indexed.paths == scanned.paths and indexed.members == scanned.members
    print(f"read the split from its index: {t_index:.2f} s (peak RSS {rss_index:,.0f} MB); by scanning the shards: "
          f"{t_scan:.2f} s (peak RSS {rss_scan:,.0f} MB); scan / index {t_scan / t_index:.1f}x; "
          f"{t_scan / n * 1e6:.0f} us a sample scanned")


if __name__ == "__main__":
    main()
