"""data.format: labelstudio — Label Studio JSON exports (Choices), written as Label Studio writes
them, read back cell by cell (annotator disagreement as unknown), trained, summarised, refused."""
import json

import numpy as np
import pytest
import yaml

from mlabel.config import load_config
from mlabel.data import build_splits
from mlabel.data.__main__ import main as data_main
from mlabel.data.synthetic import SCENE_LABELS, draw_scene
from mlabel.train import main as train_main

from test_formats_yolo import TINY


def _annotation(chosen, cancelled=False):
    return {"id": 1, "completed_by": 1, "was_cancelled": cancelled,
            "result": [{"from_name": "shapes", "to_name": "image", "type": "choices",
                        "value": {"choices": list(chosen)}}] if chosen else []}


def write_export(root, name, n, seed, form="local"):
    """n tasks; every third has a second annotator who drops one chosen shape and adds 'star';
    every seventh only a cancelled annotation. Returns ({image path: expected row by label}, skipped)."""
    rng = np.random.default_rng(seed)
    (root / "media").mkdir(parents=True, exist_ok=True)
    tasks, expected, skipped = [], {}, 0
    for i in range(n):
        image, target = draw_scene(rng)
        file = f"{name}{i}.png"
        image.save(root / "media" / file)
        chosen = [SCENE_LABELS[j] for j in np.flatnonzero(target)]
        ref = {label: float(label in chosen) for label in SCENE_LABELS}
        annotations = [_annotation(chosen)]
        if i % 7 == 6:
            annotations, skipped = [_annotation(chosen, cancelled=True)], skipped + 1
        elif i % 3 == 2:
            other = chosen[1:] + ([] if "star" in chosen else ["star"])
            annotations.append(_annotation(other))
            for label in set(chosen) ^ set(other):
                ref[label] = -1.0
        path = f"/data/local-files/?d=media/{file}" if form == "local" else f"media/{file}"
        tasks.append({"id": 100 + i, "data": {"image": path}, "annotations": annotations, "predictions": []})
        if annotations[0]["was_cancelled"] is False:
            expected[str(root / "media" / file)] = ref
    (root / name).write_text(json.dumps(tasks))
    return expected, skipped


def _recipe(tmp_path, root, **data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {
        "format": "labelstudio", "root": str(root), "train": "train.json", "val": "val.json", **data}}))
    return recipe


def test_labelstudio_round_trip_cell_by_cell_with_disagreement_unknown(tmp_path, capsys):
    train, skipped = write_export(tmp_path, "train.json", 30, 0)
    val, _ = write_export(tmp_path, "val.json", 12, 1, form="relative")
    data = load_config(str(_recipe(tmp_path, tmp_path)), []).data
    splits = build_splits(data, "multilabel")
    assert "4 of 30 tasks have no completed annotation" in capsys.readouterr().err and skipped == 4
    names = sorted({l for ref in (*train.values(), *val.values()) for l, v in ref.items() if v != 0})
    assert splits.labels == names
    for table, truth in ((splits.train, train), (splits.val, val)):
        assert sorted(table.paths) == sorted(truth)
        expected = np.array([[truth[p][n] for n in names] for p in table.paths], np.float32)
        np.testing.assert_array_equal(table.dense_targets(), expected)
    assert (splits.train.dense_targets() == -1).any()


def test_labelstudio_trains_end_to_end_and_summarises(tmp_path, capsys):
    write_export(tmp_path / "d", "train.json", 30, 0)
    write_export(tmp_path / "d", "val.json", 12, 1)
    recipe = _recipe(tmp_path, tmp_path / "d")
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", *TINY]) == 0
    assert json.loads((out / "metrics.json").read_text())["val"]["n_images"] == 11
    assert data_main([str(recipe), "--out", str(tmp_path / "summary")]) == 0
    assert json.loads((tmp_path / "summary" / "summary.json").read_text())["images"] == {"train": 26, "val": 11}
    assert data_main(["shard", str(recipe), "--out", str(tmp_path / "shards")]) == 0


def test_labelstudio_bom_is_read_as_utf8(tmp_path):
    truth, _ = write_export(tmp_path, "train.json", 14, 0)
    write_export(tmp_path, "val.json", 7, 1)
    plain = build_splits(load_config(str(_recipe(tmp_path, tmp_path)), []).data, "multilabel")
    (tmp_path / "train.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.json").read_bytes())
    bom = build_splits(load_config(str(_recipe(tmp_path, tmp_path)), []).data, "multilabel")
    np.testing.assert_array_equal(plain.train.targets, bom.train.targets)


def _edit(change):
    def edit(root):
        tasks = json.loads((root / "train.json").read_text())
        change(tasks)
        (root / "train.json").write_text(json.dumps(tasks))
        return "train.json"
    return edit


def _val_label(root):
    tasks = json.loads((root / "val.json").read_text())
    tasks[0]["annotations"][0]["result"] = [{"type": "choices", "value": {"choices": ["hexagon"]}}]
    (root / "val.json").write_text(json.dumps(tasks))
    return "val.json (task 100"


BAD = [
    ("missing file", lambda r: ((r / "train.json").unlink(), "train.json not found")[1], "not found"),
    ("not JSON", lambda r: ((r / "train.json").write_text("[{\n"), "train.json:")[1], "not valid JSON"),
    ("latin-1", lambda r: ((r / "train.json").write_bytes('[{"data": "é"}]'.encode("latin-1")), "train.json:1")[1],
     "not UTF-8"),
    ("duplicate images", _edit(lambda t: t[1]["data"].update(image=t[0]["data"]["image"])), "also the image of"),
    ("url", _edit(lambda t: t[0]["data"].update(image="https://x.org/a.png")), "is a URL"),
    ("no image key", _edit(lambda t: t[0].update(data={"a": "x.png", "b": "y.png"})), "no image path"),
    ("choices not a list", _edit(lambda t: t[0]["annotations"][0].update(
        result=[{"type": "choices", "value": {"choices": "cat"}}])),
     "expected a list of class names"),
    ("val label train lacks", _val_label, "not in the training labels"),
    ("undecodable image", lambda r: ((r / "media" / "train.json0.png").write_bytes(b"x"), "train.json0.png")[1],
     "train.json0.png"),
]


@pytest.mark.parametrize("case,edit,fragment", BAD, ids=[b[0] for b in BAD])
def test_labelstudio_bad_input_one_error_line_exit_2(tmp_path, capsys, case, edit, fragment):
    write_export(tmp_path / "d", "train.json", 10, 0)
    write_export(tmp_path / "d", "val.json", 5, 1)
    where = edit(tmp_path / "d")
    recipe = _recipe(tmp_path, tmp_path / "d")
    capsys.readouterr()
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", *TINY]) == 2, case
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert fragment in err and where in err and "internal error" not in err, err
    assert not out.exists() or not any(out.rglob("*.json"))
