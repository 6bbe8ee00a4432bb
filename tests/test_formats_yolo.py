"""data.format: yolo — Ultralytics data.yaml layouts written from the published spec, read back
cell by cell, trained end to end, summarised, sharded and refused when malformed."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from mlabel.data import build_splits
from mlabel.data.__main__ import main as data_main
from mlabel.config import load_config
from mlabel.data.synthetic import SCENE_LABELS, draw_scene_with_boxes
from mlabel.train import main as train_main

TINY = ["model.backbone=test_resnet", "model.pretrained=false", "data.generate=null", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "train.channels_last=false", "thresholds.cross_fit=0",
        "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]
SIZE = 64


def _write_split(image_dir, label_dir, n, seed, polygon_every=3):
    """n scenes as images + YOLO label files; returns {file name: (target (6,), pixel boxes (K, 4))}."""
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        image, target, boxes = draw_scene_with_boxes(rng, SIZE)
        name = f"s{seed}_{i}.png"
        image.save(image_dir / name)
        lines = []
        for k, (label, x0, y0, x1, y1) in enumerate(boxes):
            c = SCENE_LABELS.index(label)
            if k % polygon_every == 1:  # a segment: the box's corners plus a midpoint, as a polygon
                pts = [x0, y0, x1, y0, x1, (y0 + y1) / 2, x1, y1, x0, y1]
                lines.append(f"{c} " + " ".join(f"{v / SIZE:.6f}" for v in pts))
            else:
                lines.append(f"{c} {(x0 + x1) / 2 / SIZE:.6f} {(y0 + y1) / 2 / SIZE:.6f} "
                             f"{(x1 - x0) / SIZE:.6f} {(y1 - y0) / SIZE:.6f}")
        (label_dir / f"s{seed}_{i}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        truth[name] = (target, np.array([b[1:] for b in boxes], np.float32).reshape(-1, 4))
    return truth


def roboflow(root, n=(24, 10, 8)):
    """Roboflow's export: data.yaml beside train/ valid/ test/, ``../x/images`` entries, names list + nc."""
    truth = {}
    for split, folder, count, seed in zip(("train", "val", "test"), ("train", "valid", "test"), n, (0, 1, 2)):
        truth[split] = _write_split(root / folder / "images", root / folder / "labels", count, seed)
    (root / "data.yaml").write_text(yaml.safe_dump({
        "train": "../train/images", "val": "../valid/images", "test": "../test/images",
        "nc": len(SCENE_LABELS), "names": SCENE_LABELS}))
    return root / "data.yaml", truth


def ultralytics(root, n=(24, 10)):
    """Ultralytics' layout: images/{train,val} and labels/{train,val}; the yaml elsewhere with a
    ``path`` relative to it and names as an id -> name map; no test split."""
    truth = {split: _write_split(root / "ds" / "images" / split, root / "ds" / "labels" / split, count, seed)
             for split, count, seed in zip(("train", "val"), n, (3, 4))}
    (root / "cfg").mkdir()
    (root / "cfg" / "data.yaml").write_text(yaml.safe_dump({
        "path": "../ds", "train": "images/train", "val": "images/val",
        "names": {i: name for i, name in enumerate(SCENE_LABELS)}}))
    return root / "cfg" / "data.yaml", truth


def _config(yaml_path, *extra):
    return load_config("quickstart", ["data.format=yolo", f"data.root={yaml_path}", "data.train=train.csv",
                                      "data.val=null", "data.test=null", "data.generate=null", *extra]).data


def _check(table, truth):
    expected = np.stack([truth[p.rsplit("/", 1)[1]][0] for p in table.paths])
    np.testing.assert_array_equal(table.dense_targets(), expected)  # every cell; no unknown in YOLO
    for i, path in enumerate(table.paths):
        np.testing.assert_allclose(table.boxes[i], truth[path.rsplit("/", 1)[1]][1], atol=0.01)


@pytest.mark.parametrize("layout", [roboflow, ultralytics])
def test_yolo_round_trip_cell_by_cell(tmp_path, layout):
    yaml_path, truth = layout(tmp_path)
    splits = build_splits(_config(yaml_path), "multilabel")
    assert splits.labels == SCENE_LABELS
    _check(splits.train, truth["train"])
    _check(splits.val, truth["val"])
    assert (splits.test is None) == ("test" not in truth)
    if splits.test is not None:
        _check(splits.test, truth["test"])


def test_yolo_without_test_gets_one_carved(tmp_path):
    yaml_path, truth = ultralytics(tmp_path)
    splits = build_splits(_config(yaml_path, "data.test_fraction=0.25"), "multilabel")
    assert len(splits.test) > 0 and len(splits.train) + len(splits.test) == len(truth["train"])
    _check(splits.test, truth["train"])


def test_yolo_list_files_lists_of_folders_empty_and_missing_label_files(tmp_path, capsys):
    yaml_path, truth = ultralytics(tmp_path)
    ds = tmp_path / "ds"
    names = sorted(truth["train"])
    (ds / "train.txt").write_text("".join(f"./images/train/{n}\n" for n in names[:10]) +
                                  "".join(f"{ds}/images/train/{n}\n" for n in names[10:]))
    (ds / "labels" / "train" / names[0].replace(".png", ".txt")).write_text("")  # no object
    (ds / "labels" / "train" / names[1].replace(".png", ".txt")).unlink()  # background, warned
    extra = _write_split(ds / "more" / "images", ds / "more" / "labels", 5, 9)
    tree = yaml.safe_load(yaml_path.read_text())
    (tmp_path / "cfg" / "data.yaml").write_text(yaml.safe_dump({**tree, "train": "train.txt",
                                                                "val": ["images/val", "more/images"]}))
    splits = build_splits(_config(yaml_path), "multilabel")
    assert "1 of 24 images have no label file" in capsys.readouterr().err
    for name in names[:2]:
        truth["train"][name] = (np.zeros(6, np.float32), np.zeros((0, 4), np.float32))
    _check(splits.train, truth["train"])
    _check(splits.val, {**truth["val"], **extra})


