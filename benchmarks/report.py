"""The report at scale: build time, file size, and how fast headless Chromium loads the page and
updates the threshold explorer, for generated scores of LABELS labels x IMAGES images per split
(val and test), against a quickstart-sized report (6 labels, 600 / 1,000 images) built and timed
in the same run.

    python benchmarks/report.py [--labels 1000] [--images 20000]

Goals (issue 18): at 1,000 labels x 20,000 images the file is at most 10 MB and one slider move
updates the page in under 100 ms. Scores follow a Zipf label frequency with ~10 positives per
image; the galleries' thumbnails come from 200 generated JPEGs that the images cycle through.
Chromium timings need Debian's chromium and chromium-driver (skipped with a note otherwise).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlabel
from _images import noise_jpegs
from mlabel.report import ReportInputs, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def generated(n: int, n_labels: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated-looking probabilities and 0/1 targets with a Zipf label frequency (~10 per image)."""
    freq = 1.0 / np.arange(1, n_labels + 1)
    freq = np.minimum(freq * min(10.0, n_labels / 2) / freq.sum(), 0.9)
    targets = (rng.random((n, n_labels), dtype=np.float32) < freq.astype(np.float32)).astype(np.float32)
    logits = rng.normal(0, 1.0, (n, n_labels)).astype(np.float32) + 3.0 * targets - 2.0 - 2.0 * (freq < 0.05)
    return 1 / (1 + np.exp(-logits)), targets


def build(folder: Path, n_labels: int, n: int, images: list[str], seed: int = 0) -> tuple[float, int]:
    """(seconds, bytes) of one report; the metrics are computed by mlabel as training does."""
    rng = np.random.default_rng(seed)
    labels = [f"label_{j:05d}" for j in range(n_labels)]
    splits = {split: generated(count, n_labels, rng) for split, count in (("val", n), ("test", n * 1))}
    thresholds = rng.uniform(0.3, 0.7, n_labels)
    start = time.perf_counter()
    metrics = {split: mlabel.evaluate_predictions(p, t, thresholds=thresholds, labels=labels)
               for split, (p, t) in splits.items()}
    counts = {split: {"images": len(t), **{name: {"positive": int(t[:, j].sum())} for j, name in enumerate(labels)}}
              for split, (_, t) in splits.items()}
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_mAP": 0.5 + 0.04 * e, "lr": 1e-3 / e}
               for e in range(1, 11)]
    paths = {split: [images[i % len(images)] for i in range(len(t))] for split, (_, t) in splits.items()}
    write_report(folder, ReportInputs(metrics, history, splits, labels, thresholds, counts, paths=paths))
    seconds = time.perf_counter() - start
    return seconds, (folder / "report" / "report.html").stat().st_size


SLIDER_MOVES = """
const slider = document.getElementById('explorer-slider'), times = [];
for (let i = 0; i < 20; i++) {
  slider.value = String(0.2 + 0.03 * i);
  const start = performance.now();
  slider.dispatchEvent(new Event('input'));
  times.push(performance.now() - start);
}
const select = document.getElementById('explorer-label'), switches = [];
for (const j of [1, 5, 17, 100, 400, 999].filter(j => j < select.options.length)) {
  select.value = String(j);
  const start = performance.now();
  select.dispatchEvent(new Event('change'));
  switches.push(performance.now() - start);
}
times.sort((a, b) => a - b); switches.sort((a, b) => a - b);
return [times[10], times[19], switches[switches.length >> 1], switches[switches.length - 1]];
"""


def browser_timings(pages: dict[str, Path], tmp: Path) -> None:
    from test_browser import CHROMIUM, DRIVER, start_chromium, wait_ready
    if not (CHROMIUM.is_file() and DRIVER.is_file()):
        print("Chromium is absent (apt-get install chromium chromium-driver): no browser timings")
        return
    import pytest
    try:
        driver = start_chromium(tmp / "profile")
    except pytest.skip.Exception as why:
        print(f"no browser timings: {why}")
        return
    try:
        blank = tmp / "blank.html"
        blank.write_text('<!doctype html><div id="explorer" data-ready="true"></div><span id="explorer-note"></span>')
        wait_ready(driver, blank)
        base = min(wait_ready(driver, blank) for _ in range(3))
        print(f"{'page':<26}{'load + explorer ready':>22}{'x blank':>9}{'slider move median / max':>27}"
              f"{'label switch median / max':>28}")
        for name, page in pages.items():
            load = min(wait_ready(driver, page) for _ in range(2))
            move, worst, switch, switch_worst = driver.execute_script(SLIDER_MOVES)
            print(f"{name:<26}{load * 1000:>19.0f} ms{load / base:>9.1f}{move:>15.1f} / {worst:.1f} ms"
                  f"{switch:>16.1f} / {switch_worst:.1f} ms")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--images", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(1)
        images = noise_jpegs(tmp, 200, 240, 320, rng, quality=85)
        pages = {}
        print(f"{'report':<26}{'build':>10}{'x small':>9}{'size':>12}")
        small_s, small_b = build(tmp / "small", 6, 1000, images)
        pages["quickstart-sized"] = tmp / "small" / "report" / "report.html"
        print(f"{'6 labels x 1,000':<26}{small_s:>8.1f} s{1:>9.1f}{small_b / 1e6:>9.2f} MB")
        big_s, big_b = build(tmp / "big", args.labels, args.images, images)
        name = f"{args.labels:,} labels x {args.images:,}"
        pages[name] = tmp / "big" / "report" / "report.html"
        print(f"{name:<26}{big_s:>8.1f} s{big_s / small_s:>9.1f}{big_b / 1e6:>9.2f} MB   (goal <= 10 MB)")
        browser_timings(pages, tmp)


if __name__ == "__main__":
    main()
