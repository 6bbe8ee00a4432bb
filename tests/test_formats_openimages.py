"""data.format: openimages — image-label CSVs (Confidence 1/0, the rest unknown) written from Open
Images' published layout, read back cell by cell, kept sparse past the cell limit, trained, refused."""
import csv
import json

import numpy as np
import pytest
import yaml

from mlabel.config import load_config
from mlabel.data import build_splits
from mlabel.data import openimages
from mlabel.data.__main__ import main as data_main
from mlabel.data.synthetic import SCENE_LABELS, draw_scene_with_boxes
from mlabel.train import main as train_main

from test_formats_yolo import TINY

IDS = [f"/m/0{k}x" for k in range(len(SCENE_LABELS))]
SIZE = 64


def write_openimages(root, counts=(30, 12), bom=False):
    """Class descriptions (the scene shapes, plus two unused classes sharing a display name), and per
    split images in root/<train|validation>/<ImageID>.jpg, a labels CSV where a present shape is
    verified 1, an absent one verified 0 half the time and otherwise not listed (unknown), and a
    box CSV. Returns {split: {image id: (row by label name, boxes)}}."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "oidv7-class-descriptions.csv").open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["LabelName", "DisplayName"])
        writer.writerows([*zip(IDS, SCENE_LABELS), ("/m/0zz1", "Bat"), ("/m/0zz2", "Bat")])
    truth = {}
    rng = np.random.default_rng(0)
    for split, prefix, n in (("train", "train", counts[0]), ("val", "validation", counts[1])):
        (root / prefix).mkdir(exist_ok=True)
        truth[split] = {}
        labels_rows, box_rows = [], []
        for i in range(n):
            image_id = f"{prefix[:2]}{i:06x}"
            image, target, boxes = draw_scene_with_boxes(rng, SIZE)
            image.save(root / prefix / f"{image_id}.jpg", quality=95)
            row = {}
            for j, name in enumerate(SCENE_LABELS):
                if target[j]:
                    labels_rows.append([image_id, "verification", IDS[j], "1"])
                    row[name] = 1.0
                elif rng.random() < 0.5:
                    labels_rows.append([image_id, "crowdsource-verification", IDS[j], "0"])
                    row[name] = 0.0
                else:
                    row[name] = -1.0
            for name, x0, y0, x1, y1 in boxes:
                box_rows.append([image_id, "xclick", IDS[SCENE_LABELS.index(name)], "1",
                                 x0 / SIZE, x1 / SIZE, y0 / SIZE, y1 / SIZE])
            truth[split][image_id] = (row, np.array([b[1:] for b in boxes], np.float32).reshape(-1, 4))
        rng.shuffle(labels_rows)  # Open Images' rows are in no particular image order
        with (root / f"{prefix}-annotations-human-imagelabels.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "Source", "LabelName", "Confidence"], *labels_rows])
        with (root / f"{prefix}-annotations-bbox.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax"],
                                     *box_rows])
    return truth


def _data(root, *extra):
    return load_config("quickstart", ["data.format=openimages", f"data.root={root}", "data.generate=null",
                                      "data.train=train-annotations-human-imagelabels.csv",
                                      "data.val=validation-annotations-human-imagelabels.csv", "data.test=null",
                                      *extra]).data


def _check(table, truth, names):
    ids = [p.rsplit("/", 1)[1][:-4] for p in table.paths]
    assert sorted(ids) == sorted(truth)
    expected = np.array([[truth[i][0][n] for n in names] for i in ids], np.float32)
    np.testing.assert_array_equal(table.dense_targets(), expected)


def test_openimages_round_trip_cell_by_cell_with_unknowns(tmp_path):
    truth = write_openimages(tmp_path)
    splits = build_splits(_data(tmp_path), "multilabel")
    assert splits.labels == SCENE_LABELS  # the classes the training CSV lists, in the class file's order
    _check(splits.train, truth["train"], SCENE_LABELS)
    _check(splits.val, truth["val"], SCENE_LABELS)
    assert (splits.train.dense_targets() == -1).any()
    assert all("/validation/" in p for p in splits.val.paths)


def test_openimages_subset_by_name_or_id_and_boxes(tmp_path):
    truth = write_openimages(tmp_path)
    splits = build_splits(_data(tmp_path, f"data.labels=[star,'{IDS[0]}']",
                                "data.box_files=[train-annotations-bbox.csv]"), "multilabel")
    assert splits.labels == ["star", "circle"]
    # images without a verified cell among the labels in use have nothing to train on: left out
    listed = {i: t for i, t in truth["train"].items() if t[0]["star"] >= 0 or t[0]["circle"] >= 0}
    assert len(listed) < len(truth["train"])
    _check(splits.train, listed, ["star", "circle"])
    for i, path in enumerate(splits.train.paths):
        row, boxes = truth["train"][path.rsplit("/", 1)[1][:-4]]
        assert len(splits.train.boxes[i]) == int(row["star"] == 1) + int(row["circle"] == 1)
        kept = [b for b in boxes if any((np.abs(b - k) < 0.05).all() for k in splits.train.boxes[i])]
        assert len(kept) == len(splits.train.boxes[i])


def test_openimages_stays_sparse_past_the_cell_limit_with_unknown_default(tmp_path, monkeypatch):
    truth = write_openimages(tmp_path)
    monkeypatch.setattr(openimages, "SPARSE_FROM", 10)
    splits = build_splits(_data(tmp_path), "multilabel")
    assert splits.train.sparse and splits.train.targets.default == -1.0
    _check(splits.train, truth["train"], SCENE_LABELS)
    _check(splits.val, truth["val"], SCENE_LABELS)


def _recipe(tmp_path, root):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {
        "format": "openimages", "root": str(root), "train": "train-annotations-human-imagelabels.csv",
        "val": "validation-annotations-human-imagelabels.csv", "box_files": ["train-annotations-bbox.csv"]}}))
    return recipe


def test_openimages_trains_end_to_end_summary_and_shards(tmp_path, capsys):
    write_openimages(tmp_path / "d")
    recipe = _recipe(tmp_path, tmp_path / "d")
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", "data.augment=light", *TINY]) == 0
    assert json.loads((out / "metrics.json").read_text())["val"]["n_images"] == 12
    assert data_main([str(recipe), "--out", str(tmp_path / "summary")]) == 0
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert summary["images"] == {"train": 30, "val": 12} and summary["unknown_rate"] > 0.1
    assert data_main(["shard", str(recipe), "--out", str(tmp_path / "shards")]) == 0


def test_openimages_bom_reads_the_same(tmp_path):
    truth = write_openimages(tmp_path, bom=True)
    csv_path = tmp_path / "train-annotations-human-imagelabels.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    splits = build_splits(_data(tmp_path), "multilabel")
    _check(splits.train, truth["train"], SCENE_LABELS)


TRAIN = "train-annotations-human-imagelabels.csv"
VAL = "validation-annotations-human-imagelabels.csv"


def _append(name, row, line=None):
    def edit(root):
        rows = list(csv.reader((root / name).read_text().splitlines()))
        rows.insert(line or len(rows), row)
        with (root / name).open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        return f"{name}:{(line or len(rows) - 1) + 1}"
    return edit


def _first_image(root):
    first = next(csv.reader((root / TRAIN).read_text().splitlines()[1:]))[0]
    return root / "train" / f"{first}.jpg"


BAD = [
    ("missing csv", lambda r: ((r / TRAIN).unlink(), TRAIN)[1], "not found"),
    ("confidence not 0/1", _append(TRAIN, ["tr000000", "machine", IDS[0], "0.7"], 3), "Confidence '0.7'"),
    ("label not in class file", _append(TRAIN, ["tr000000", "v", "/m/nope", "1"], 2), "not in the class-descriptions"),
    ("val label train lacks", lambda r: (_append(VAL, ["va000000", "v", "/m/0zz1", "1"], 2)(r)), "not in the training labels"),
    ("conflict", _append(TRAIN, ["tr000000", "v", IDS[0], "1"]) , ""),
    ("latin-1", lambda r: ((r / TRAIN).write_bytes((r / TRAIN).read_bytes() + "tr000000,é,x,1\n".encode("latin-1")),
                           TRAIN + ":")[1], "not UTF-8"),
    ("no class descriptions", lambda r: ((r / "oidv7-class-descriptions.csv").unlink(), "class-descriptions")[1],
     "data.class_descriptions"),
    ("header without Confidence", lambda r: ((r / TRAIN).write_text("ImageID,LabelName\nx,/m/0x\n"), TRAIN + ":1")[1],
     "lacks ['Confidence']"),
    ("missing image", lambda r: (_first_image(r).unlink(), _first_image(r).name)[1], "images not found"),
    ("undecodable image", lambda r: (_first_image(r).write_bytes(b"x"), _first_image(r).name)[1], ".jpg"),
]


@pytest.mark.parametrize("case,edit,fragment", BAD, ids=[b[0] for b in BAD])
def test_openimages_bad_input_one_error_line_exit_2(tmp_path, capsys, case, edit, fragment):
    write_openimages(tmp_path / "d", counts=(10, 5))
    where = edit(tmp_path / "d")
    if case == "conflict":  # tr000000's circle: verified 0 or unlisted before, now also 1 and 0
        _append(TRAIN, ["tr000000", "v", IDS[0], "0"])(tmp_path / "d")
        where, fragment = "tr000000", "both verified present (1) and absent (0)"
    recipe = _recipe(tmp_path, tmp_path / "d")
    capsys.readouterr()
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", *TINY]) == 2, case
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert fragment in err and where in err and "internal error" not in err, err
    assert not out.exists() or not any(out.rglob("*.json"))


@pytest.mark.parametrize("labels", [[], ["data.labels=[star,circle]"]])
def test_openimages_vectorised_reader_matches_the_row_reader(tmp_path, monkeypatch, labels):
    write_openimages(tmp_path)
    path = tmp_path / TRAIN
    known = openimages.read_class_descriptions(tmp_path / "oidv7-class-descriptions.csv")
    assert openimages._fast_pairs(path, {i: j for j, i in enumerate(IDS)}, known, True) is not None
    fast = build_splits(_data(tmp_path, *labels), "multilabel")
    monkeypatch.setattr(openimages, "_fast_pairs", lambda *a: None)
    slow = build_splits(_data(tmp_path, *labels), "multilabel")
    assert fast.train.paths == slow.train.paths and fast.labels == slow.labels
    np.testing.assert_array_equal(fast.train.targets, slow.train.targets)
    np.testing.assert_array_equal(fast.val.targets, slow.val.targets)
