"""Regenerate ``assets/`` (run from the repository root): sample scenes for the README's ``mlabel predict`` example,
screenshots of the quickstart report shown in the README, and a quickstart test scene with two labels' heat maps.

    python tools/make_assets.py [--run runs/quickstart] [--train]

The samples are drawn by mlabel's own scene generator (seeded, so the files are the same on every
run). The screenshots need a finished quickstart run (``--train`` runs it first, into a temporary
folder) and Debian's ``chromium`` and ``chromium-driver``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
SAMPLES = 4
SHOTS = {"report-explorer.png": "explorer", "report-galleries.png": "galleries"}


def samples(folder: Path) -> list[Path]:
    """Four quickstart-like scenes, upscaled to 128 px so a person can see them."""
    from PIL import Image

    from mlabel.data.synthetic import SCENE_LABELS, draw_scene
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    written = []
    for i in range(SAMPLES):
        image, target = draw_scene(rng)
        names = "-".join(name for name, on in zip(SCENE_LABELS, target) if on) or "empty"
        path = folder / f"scene{i}_{names}.png"
        image.resize((128, 128), Image.NEAREST).save(path, optimize=True)
        written.append(path)
    return written


def screenshots(run: Path, folder: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_browser import start_chromium, wait_ready
    page = (run / "report" / "report.html").resolve()
    if not page.is_file():
        raise SystemExit(f"{page} is missing: run python -m mlabel.train quickstart first, or pass --train")
    with tempfile.TemporaryDirectory() as tmp:
        driver = start_chromium(Path(tmp) / "profile")
        try:
            driver.set_window_size(1280, 900)
            wait_ready(driver, page)
            written = []
            for name, element in SHOTS.items():
                driver.execute_script(f"document.getElementById('{element}').scrollIntoView(); window.scrollBy(0, -60)")
                driver.save_screenshot(str(folder / name))
                written.append(folder / name)
            return written
        finally:
            driver.quit()


def heat_maps(run: Path, folder: Path, scale: int = 4) -> Path:
    """The first quickstart test scene with two shapes both predicted, beside the heat map of each (``auto``:
    HiResCAM at the EfficientNet-Lite0's stride-16 stage, the scene upsampled to 96 px for it), upscaled and
    captioned."""
    import json

    import torch
    from PIL import Image, ImageDraw

    import mlabel
    from mlabel.config import load_config
    from mlabel.data.synthetic import ensure_scenes, scenes_root
    from mlabel.explain import input_view, overlay
    from mlabel.preprocess import preprocess_image
    model = mlabel.load(run).eval()
    cfg = load_config(run / "config.yaml")
    root = ensure_scenes(scenes_root(cfg.data.root, cfg.data.cache_dir))
    boxes = json.loads((root / "test_boxes.json").read_text())
    for path, drawn in boxes.items():  # the first scene with two shapes, both predicted
        names = [b[0] for b in drawn]
        image = torch.from_numpy(preprocess_image(root / path, model.preprocessing))[None]
        got = model.explain(image, labels=names)
        if len(names) == 2 and all(got.probabilities[0] >= model.thresholds[[model.labels.index(n) for n in names]].numpy()):
            break
    view = input_view(image[0], model.preprocessing)
    side = view.shape[0] * scale
    panels = [Image.fromarray(view).resize((side, side), Image.NEAREST)]
    panels += [overlay(Image.fromarray(view).resize((side, side), Image.NEAREST), got.maps[0][k], alpha=0.5)
               for k in range(len(names))]
    captions = ["scene"] + [f"{n}: p = {p:.2f}" for n, p in zip(names, got.probabilities[0])]
    sheet = Image.new("RGB", (len(panels) * (side + 8) + 8, side + 32), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (panel, caption) in enumerate(zip(panels, captions)):
        sheet.paste(panel, (8 + k * (side + 8), 8))
        draw.text((8 + k * (side + 8), side + 14), caption, fill="black")
    out = folder / "explain-overlays.png"
    sheet.save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="relative to the current folder")
    parser.add_argument("--train", action="store_true",
                        help="train the quickstart into --run first (about 2 minutes); --run must not exist yet")
    args = parser.parse_args()
    for path in samples(ASSETS / "samples"):
        print(f"wrote {path.relative_to(ROOT)}")
    run = args.run
    if args.train:
        from mlabel.train import main as train_main
        if run.exists():
            raise SystemExit(f"{run} exists: drop --train to use it, or give another --run")
        if train_main(["quickstart", f"out_dir={run}", "--quiet"]) != 0:
            raise SystemExit("the quickstart failed")
    print(f"wrote {heat_maps(run, ASSETS).relative_to(ROOT)}")
    for path in screenshots(run, ASSETS):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
