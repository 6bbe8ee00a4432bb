"""Box-keeping crops (data.box_crops): a training crop of a VOC/COCO image never cuts a labelled box.

The images are coordinate ramps (red = x, green = y), so the pixels an augmented image shows say
which part of the source it holds, independently of how the crop was drawn."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlabel.data.dataset import BoxSafeCrop, ImageDataset, box_crop, build_transform
from mlabel.data.formats import read_coco_table, read_voc_table
from mlabel.data.presets import CROP_RATIO, CROP_SCALE
from mlabel.train import main as train_main

WIDTH, HEIGHT = 200, 150
PRE = {"image_size": 48, "resize": "crop", "crop_pct": 0.875, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
       "interpolation": "bilinear"}


def _ramp(path):
    x, y = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)).save(path)


def _boxes(rng, count):
    """Random boxes (x0, y0, x1, y1), small and large, many near the borders."""
    x0, y0 = rng.integers(0, WIDTH - 12, count), rng.integers(0, HEIGHT - 12, count)
    return np.stack([x0, y0, np.minimum(WIDTH, x0 + rng.integers(8, 60, count)),
                     np.minimum(HEIGHT, y0 + rng.integers(8, 60, count))], 1)


def _voc_with_boxes(root, images: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    for folder in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids, truth = [f"im{i}" for i in range(images)], []
    for image_id in ids:
        _ramp(root / "JPEGImages" / f"{image_id}.png")
        boxes = _boxes(rng, int(rng.integers(1, 4)))
        truth.append(boxes)
        objects = "".join(f"<object><name>{'abc'[k % 3]}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
                          f"<ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                          for k, b in enumerate(boxes))
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename>{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    return truth


def _shown(tensor) -> tuple[float, float, float, float]:
    """The source rectangle an augmented ramp image shows: (x0, y0, x1, y1) from its pixels."""
    red, green = tensor[0].numpy() * 255, tensor[1].numpy() * 255
    return red.min(), green.min(), red.max() + 1, green.max() + 1


def _cut_boxes(dataset, truth, seeds) -> int:
    """How many (sample, box) pairs of ``seeds`` augmentations lose part of a labelled box: more
    than one output pixel's width of source (the resize samples pixel centres, not edges)."""
    cut = 0
    for index, boxes in enumerate(truth):
        for seed in seeds:
            x0, y0, x1, y1 = _shown(dataset[(index, seed)][0])
            dx, dy = (x1 - x0) / PRE["image_size"] + 0.5, (y1 - y0) / PRE["image_size"] + 0.5
            cut += int(((boxes[:, 0] < x0 - dx) | (boxes[:, 1] < y0 - dy) | (boxes[:, 2] > x1 + dx)
                        | (boxes[:, 3] > y1 + dy)).sum())
    return cut


def test_voc_reader_keeps_the_boxes_in_pixels(tmp_path):
    truth = _voc_with_boxes(tmp_path, images=3)
    table = read_voc_table(tmp_path, "train")
    for got, want in zip(table.boxes, truth):
        np.testing.assert_array_equal(got, want)  # VOC's 1-based inclusive corners -> x0, y0, x1, y1
    assert [len(b) for b in table.subset([2, 0], "s").boxes] == [len(truth[2]), len(truth[0])]


def test_coco_reader_keeps_the_boxes_and_treats_a_missing_one_as_the_whole_image(tmp_path):
    _ramp(tmp_path / "a.png")
    coco = {"categories": [{"id": 1, "name": "cat"}], "images": [{"id": 5, "file_name": "a.png"}],
            "annotations": [{"image_id": 5, "category_id": 1, "bbox": [10, 20, 30, 40]},
                            {"image_id": 5, "category_id": 1}]}
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    boxes = read_coco_table(tmp_path / "instances_train.json", tmp_path).boxes[0]
    np.testing.assert_array_equal(boxes[0], [10, 20, 40, 60])
    assert np.isinf(boxes[1]).all()
    top, left, h, w = BoxSafeCrop((0.1, 0.2), CROP_RATIO).region(HEIGHT, WIDTH, boxes, np.random.default_rng(0))
    assert (top, left, h, w) == (0, 0, HEIGHT, WIDTH)


@pytest.mark.parametrize("box_safe", [True, False])
def test_a_training_crop_never_cuts_a_labelled_box_with_box_crops_on(tmp_path, box_safe):
    truth = _voc_with_boxes(tmp_path)
    table = read_voc_table(tmp_path, "train")
    crop = box_crop(PRE, "light") if box_safe else None
    dataset = ImageDataset(table, build_transform(PRE, True, "light", box_safe=box_safe), crop=crop)
    cut = _cut_boxes(dataset, truth, seeds=range(12))
    if box_safe:
        assert cut == 0
    else:  # the plain random resized crop does cut them: the check above can fail
        assert cut > 20


def test_box_crops_still_crop_and_move(tmp_path):
    """Small boxes leave the crop its usual freedom: sizes and positions vary, as timm's do."""
    truth = _voc_with_boxes(tmp_path, images=1)
    table = read_voc_table(tmp_path, "train")
    table.boxes = [np.array([[90, 70, 100, 80]], np.float32)]
    dataset = ImageDataset(table, build_transform(PRE, True, "light", box_safe=True), crop=box_crop(PRE, "light"))
    shown = np.array([_shown(dataset[(0, seed)][0]) for seed in range(40)])
    areas = (shown[:, 2] - shown[:, 0]) * (shown[:, 3] - shown[:, 1]) / (WIDTH * HEIGHT)
    assert areas.min() < 0.75 and len(np.unique(shown[:, 0].round())) > 10
    assert areas.min() > CROP_SCALE["light"][0] * 0.9
    del truth


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), seed=st.integers(0, 2**31),
       boxes=st.lists(st.tuples(*[st.floats(-50, 450, allow_nan=False)] * 4), max_size=4),
       scale=st.sampled_from(list(CROP_SCALE.values())))
def test_the_region_lies_in_the_image_and_holds_every_box(height, width, seed, boxes, scale):
    boxes = np.array([[min(a, c), min(b, d), max(a, c), max(b, d)] for a, b, c, d in boxes], np.float32).reshape(-1, 4)
    top, left, h, w = BoxSafeCrop(scale, CROP_RATIO).region(height, width, boxes, np.random.default_rng(seed))
    assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width
    clipped = np.clip(boxes, 0, [width, height, width, height])
    assert (clipped[:, 0] >= left).all() and (clipped[:, 2] <= left + w).all()
    assert (clipped[:, 1] >= top).all() and (clipped[:, 3] <= top + h).all()


def test_voc_training_with_boxes_says_box_crops_and_trains(tmp_path, capsys):
    _voc_with_boxes(tmp_path / "voc", images=24)
    (tmp_path / "voc" / "ImageSets" / "Main" / "val.txt").write_text(
        (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").read_text())
    code = train_main(["quickstart", f"out_dir={tmp_path / 'run'}", "model.backbone=test_resnet", "model.pretrained=false",
                       "data.generate=null", "data.format=voc", f"data.root={tmp_path / 'voc'}", "data.train=train",
                       "data.val=val", "data.test=null", "data.resize=crop", "data.augment=light", "data.cache=true",
                       "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
                       "train.channels_last=false", "thresholds.cross_fit=0", "overwrite=true"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "defaults: data.box_crops=true" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["n_images"] == 24
