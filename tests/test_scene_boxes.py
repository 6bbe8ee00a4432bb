"""The quickstart's scene generator records each shape's box (issue 32, item 4) without changing
a pixel of what it draws."""
import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlabel.data.synthetic import SCENE_LABELS, _draw_shape, _shape_box, draw_scene_with_boxes, ensure_scenes

# sha256 of the pixels of train_00000..00019 as generator version 1 drew them (seed 1234), before
# boxes were recorded: measured from that version's files
VERSION_1_PIXELS = "9c64ffa2a436b410cc3e8e8bef2d4ae7272bb042c6e22a9b9f554e2973c323a0"


def test_pixels_are_those_of_the_generator_before_boxes():
    rng = np.random.default_rng([1234, 0])  # the train split's generator
    digest = hashlib.sha256()
    for _ in range(20):
        image, _, _ = draw_scene_with_boxes(rng)
        digest.update(np.asarray(image).tobytes())
    assert digest.hexdigest() == VERSION_1_PIXELS


@pytest.mark.parametrize("name", SCENE_LABELS)
def test_each_box_bounds_its_shape(name):
    """Against the pixels: one shape drawn alone on black, its box within a pixel of the drawn extent."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        r = rng.uniform(15, 30)
        cx, cy = rng.uniform(r + 10, 128 - r - 10, 2)
        angle = rng.uniform(0, 2 * math.pi)
        canvas = Image.new("L", (128, 128))
        _draw_shape(ImageDraw.Draw(canvas), name, cx, cy, r, angle, 255)
        ys, xs = np.nonzero(np.asarray(canvas))
        x0, y0, x1, y1 = _shape_box(name, cx, cy, r, angle)
        assert x0 - 1.5 <= xs.min() and xs.max() <= x1 + 1.5 and y0 - 1.5 <= ys.min() and ys.max() <= y1 + 1.5
        assert xs.min() <= x0 + 2.5 and xs.max() >= x1 - 2.5 and ys.min() <= y0 + 2.5 and ys.max() >= y1 - 2.5


def test_ensure_scenes_writes_the_boxes_beside_the_labels(tmp_path):
    root = ensure_scenes(tmp_path / "scenes", splits={"train": 6, "val": 3})
    rows = (root / "train.csv").read_text().splitlines()[1:]
    boxes = json.loads((root / "train_boxes.json").read_text())
    assert len(boxes) == 6
    for row in rows:
        path, *flags = row.split(",")
        present = {SCENE_LABELS[i] for i, f in enumerate(flags) if f == "1"}
        assert {b[0] for b in boxes[path]} == present  # one box per shape drawn, named by its label
        for _, *box in boxes[path]:
            assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64


def test_visibility_draws_the_same_pixels_and_the_last_shape_is_whole():
    """scene_visibility replays the generator with a mask per shape: the pixels stay the same,
    absent labels are NaN, and the shape drawn last (the last box) is never covered."""
    from mlabel.data.synthetic import _scene, scene_visibility
    rng = np.random.default_rng([1234, 0])
    digest = hashlib.sha256()
    shares = []
    for _ in range(20):
        image, target, boxes, visible = _scene(rng, 64, masks=True)
        digest.update(np.asarray(image).tobytes())
        assert np.array_equal(np.isnan(visible), target == 0)
        if boxes:
            assert visible[SCENE_LABELS.index(boxes[-1][0])] == 1.0
        shares.append(visible)
    assert digest.hexdigest() == VERSION_1_PIXELS
    np.testing.assert_array_equal(scene_visibility(splits={"train": 20})["train"], np.stack(shares))
    assert np.nanmin(np.stack(shares)) >= 0 and np.nanmax(np.stack(shares)) <= 1


def test_visible_shares_of_overlapping_masks():
    from mlabel.data.synthetic import _visible_shares
    under, over, apart = (np.zeros((20, 20), bool) for _ in range(3))
    under[0:10, 0:10] = True  # 100 pixels, 50 of them under `over`
    over[5:15, 0:10] = True
    apart[18:20, 18:20] = True
    shares = _visible_shares([(2, under), (0, over), (5, apart)])  # drawn in this order
    assert shares[2] == 0.5 and shares[0] == 1.0 and shares[5] == 1.0
    assert np.isnan(shares[[1, 3, 4]]).all()