def test_yolo_data_labels_trains_on_a_subset(tmp_path):
    yaml_path, truth = roboflow(tmp_path)
    splits = build_splits(_config(yaml_path, "data.labels=[star,circle]"), "multilabel")
    assert splits.labels == ["star", "circle"]
    for i, path in enumerate(splits.train.paths):
        target, boxes = truth["train"][path.rsplit("/", 1)[1]]
        np.testing.assert_array_equal(splits.train.targets[i], target[[5, 0]])
        assert len(splits.train.boxes[i]) == int(target[[5, 0]].sum())


def test_yolo_trains_end_to_end_from_the_yaml_alone(tmp_path, capsys):
    yaml_path, _ = roboflow(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {"format": "yolo", "root": str(yaml_path)}}))
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", "data.augment=light", "data.box_crops=true", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["n_images"] == 10 and metrics["test"]["n_images"] == 8
    assert json.loads((out / "run.json").read_text())["label_counts"]["train"]["images"] == 24


def test_yolo_summary_and_shards(tmp_path, capsys):
    yaml_path, truth = roboflow(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {"format": "yolo", "root": str(yaml_path)}}))
    assert data_main([str(recipe), "--out", str(tmp_path / "summary")]) == 0
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert summary["images"] == {"train": 24, "val": 10, "test": 8}
    positives = sum(t for t, _ in truth["train"].values())
    counts = summary["label_counts"]["train"]
    assert [counts[n]["positive"] for n in SCENE_LABELS] == positives.astype(int).tolist()
    assert data_main(["shard", str(recipe), "--out", str(tmp_path / "shards")]) == 0
    assert (tmp_path / "shards" / "labels.json").is_file()
    assert data_main(["shard", str(recipe), "--out", str(tmp_path / "data" / "shards")]) == 2
    assert "inside the data folder" in capsys.readouterr().err
    assert not (tmp_path / "data" / "shards").exists()


def _edit_label(line_text):
    def edit(yaml_path):
        first = sorted((yaml_path.parent / "train" / "labels").glob("*.txt"))[0]
        first.write_text(line_text)
        return f"{first.name}:1"
    return edit


def _edit_yaml(change):
    def edit(yaml_path):
        tree = yaml.safe_load(yaml_path.read_text())
        change(tree)
        yaml_path.write_text(yaml.safe_dump(tree))
        return "data.yaml"
    return edit


def _latin1(yaml_path):
    yaml_path.write_bytes(yaml_path.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    return "data.yaml:"


def _bad_image(yaml_path):
    sorted((yaml_path.parent / "train" / "images").glob("*.png"))[0].write_bytes(b"not a png")
    return ".png"


def _duplicate(yaml_path):
    (yaml_path.parent / "list.txt").write_text("./train/images/s0_0.png\n./train/images/s0_0.png\n")
    return _edit_yaml(lambda t: t.update(train="list.txt"))(yaml_path)


BAD = [
    ("class id outside names", _edit_label("6 0.5 0.5 0.1 0.1\n"), "class id '6' is not one of 0..5"),
    ("wrong column count", _edit_label("1 0.5 0.5 0.1\n"), "4 columns"),
    ("coordinates outside [0, 1]", _edit_label("1 0.5 1.5 0.1 0.1\n"), "outside [0, 1]"),
    ("not numbers", _edit_label("cat 0.5 0.5 0.1 0.1\n"), "is not numbers"),
    ("latin-1 label file", lambda p: (_edit_label("1 0.5 0.5 0.1 0.1\n")(p),
                                      sorted((p.parent / "train" / "labels").glob("*.txt"))[0].write_bytes(b"\xe9"))[0],
     "not UTF-8"),
    ("yaml without names", _edit_yaml(lambda t: t.pop("names")), "no 'names'"),
    ("nc disagrees", _edit_yaml(lambda t: t.update(nc=3)), "nc is 3"),
    ("missing split folder", _edit_yaml(lambda t: t.update(val="../nowhere/images")), "not found"),
    ("latin-1 yaml", _latin1, "not UTF-8"),
    ("duplicate images", _duplicate, "twice"),
    ("undecodable image", _bad_image, "s0_0.png"),
    ("missing yaml", lambda p: (p.unlink(), "data.yaml not found")[1], "not found"),
]


@pytest.mark.parametrize("case,edit,fragment", BAD, ids=[b[0] for b in BAD])
def test_yolo_bad_input_one_error_line_exit_2_nothing_written(tmp_path, capsys, case, edit, fragment):
    yaml_path, _ = roboflow(tmp_path / "data", n=(6, 3, 2))
    where = edit(yaml_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {"format": "yolo", "root": str(yaml_path)}}))
    capsys.readouterr()
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", *TINY]) == 2, case
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in err and where in err, err
    assert "internal error" not in err
    assert not out.exists() or not any(out.rglob("*.json"))


def test_yolo_on_bad_image_skip_trains_without_it(tmp_path, capsys):
    yaml_path, _ = roboflow(tmp_path / "data", n=(12, 4, 0))
    tree = yaml.safe_load(yaml_path.read_text())
    tree.pop("test")
    yaml_path.write_text(yaml.safe_dump(tree))
    bad = sorted((yaml_path.parent / "train" / "images").glob("*.png"))[0]
    bad.write_bytes(b"not a png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {"format": "yolo", "root": str(yaml_path)}}))
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", "data.on_bad_image=skip", *TINY]) == 0
    assert bad.name in (out / "skipped.csv").read_text()
