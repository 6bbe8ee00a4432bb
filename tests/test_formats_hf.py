"""data.format: hf — sets written by ``datasets`` itself (save_to_disk, imagefolder, parquet), read
back cell by cell (unknowns included), summarised, sharded, trained end to end, passed to
``mlabel.fit`` as a DatasetDict, and refused with one error line when malformed."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

datasets = pytest.importorskip("datasets")

from mlabel.config import load_config  # noqa: E402
from mlabel.data import build_splits, read_split  # noqa: E402
from mlabel.data.__main__ import main as data_main  # noqa: E402
from mlabel.train import main as train_main  # noqa: E402

NAMES = ["cat", "dog", "bird"]
TINY = ["model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "train.channels_last=false", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
        "train.epochs=1", "--quiet"]

datasets.disable_progress_bars()
LIST = getattr(datasets, "List", None) or datasets.Sequence  # datasets 4 renamed Sequence to List


def _images(folder, n, seed):
    """n small PNG files of distinct colours; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{seed}_{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _truth(n, seed, unknown=True):
    """(n, 3) targets 1 / 0 / -1, every label positive and negative somewhere."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 2, (n, 3)).astype(np.float32)
    t[0], t[1] = 1, 0
    if unknown:
        t[rng.random((n, 3)) < 0.2] = -1
        t[:2] = [[1, 1, 1], [0, 0, 0]]
    return t


def _row(path):
    """The data set row an exported image came from (its file name starts with the row number)."""
    return int(os.path.basename(path)[:8])


def _config(root, tmp_path, *extra):
    return load_config(None, ["data.format=hf", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                              *extra]).data


def _classlabel_set(tmp_path, sizes=(12, 6, 5)):
    """A DatasetDict (train / validation / test) of Image + List(ClassLabel), one row a null list
    (a whole row unknown), saved with save_to_disk; returns (folder, {split: (targets, pixels)})."""
    features = datasets.Features({"image": datasets.Image(), "tags": LIST(datasets.ClassLabel(names=NAMES)),
                                  "note": datasets.Value("string")})
    parts, truth = {}, {}
    for split, n, seed in zip(("train", "validation", "test"), sizes, (0, 1, 2)):
        paths = _images(tmp_path / "src" / split, n, seed)
        t = _truth(n, seed, unknown=False)
        tags = [[j for j in range(3) if row[j] == 1] for row in t]
        tags[-1] = None
        t[-1] = -1
        parts[split] = datasets.Dataset.from_dict({"image": paths, "tags": tags, "note": ["x"] * n}, features=features)
        truth[split] = (t, [np.asarray(Image.open(p).convert("RGB")) for p in paths])
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", truth


def test_save_to_disk_class_label_lists_cell_by_cell(tmp_path):
    folder, truth = _classlabel_set(tmp_path)
    before = sorted(folder.rglob("*"))
    splits = build_splits(_config(folder, tmp_path), "multilabel")
    assert splits.labels == NAMES  # the features' names, in their order
    for name, table in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        targets, pixels = truth[name]
        rows = [_row(p) for p in table.paths]
        assert rows == list(range(len(targets)))
        np.testing.assert_array_equal(table.dense_targets(), targets)  # the null list: all unknown
        for i in (0, len(rows) - 1):  # the images, byte for byte as the data set stores them
            np.testing.assert_array_equal(table.read_image(i), pixels[i])
        assert all(str(tmp_path / "cache") in p for p in table.paths)
    assert sorted(folder.rglob("*")) == before  # nothing written into the data set's folder
    again = build_splits(_config(folder, tmp_path), "multilabel")  # the export is reused
    assert again.train.paths == splits.train.paths
    (Path(splits.train.paths[0]).parent / "rows.json").unlink()  # a folder without its row list: exported again
    np.testing.assert_array_equal(build_splits(_config(folder, tmp_path), "multilabel").train.read_image(0),
                                  truth["train"][1][0])


def _imagefolder(tmp_path):
    """An imagefolder with metadata.jsonl (a list of label names) in train/ and validation/."""
    truth = {}
    for split, n, seed in (("train", 12, 3), ("validation", 6, 4)):
        paths = _images(tmp_path / "folder" / split, n, seed)
        t = _truth(n, seed, unknown=False)
        with open(tmp_path / "folder" / split / "metadata.jsonl", "w") as handle:
            for path, row in zip(paths, t):
                handle.write(json.dumps({"file_name": os.path.basename(path),
                                         "labels": [NAMES[j] for j in range(3) if row[j] == 1]}) + "\n")
        truth[split] = dict(zip(paths, t))
    return tmp_path / "folder", truth


def test_imagefolder_with_metadata_reads_the_files_where_they_are(tmp_path):
    folder, truth = _imagefolder(tmp_path)
    splits = build_splits(_config(folder, tmp_path), "multilabel")
    assert splits.labels == sorted(NAMES)  # a list of strings: sorted names
    order = [NAMES.index(n) for n in splits.labels]
    for name, table in (("train", splits.train), ("validation", splits.val)):
        assert sorted(table.paths) == sorted(truth[name])  # the original files, no copy
        expected = np.stack([truth[name][p][order] for p in table.paths])
        np.testing.assert_array_equal(table.dense_targets(), expected)


def _flag_set(tmp_path, n=20, seed=5):
    """One 0/1 column per label with -1 and null unknowns, images embedded as bytes."""
    paths = _images(tmp_path / "src" / "flags", n, seed)
    t = _truth(n, seed)
    columns = {name: [None if v < 0 and i % 2 else int(v) for i, v in enumerate(t[:, j])] for j, name in enumerate(NAMES)}
    images = [{"bytes": open(p, "rb").read(), "path": None} for p in paths]
    features = datasets.Features({"image": datasets.Image(), **{n: datasets.Value("int8") for n in NAMES}})
    return datasets.Dataset.from_dict({"image": images, **columns}, features=features), t


def test_parquet_folder_of_flag_columns_unknowns_and_a_carved_split(tmp_path):
    ds, t = _flag_set(tmp_path)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    splits = build_splits(_config(tmp_path / "pq", tmp_path, "data.val_fraction=0.25", "data.test_fraction=0.2"),
                          "multilabel")
    assert splits.labels == NAMES  # the 0/1 columns in order
    seen = []
    for table in (splits.train, splits.val, splits.test):
        rows = [_row(p) for p in table.paths]
        np.testing.assert_array_equal(table.dense_targets(), t[rows])  # -1 and null: unknown
        seen += rows
    assert sorted(seen) == list(range(len(t))) and len(splits.test) > 0
    whole = read_split(_config(tmp_path / "pq", tmp_path), "train")
    np.testing.assert_array_equal(whole.dense_targets(), t)


def test_save_to_disk_dataset_with_flag_columns_and_a_label_file(tmp_path):
    ds, t = _flag_set(tmp_path)
    ds.save_to_disk(str(tmp_path / "one"))
    whole = read_split(_config(tmp_path / "one", tmp_path), "train")
    np.testing.assert_array_equal(whole.dense_targets(), t)
    (tmp_path / "one" / "..").resolve().joinpath("pick.txt").write_text("bird\n\ncat\n")
    picked = read_split(_config(tmp_path / "one", tmp_path, f"data.label_file={tmp_path / 'pick.txt'}"), "train")
    assert picked.labels == ["bird", "cat"]
    np.testing.assert_array_equal(picked.dense_targets(), t[:, [2, 0]])


def test_one_class_label_and_string_lists_with_nulls(tmp_path):
    paths = _images(tmp_path / "src", 5, 9)
    label = datasets.ClassLabel(names=NAMES)
    single = datasets.Dataset.from_dict({"image": paths, "animal": [2, 0, -1, 1, 0]},
                                        features=datasets.Features({"image": datasets.Image(), "animal": label}))
    single.save_to_disk(str(tmp_path / "single"))
    table = read_split(_config(tmp_path / "single", tmp_path), "train")
    assert table.labels == NAMES
    np.testing.assert_array_equal(table.dense_targets(), [[0, 0, 1], [1, 0, 0], [-1, -1, -1], [0, 1, 0], [1, 0, 0]])
    strings = datasets.Dataset.from_dict({"image": paths, "tags": [["dog", "cat"], None, [], ["bird"], ["cat", None]]})
    strings.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "strings"))
    table = read_split(_config(tmp_path / "strings", tmp_path), "train")
    assert table.labels == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(table.dense_targets(), [[0, 1, 1], [-1, -1, -1], [0, 0, 0], [1, 0, 0], [-1, -1, -1]])


def _recipe(tmp_path, root, **data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": {
        "format": "hf", "root": str(root), "cache_dir": str(tmp_path / "cache"), **data}}))
    return recipe


def test_summary_shards_and_training_end_to_end(tmp_path, capsys):
    folder, truth = _classlabel_set(tmp_path)
    recipe = _recipe(tmp_path, folder)
    assert data_main([str(recipe), "--out", str(tmp_path / "summary")]) == 0
    assert "task multilabel, 3 labels, 23 images (train 12, val 6, test 5)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    counts = summary["label_counts"]["train"]
    t = truth["train"][0]
    assert [counts[n]["positive"] for n in NAMES] == (t == 1).sum(0).tolist()
    assert [counts[n]["unknown"] for n in NAMES] == (t < 0).sum(0).tolist()
    assert data_main(["shard", str(recipe), "--out", str(tmp_path / "shards")]) == 0
    tree = json.loads((tmp_path / "shards" / "labels.json").read_text())
    assert sorted(tree["splits"]) == ["test", "train", "val"]
    out = tmp_path / "run"
    assert train_main([str(recipe), f"out_dir={out}", *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val"]["n_images"] == 6 and metrics["test"]["n_images"] == 5


def test_fit_takes_a_dataset_dict(tmp_path, monkeypatch):
    import mlabel
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder, truth = _imagefolder(tmp_path)
    dd = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hfcache"))
    result = mlabel.fit("quickstart", [a for a in TINY if a != "--quiet"], quiet=True, out_dir=str(tmp_path / "run"),
                        data=dd)
    assert result.model.labels == sorted(NAMES)
    assert result.metrics["val"]["n_images"] == 6
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["format"] == "hf" and saved["root"].startswith(str(tmp_path / "xdg" / "mlabel" / "hf"))


def _no_image_column(tmp_path):
    datasets.Dataset.from_dict({"file": ["a.png"], "tags": [["cat"]]}).save_to_disk(str(tmp_path / "d"))
    return "no Image column; columns: file (Value), tags ("


def _no_label_column(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "note": datasets.Value("string")})
    path = _images(tmp_path / "src", 1, 0)[0]
    datasets.Dataset.from_dict({"image": [path], "note": ["x"]}, features=features).save_to_disk(str(tmp_path / "d"))
    return ("no label column (a list of class labels or strings, a class label, or 0/1 columns); columns: "
            "image (Image), note (Value)")


def _val_label_train_lacks(tmp_path):
    parts = {}
    for split, tags in (("train", [["cat"], ["dog"]] * 3), ("validation", [["cat"], ["horse"]])):
        paths = _images(tmp_path / "src" / split, len(tags), len(tags))
        parts[split] = datasets.Dataset.from_dict({"image": paths, "tags": tags}).cast_column("image", datasets.Image())
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "d"))
    return "(split 'validation') row 1: label 'horse' is not in the training labels ['cat', 'dog']"


def _undecodable(tmp_path):
    paths = _images(tmp_path / "src", 8, 0)
    images = [{"bytes": b"not an image" if i == 3 else open(p, "rb").read(), "path": f"p{i}.png"}
              for i, p in enumerate(paths)]
    features = datasets.Features({"image": datasets.Image(), "tags": LIST(datasets.Value("string"))})
    datasets.Dataset.from_dict({"image": images, "tags": [["cat"], ["dog"]] * 4}, features=features).save_to_disk(
        str(tmp_path / "d"))
    return "00000003-p3.png"


def _empty_folder(tmp_path):
    (tmp_path / "d").mkdir()  # a folder without data files: load_dataset refuses it
    return "datasets could not read it"


BAD = [("missing folder", lambda p: "not found: data.root must be a save_to_disk folder"),
       ("a folder datasets cannot read", _empty_folder),
       ("no image column", _no_image_column), ("no label column", _no_label_column),
       ("a val label train lacks", _val_label_train_lacks), ("undecodable image", _undecodable)]


@pytest.mark.parametrize("case,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_error_line_exit_2_nothing_written(tmp_path, capsys, case, make):
    fragment = make(tmp_path)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_main([str(_recipe(tmp_path, tmp_path / "d")), f"out_dir={out}", *TINY]) == 2, case
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in err, err
    assert "internal error" not in err
    assert not out.exists() or not any(out.rglob("*.json"))


def test_on_bad_image_skip_trains_without_it(tmp_path):
    name = _undecodable(tmp_path)
    out = tmp_path / "run"
    assert train_main([str(_recipe(tmp_path, tmp_path / "d")), f"out_dir={out}", "data.on_bad_image=skip", *TINY]) == 0
    assert name in (out / "skipped.csv").read_text()


def test_hub_is_read_only_when_asked_and_offline_says_so(tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: nothing reaches the network
    recipe = _recipe(tmp_path, "hf://datasets/nobody/nothing")
    assert train_main([str(recipe), f"out_dir={tmp_path / 'run'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "error: hf://datasets/nobody/nothing: datasets could not read it" in err and "HF_HUB_OFFLINE" in err


def test_without_datasets_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys
    from mlabel.data import hf
    hf._load_splits.cache_clear()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    (tmp_path / "d").mkdir()
    assert train_main([str(_recipe(tmp_path, tmp_path / "d")), f"out_dir={tmp_path / 'run'}", *TINY]) == 2
    assert "pip install 'mlabel[hf]'" in capsys.readouterr().err
