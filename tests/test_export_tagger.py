"""``mlabel export --format tagger`` (issue 30, item 3): a WD14-style tagger folder, read back the
way the public readers read one (the SmilingWolf wd-tagger Space and the tools that copy it,
re-implemented below from what they do), reproduces mlabel's decisions image by image.

What those readers do: ``model.onnx``'s first input is ``(batch, height, width, 3)`` and the
height is the target size; an image is composited on white (alpha), padded to a square with
white, resized (bicubic) only when its side differs, and fed as float32 0..255 in BGR order; the
first output holds the probabilities; ``selected_tags.csv`` has ``tag_id,name,category,count``,
category 0 being general tags (9 rating, 4 character). The per-tag thresholds are mlabel's own
``thresholds.csv`` (``tag_id,name,threshold``, present at or above), used here in place of the
readers' single general threshold.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlabel
from mlabel.cli import main as cli_main

onnxruntime = pytest.importorskip("onnxruntime")
TIE = 1e-6  # a probability this close to its threshold may fall either side (float noise of two runtimes)


class Reader:
    """A WD14 tagger folder as the readers use it."""

    def __init__(self, folder: Path):
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        _, self.height, width, _ = self.session.get_inputs()[0].shape
        assert self.height == width, "the readers take the height as the square's side"
        with (folder / "selected_tags.csv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        self.names = [row["name"] for row in rows]
        self.general = [i for i, row in enumerate(rows) if int(row["category"]) == 0]
        with (folder / "thresholds.csv").open(encoding="utf-8", newline="") as handle:
            by_id = {int(row["tag_id"]): float(row["threshold"]) for row in csv.DictReader(handle)}
        self.thresholds = np.array([by_id[int(row["tag_id"])] for row in rows])

    def prepare(self, image: Image.Image) -> np.ndarray:
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        image = canvas.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        if side != self.height:
            square = square.resize((self.height, self.height), Image.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR

    def probabilities(self, images: list) -> np.ndarray:
        batch = np.stack([self.prepare(image) for image in images])
        output = self.session.get_outputs()[0].name
        return self.session.run([output], {self.session.get_inputs()[0].name: batch})[0]

    def tags(self, probs: np.ndarray) -> list[set]:
        return [{self.names[i] for i in self.general if p[i] >= self.thresholds[i]} for p in probs]


SIZE = 32
SIDE = {"squish": 32, "crop": 34}  # the square before mlabel's centre crop: round(32 / 0.95) for crop


def _at_model_size(scene_csv, out: Path, side: int) -> list[Path]:
    """The val scenes as squares at the side the tagger's input has: the reader resizes nothing,
    mlabel resizes nothing, so both pipelines see the same pixels."""
    out.mkdir(exist_ok=True)
    paths = []
    for path in sorted((scene_csv / "images").glob("val*.png")):
        Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC).save(out / path.name)
        paths.append(out / path.name)
    return paths


@pytest.fixture(params=["squish", "crop"])
def spread_model(scene_csv, tmp_path, request) -> Path:
    """A calibrated model whose thresholds sit at the median of each label's probabilities on the
    images, so that about half of them carry each tag, far from float noise (a one-epoch tiny
    model's outputs hardly vary from image to image)."""
    torch.manual_seed(0)
    model = mlabel.create_model("test_resnet", ["circle", "square", "triangle", "cross"], image_size=SIZE,
                                resize=request.param)
    model.set_calibration("platt", [4.0, 2.0, 3.0, 5.0], [0.1, -0.2, 0.3, 0.0])
    probs = model.predict_proba(_at_model_size(scene_csv, tmp_path / "images", SIDE[request.param])).numpy()
    model.set_thresholds(np.median(probs, axis=0) + 1e-4)  # no image exactly at its threshold
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_tagger_folder_read_as_the_readers_do_gives_mlabels_decisions(spread_model, scene_csv, tmp_path, capsys):
    out = tmp_path / "tagger"
    assert cli_main(["export", str(spread_model), "--format", "tagger", "--out", str(out)]) == 0
    assert "decisions agree" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "selected_tags.csv", "thresholds.csv"]
    model = mlabel.load(spread_model)
    reader = Reader(out)
    assert reader.height == SIDE[model.preprocessing["resize"]]
    assert reader.names == model.labels and reader.general == list(range(model.num_labels))
    assert np.array_equal(reader.thresholds, model.thresholds.numpy().astype(np.float64))  # exact round trip
    paths = _at_model_size(scene_csv, tmp_path / "images", reader.height)
    probs = reader.probabilities([Image.open(p) for p in paths])  # one batch of 24: the batch is dynamic
    expected = model.predict_proba(paths).numpy()
    diff = float(np.abs(probs - expected).max())
    tags, decided = reader.tags(probs), model.predict(paths).numpy()
    thresholds = model.thresholds.numpy()
    disagreements = 0
    for i, path in enumerate(paths):
        want = {name for name, on in zip(model.labels, decided[i]) if on}
        ties = {name for j, name in enumerate(model.labels) if abs(expected[i, j] - thresholds[j]) < TIE}
        assert tags[i] - ties == want - ties, (path.name, tags[i], want)
        disagreements += len(tags[i] ^ want)
    positives = int(decided.sum())
    print(f"tagger folder vs mlabel: {len(paths)} images, {positives} of {decided.size} tags present, "
          f"max |prob diff| {diff:.2e}, {disagreements} decisions differ")
    assert diff < 1e-5 and disagreements == 0 and 0 < positives < decided.size
    # images of other sizes and shapes (padded, resized, with alpha) as the reader prepares them:
    # the graph's probabilities are mlabel's on those same pixels
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (90, 31), (16, 16))]
    images.append(Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA"))
    rgb = [np.ascontiguousarray(reader.prepare(image)[:, :, ::-1]).astype(np.uint8) for image in images]
    assert float(np.abs(reader.probabilities(images) - model.predict_proba(rgb).numpy()).max()) < 1e-5


def test_the_tags_file_keeps_the_convention(tiny_run, tmp_path):
    """Exactly the four columns, every label a general tag, count its training positives; names
    with commas and quotes survive the CSV."""
    out = tmp_path / "tagger"
    assert cli_main(["export", str(tiny_run), "--format", "tagger", "--out", str(out)]) == 0
    with (out / "selected_tags.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["tag_id", "name", "category", "count"]
    train = json.loads((tiny_run / "run.json").read_text())["label_counts"]["train"]
    labels = mlabel.load(tiny_run).labels
    assert rows[1:] == [[str(i), name, "0", str(train[name]["positive"])] for i, name in enumerate(labels)]
    odd = ['a,b', 'say "hi"', "plain"]
    mlabel.create_model("test_resnet", odd, image_size=32).save_pretrained(tmp_path / "odd")
    assert cli_main(["export", str(tmp_path / "odd"), "--format", "tagger", "--out", str(tmp_path / "t2")]) == 0
    assert Reader(tmp_path / "t2").names == odd


def test_a_tagger_export_needs_an_out_folder(tiny_run, capsys):
    capsys.readouterr()
    assert cli_main(["export", str(tiny_run), "--format", "tagger"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--out DIR" in err and err.count("\n") == 1
