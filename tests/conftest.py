import csv
import os
from pathlib import Path

# The suite never reaches the network: model.pretrained=auto finds no hub here and trains from
# scratch, as on a machine without one (tests of the hub branches set their own endpoint).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

from mlabel.data.synthetic import SCENE_LABELS, draw_scene

# Property tests draw the same examples on every run, so a clean clone passes or fails the same way
# in CI as here; `MLABEL_HYPOTHESIS=explore python -m pytest tests/test_fuzz_*.py` draws new ones.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", max_examples=500)
settings.load_profile(os.environ.get("MLABEL_HYPOTHESIS", "deterministic"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def scene_csv(tmp_path_factory) -> Path:
    """A small multi-label CSV dataset of generated scenes: root with train.csv and val.csv."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 24)):
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *SCENE_LABELS])
            for i in range(count):
                image, target = draw_scene(rng)
                image.save(root / "images" / f"{split}{i}.png")
                # the CSV names images without extension: mlabel must resolve them
                writer.writerow([f"images/{split}{i}", *target.astype(int)])
    return root


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory) -> Path:
    """Two class folders (cat = dark images, dog = bright images) with train and test."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(1)
    for split, count in (("train", 20), ("test", 8)):
        for name, level in (("cat", 40), ("dog", 210)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}{i}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, scene_csv) -> Path:
    """A finished one-epoch run of a tiny model on ``scene_csv`` (val doubles as test). Copy it
    before changing anything in it."""
    from mlabel.train import main as train_main
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    assert train_main(["quickstart", f"out_dir={run}", f"data.root={scene_csv}", "data.val=val.csv",
                       "data.test=val.csv", "data.allow_overlap=true", "model.backbone=test_resnet",
                       "model.pretrained=false", "data.generate=null", "data.image_size=32", "data.num_workers=0",
                       "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]) == 0
    return run


@pytest.fixture(autouse=True)
def _quick_http_backoff(monkeypatch):
    """HTTP retries back off in milliseconds here, so that hostile servers cost no real seconds
    (tests/test_http_retry.py sets and measures its own values)."""
    from mlabel.data import http
    monkeypatch.setattr(http, "BACKOFF_BASE", 0.005)
    monkeypatch.setattr(http, "BACKOFF_CAP", 0.02)
