"""Reading speed of the detection / partial-label readers at their real-world sizes.

    python benchmarks/formats.py [--scale 0.1] [--yolo-images 100000] [--oi-rows 10000000] [--hf-rows 100000]
                                 [--work DIR]

The defaults are the sizes issue 29 asks to read in seconds; ``--scale`` multiplies them (0.1 is a
quick run).

YOLO: a generated Ultralytics data set of N images (empty image files: reading a data set never
opens its images) with 0 to 6 boxes each (some as polygons) over 80 classes, read with
:func:`mlabel.data.yolo.read_yolo_table`. Open Images: a generated image-labels CSV of M rows
(ImageID, Source, LabelName, Confidence; about 10 rows an image over 20,000 classes, 40 % verified
negatives) read with :func:`mlabel.data.openimages.read_openimages_table` (images as empty files
too, so the per-image existence check is counted). hf: a ``save_to_disk`` set of K tiny PNGs
(bytes) with a list of class labels, read twice with :func:`mlabel.data.hf.read_hf_table` (the
first read writes the images into a fresh cache folder). Prints seconds, rows or files per second and
the peak RSS of each read (``VmHWM``, reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import timed  # noqa: E402


def rss_mb() -> float:
    """The process's resident memory now, in MB (what a read's peak is compared with)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
sys.path.insert(0, str(ROOT))


def generated(folder: Path, size: int) -> bool:
    """Whether ``folder`` holds a finished set of this size from an earlier run (``--work``)."""
    marker = folder / "generated.txt"
    return marker.is_file() and marker.read_text().strip() == str(size)


def write_yolo(folder: Path, images: int, rng) -> Path:
    """An Ultralytics layout with ``images`` training images; returns its data.yaml."""
    if generated(folder, images):
        return folder / "data.yaml"
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "labels" / "train").mkdir(parents=True)
    for i in range(images):
        (folder / "images" / "train" / f"{i:07d}.jpg").touch()
        lines = []
        for k in range(int(rng.integers(0, 7))):
            c, x, y = int(rng.integers(0, 80)), rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
            if k == 3:
                lines.append(f"{c} {x:.4f} {y:.4f} {x + 0.1:.4f} {y:.4f} {x:.4f} {y + 0.1:.4f}")
            else:
                lines.append(f"{c} {x:.4f} {y:.4f} 0.1000 0.1000")
        (folder / "labels" / "train" / f"{i:07d}.txt").write_text("\n".join(lines))
    (folder / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n"
                                      + "".join(f"  {i}: class{i}\n" for i in range(80)))
    (folder / "generated.txt").write_text(str(images))
    return folder / "data.yaml"


def write_openimages(folder: Path, rows: int, rng, classes: int = 20000) -> Path:
    """A class-descriptions CSV and an image-labels CSV of ``rows`` rows; returns the latter."""
    path = folder / "train-annotations-human-imagelabels.csv"
    if generated(folder, rows):
        return path
    folder.mkdir(parents=True)
    ids = [f"/m/{k:06x}" for k in range(classes)]
    (folder / "class-descriptions.csv").write_text("LabelName,DisplayName\n"
                                                   + "".join(f"{i},class {k}\n" for k, i in enumerate(ids)))
    images = max(1, rows // 10)
    (folder / "train").mkdir()
    for i in range(images):
        (folder / "train" / f"{i:016x}.jpg").touch()
    zipf = np.minimum(rng.zipf(1.3, rows) - 1, classes - 1)
    image = np.sort(rng.integers(0, images, rows))
    confidence = ((image * 7 + zipf) % 5 < 3).astype(int)  # a repeated (image, label) pair agrees
    with path.open("w") as handle:
        handle.write("ImageID,Source,LabelName,Confidence\n")
        for start in range(0, rows, 1 << 20):
            stop = min(rows, start + (1 << 20))
            handle.write("".join(f"{image[r]:016x},verification,{ids[zipf[r]]},{confidence[r]}\n"
                                 for r in range(start, stop)))
    (folder / "generated.txt").write_text(str(rows))
    return path


def write_hf(folder: Path, rows: int, rng) -> Path:
    """A ``save_to_disk`` DatasetDict of ``rows`` tiny PNGs (as bytes) with a list of ClassLabel
    over 80 classes; returns its folder (None without ``datasets``)."""
    if generated(folder, rows):
        return folder
    import io
    import datasets
    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    features = datasets.Features({"image": datasets.Image(),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=[f"c{i}" for i in range(80)]))})
    tags = [sorted(set(rng.integers(0, 80, int(rng.integers(0, 5))).tolist())) for _ in range(rows)]
    images = [{"bytes": png.getvalue(), "path": f"{i:07d}.png"} for i in range(rows)]
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"image": images, "tags": tags}, features=features)
                         ).save_to_disk(str(folder))
    (folder / "generated.txt").write_text(str(rows))
    return folder


def read_hf(work: Path, rows: int, rng) -> None:
    """data.format hf: the first read (the images written into the cache) and a second (reused)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        print("hf: skipped (pip install 'mlabel[hf]')")
        return
    from mlabel.data.hf import HfSource, read_hf_table
    folder = write_hf(work / "hf", rows, rng)
    with tempfile.TemporaryDirectory(prefix="mlabel-hf-cache-") as cache:  # the exported images go with it
        source = HfSource(str(folder), cache_dir=cache)
        for read in ("first read, images exported", "second read, export reused"):
            before = rss_mb()
            table, seconds, peak = timed(lambda: read_hf_table(source, "train"))
            print(f"hf ({read}): {len(table):,} rows, {len(table.labels)} classes: {seconds:.2f} s ({len(table) / seconds:,.0f} "
                  f"rows/s), peak RSS {peak:,.0f} MB ({peak - before:+,.0f} MB over the start)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yolo-images", type=int, default=100_000)
    parser.add_argument("--oi-rows", type=int, default=10_000_000)
    parser.add_argument("--hf-rows", type=int, default=100_000)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the sizes (0.1: a quick run)")
    parser.add_argument("--work", default=None, help="folder for the generated data (default: a temporary one; "
                        "a set an earlier run generated there at the same size is reused)")
    args = parser.parse_args()
    args.yolo_images, args.oi_rows, args.hf_rows = (max(1, round(n * args.scale))
                                                    for n in (args.yolo_images, args.oi_rows, args.hf_rows))
    from mlabel.data import openimages
    from mlabel.data.yolo import read_yolo_table
    work = Path(args.work or tempfile.mkdtemp(prefix="mlabel-formats-"))
    rng = np.random.default_rng(0)

    yaml_path = write_yolo(work / "yolo", args.yolo_images, rng)
    before = rss_mb()
    table, seconds, peak = timed(lambda: read_yolo_table(yaml_path, "train"))
    print(f"yolo: {len(table):,} label files, {len(table.labels)} classes: {seconds:.2f} s "
          f"({len(table) / seconds:,.0f} files/s), peak RSS {peak:,.0f} MB ({peak - before:+,.0f} MB over the start)")
    del table

    csv_path = write_openimages(work / "oi", args.oi_rows, rng)
    before = rss_mb()
    table, seconds, peak = timed(lambda: openimages.read_openimages_table(
        csv_path, work / "oi", class_file=work / "oi" / "class-descriptions.csv", split="train"))
    kind = "sparse" if table.sparse else "dense"
    print(f"openimages: {args.oi_rows:,} rows, {len(table):,} images x {len(table.labels):,} labels ({kind}): "
          f"{seconds:.2f} s ({args.oi_rows / seconds:,.0f} rows/s), peak RSS {peak:,.0f} MB ({peak - before:+,.0f} MB "
          "over the start)")
    del table

    read_hf(work, args.hf_rows, rng)


if __name__ == "__main__":
    import numpy as np
    main()
