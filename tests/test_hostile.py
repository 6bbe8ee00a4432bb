"""The hostile-input table (issue 15): every case ends with exit 2 and one ``error:`` line naming
the file or key (or with its documented handling), never a traceback, and the earlier run's files
stay byte-identical."""
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlabel.evaluate import main as evaluate_main
from mlabel.predict import main as predict_main
from mlabel.train import main as train_main
from mlabel.tune import main as tune_main

TINY = ["model.backbone=test_resnet", "model.pretrained=false", "data.generate=null", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "train.channels_last=false", "data.val=val.csv",
        "data.test=null", "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, scene_csv) -> Path:
    """A finished run that no case may change."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert train_main(["quickstart", f"out_dir={run}", f"data.root={scene_csv}", *TINY]) == 0
    return run


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_csv(scene_csv: Path, folder: Path, name: str, edit) -> Path:
    rows = list(csv.reader((scene_csv / name).open()))
    rows = [[str(scene_csv / r[0]) if i else r[0], *r[1:]] for i, r in enumerate(rows)]
    path = folder / name
    edit(rows, path)
    return path


def _write_rows(path: Path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows(rows)


# Each case: (id, build(tmp, scene_csv, run) -> (main, argv), fragment of the error line)
def _train_case(*extra, root=None):
    def build(tmp, scene_csv, run):
        return train_main, ["quickstart", f"out_dir={run}", "overwrite=true", f"data.root={root(tmp, scene_csv) if root else scene_csv}",
                            *TINY, *extra]
    return build


def _latin1(tmp, scene_csv):
    def edit(rows, path):
        rows[0][1] = "círculo"
        _write_rows(path, rows, encoding="latin-1")
    _copy_csv(scene_csv, tmp, "train.csv", edit)
    shutil.copy(scene_csv / "val.csv", tmp / "val.csv")
    (tmp / "images").symlink_to(scene_csv / "images")
    return tmp


def _long_field(tmp, scene_csv):
    def edit(rows, path):
        rows[3][1] = "1" * 200_000
        _write_rows(path, rows)
    _copy_csv(scene_csv, tmp, "train.csv", edit)
    shutil.copy(scene_csv / "val.csv", tmp / "val.csv")
    return tmp


def _nested_jsonl(tmp, scene_csv):
    (tmp / "train.jsonl").write_text('{"image": "a.png", "labels": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return tmp


def _coco(kind):
    def root(tmp, scene_csv):
        images = [{"id": 1, "file_name": str(scene_csv / "images/train0.png")},
                  {"id": 2 if kind != "image" else 1, "file_name": str(scene_csv / "images/train1.png")}]
        categories = [{"id": 1, "name": "cat"}, {"id": 2 if kind != "category" else 1, "name": "dog"}]
        (tmp / "train.json").write_text(json.dumps({"images": images, "categories": categories,
                                                    "annotations": [{"image_id": 1, "category_id": 1}]}))
        return tmp
    return root


def _regression_inf(tmp, scene_csv):
    def edit(rows, path):
        rows[0].append("size")
        for i, row in enumerate(rows[1:], 1):
            row.append("inf" if i == 5 else "1.5")
        _write_rows(path, rows)
    _copy_csv(scene_csv, tmp, "train.csv", edit)
    shutil.copy(scene_csv / "val.csv", tmp / "val.csv")
    return tmp


def _user_folder(tmp, scene_csv):
    (tmp / "my-photo.jpg").write_bytes(b"mine")
    return tmp


def _corrupt_checkpoint(tmp, scene_csv, run):
    target = tmp / "interrupted"
    target.mkdir()
    (target / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    return train_main, ["quickstart", f"out_dir={target}", "resume=true", f"data.root={scene_csv}", *TINY]


def _out_dir_file(tmp, scene_csv, run):
    (tmp / "afile").write_text("x")
    return train_main, ["quickstart", f"out_dir={tmp / 'afile'}", f"data.root={scene_csv}", *TINY]


def _damaged_model(field, value):
    def build(tmp, scene_csv, run):
        copy = tmp / "copy"
        shutil.copytree(run, copy)
        meta = json.loads((copy / "model" / "mlabel.json").read_text())
        meta[field] = value
        (copy / "model" / "mlabel.json").write_text(json.dumps(meta))
        return predict_main, [str(copy), str(scene_csv / "images" / "val0.png"), "--out", str(tmp / "p.csv"), "--quiet"]
    return build


def _predict(*extra, inputs=None):
    def build(tmp, scene_csv, run):
        given = inputs(tmp, scene_csv) if inputs else [str(scene_csv / "images" / "val0.png")]
        return predict_main, [str(run), *given, "--quiet", *extra]
    return build


def _empty_folder(tmp, scene_csv):
    (tmp / "empty").mkdir()
    return [str(tmp / "empty")]


CASES = [
    ("unknown backbone", _train_case("model.backbone=resnet5O"), "did you mean 'resnet50'"),
    ("missing pretrained file", _train_case("model.pretrained=/no/such/weights.pth"), "neither a weights file"),
    ("out_dir is a file", _out_dir_file, "is a file; give a folder path"),
    ("duplicate data.labels", _train_case("data.labels=[circle,circle]"), "more than once"),
    ("latin-1 csv", _train_case(root=_latin1), "train.csv:1: not UTF-8 text"),
    ("csv field over 131072 chars", _train_case(root=_long_field), "train.csv:4: column 'circle' has '1111"),
    ("deeply nested jsonl", _train_case("data.format=jsonl", "data.train=train.jsonl", root=_nested_jsonl),
     "train.jsonl:1: the JSON nests too deeply"),
    ("coco duplicate image id", _train_case("data.format=coco", "data.train=train.json", root=_coco("image")),
     "train.json: image id 1 appears twice"),
    ("coco duplicate category id", _train_case("data.format=coco", "data.train=train.json",
                                               root=_coco("category")), "train.json: category id 1 appears twice ('cat' and 'dog')"),
    ("regression inf", _train_case("data.regression_columns=[size]", root=_regression_inf),
     "regression column 'size' has 'inf'"),
    ("corrupt checkpoint with resume", _corrupt_checkpoint, "not a readable mlabel checkpoint"),
    ("val is the train file", _train_case("data.val=train.csv"), "data.val and data.train are the same file"),
    ("generated data into the user's folder", _train_case("data.generate=scenes", root=_user_folder),
     "set data.generate=null"),
    ("one-image val with cross-fitting", _train_case("thresholds.cross_fit=5", "data.val_fraction=0.02",
                                                     "data.val=null"), "thresholds.cross_fit=5 folds need"),
    ("thresholds.bins=0", _train_case("thresholds.bins=0"), "thresholds.bins must lie in [2, inf)"),
    ("min_recall=5", _train_case("thresholds.min_recall=5"), "thresholds.min_recall must lie in [0, 1]"),
    ("negative pos_weight", _train_case("loss.pos_weight=[-1,1,1,1,1,1]"), "loss.pos_weight values"),
    ("thresholds NaN in mlabel.json", _damaged_model("thresholds", [float("nan")] * 6), "thresholds holds NaN"),
    ("labels vs weights", _damaged_model("labels", ["a", "b"]), "thresholds has 6 values for 2 labels"),
    ("hub backbone in mlabel.json", _damaged_model("backbone", "hf-hub:timm/resnet18.a1_in1k"), "never downloads"),
    ("predict on nothing", _predict(inputs=_empty_folder), "no images found"),
    ("predict --out under a file", _predict("--out", "/etc/hostname/preds.csv"), "is a file, not a folder"),
    ("predict --out with another suffix", _predict("--out", "preds.txt"), "give a .csv, .jsonl or .json"),
]
if not torch.cuda.is_available():
    CASES.append(("device=cuda without a GPU", _train_case("train.device=cuda"), "has no usable CUDA GPU"))


# issue 27: label names a model could not be loaded with, outputs over the model or an input,
# damaged preprocessing in mlabel.json
def _label_header(edit_header):
    def root(tmp, scene_csv):
        def edit(rows, path):
            edit_header(rows)
            _write_rows(path, rows)
        _copy_csv(scene_csv, tmp, "train.csv", edit)
        shutil.copy(scene_csv / "val.csv", tmp / "val.csv")
        (tmp / "images").symlink_to(scene_csv / "images")
        return tmp
    return root


def _trailing_comma(rows):
    for row in rows:  # as a spreadsheet writes it: every row ends with a comma
        row.append("")


def _empty_cell(rows):
    rows[0][2] = ""


def _coco_empty_name(tmp, scene_csv):
    images = [{"id": i, "file_name": str(scene_csv / f"images/train{i}.png")} for i in range(4)]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": ""}]
    (tmp / "train.json").write_text(json.dumps({"images": images, "categories": categories, "annotations": [
        {"image_id": 0, "category_id": 1}, {"image_id": 1, "category_id": 2}]}))
    return tmp


def _out_over(main_name, relative, suffix_args=()):
    """A command whose --out is a file of the finished run's model directory."""
    def build(tmp, scene_csv, run):
        from mlabel.export import main as export_main
        image = str(scene_csv / "images" / "val0.png")
        argv = {"predict": [str(run), image], "evaluate": [str(run), "--split", "val"], "export": [str(run)]}
        main = {"predict": predict_main, "evaluate": evaluate_main, "export": export_main}[main_name]
        return main, [*argv[main_name], "--out", str(run / relative), *suffix_args]
    return build


def _out_symlink(tmp, scene_csv, run):
    (tmp / "p.csv").symlink_to(run / "model" / "mlabel.json")
    return predict_main, [str(run), str(scene_csv / "images" / "val0.png"), "--out", str(tmp / "p.csv"), "--quiet"]


def _preprocessing(**changes):
    def build(tmp, scene_csv, run):
        prep = json.loads((run / "model" / "mlabel.json").read_text())["preprocessing"]
        prep.update(changes)
        return _damaged_model("preprocessing", {k: v for k, v in prep.items() if v is not None})(tmp, scene_csv, run)
    return build


CASES += [
    ("csv header ending in a comma", _train_case(root=_label_header(_trailing_comma)),
     "train.csv: header column 8 has an empty label name"),
    ("csv header with an empty cell", _train_case(root=_label_header(_empty_cell)),
     "train.csv: header column 3 has an empty label name"),
    ("coco category without a name", _train_case("data.format=coco", "data.train=train.json", "data.val=null",
                                                 root=_coco_empty_name), "train.json: label 2 has an empty label name"),
    ("predict --out the model's mlabel.json", _out_over("predict", "model/mlabel.json"), "is a file of the model"),
    ("evaluate --out the model's mlabel.json", _out_over("evaluate", "model/mlabel.json", ["--quiet"]),
     "is a file of the model"),
    ("export --out the model's weights", _out_over("export", "model/model.safetensors"), "is a file of the model"),
    ("predict --out a link to mlabel.json", _out_symlink, "is a file of the model"),
    ("image_size 0 in mlabel.json", _preprocessing(image_size=0), "preprocessing.image_size must be an integer in [8, 4096]"),
    ("image_size -1 in mlabel.json", _preprocessing(image_size=-1), "preprocessing.image_size must be an integer in"),
    ("image_size 60000 in mlabel.json", _preprocessing(image_size=60000), "preprocessing.image_size must be an integer"),
    ("image_size 32.5 in mlabel.json", _preprocessing(image_size=32.5), "preprocessing.image_size must be an integer"),
    ("crop_pct 0 in mlabel.json", _preprocessing(crop_pct=0), "preprocessing.crop_pct must be a number in [0.5, 2]"),
    ("std 0 in mlabel.json", _preprocessing(std=[0, 0, 0]), "preprocessing.std must be 3 numbers in [0.001, 10]"),
    ("mean of 2 values in mlabel.json", _preprocessing(mean=[0.5, 0.5]), "preprocessing.mean must be 3 numbers in [0, 1]"),
    ("resize 'zoom' in mlabel.json", _preprocessing(resize="zoom"), "preprocessing.resize must be one of"),
    ("interpolation as a list in mlabel.json", _preprocessing(interpolation=["x"]), "preprocessing.interpolation must be one of"),
    ("no preprocessing in mlabel.json", _damaged_model("preprocessing", "none"), "preprocessing must be an object"),
]


@pytest.mark.parametrize("build,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_exits_2_with_one_line_and_keeps_the_earlier_run(build, fragment, finished, scene_csv,
                                                                        tmp_path, capsys):
    before = _snapshot(finished)
    main, argv = build(tmp_path, scene_csv, finished)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and fragment in errors[0] and len(errors[0]) < 600, err
    assert "Traceback" not in err
    assert _snapshot(finished) == before


def test_predict_refuses_to_write_over_its_input_list(finished, scene_csv, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{scene_csv / 'images' / 'val0.png'}\n")
    before = listing.read_bytes()
    assert predict_main([str(finished), str(listing), "--out", str(listing), "--quiet"]) == 2
    assert f"--out {listing} is also an input" in capsys.readouterr().err
    assert listing.read_bytes() == before
    # the list of unreadable images beside --out must not land on an input either
    (tmp_path / "p.csv.skipped.csv").write_text(f"path\n{scene_csv / 'images' / 'val0.png'}\n")
    assert predict_main([str(finished), str(tmp_path / "p.csv.skipped.csv"), "--out", str(tmp_path / "p.csv"),
                         "--quiet"]) == 2
    assert "is also an input" in capsys.readouterr().err


def test_evaluate_and_tune_refuse_bad_settings_without_writing(finished, capsys):
    before = _snapshot(finished)
    assert tune_main([str(finished), "--min-recall", "5", "--quiet"]) == 2
    assert "thresholds.min_recall must lie in [0, 1]" in capsys.readouterr().err
    assert evaluate_main([str(finished), "--out", "/etc/hostname/x.json", "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _snapshot(finished) == before


def test_predict_threshold_out_of_range_is_refused(finished, scene_csv, capsys):
    with pytest.raises(SystemExit) as stop:
        predict_main([str(finished), str(scene_csv / "images" / "val0.png"), "--threshold", "2"])
    assert stop.value.code == 2 and "--threshold is a probability in [0, 1], got 2.0" in capsys.readouterr().err


def test_predict_keeps_going_past_a_fifo_and_a_thin_strip(finished, scene_csv, tmp_path, capsys):
    """Per-image problems are per-image: the FIFO does not block, the 20,000,000 x 1 PNG (19 KB) is
    refused from its header, and the good image is predicted; a stale skipped list is replaced."""
    os.mkfifo(tmp_path / "pipe.png")
    Image.fromarray(np.zeros((1, 20_000_000), np.uint8)).save(tmp_path / "strip.png", optimize=True)
    good = str(scene_csv / "images" / "val0.png")
    out = tmp_path / "preds.csv"
    rc = predict_main([str(finished), str(tmp_path / "pipe.png"), str(tmp_path / "strip.png"), good,
                       "--out", str(out), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [good]
    skipped = {r["path"]: r["error"] for r in csv.DictReader((tmp_path / "preds.csv.skipped.csv").open())}
    assert "not a regular file" in skipped[str(tmp_path / "pipe.png")]
    assert "100:1 aspect" in skipped[str(tmp_path / "strip.png")]
    assert predict_main([str(finished), good, "--out", str(out), "--quiet"]) == 0
    assert not (tmp_path / "preds.csv.skipped.csv").exists()  # the clean run leaves no stale list


def test_predict_topk_applies_the_tuned_thresholds_unless_topk_only(finished, scene_csv, tmp_path):
    import mlabel
    model = mlabel.load(finished)
    images = [str(scene_csv / "images" / f"val{i}.png") for i in range(8)]
    probs = model.predict_proba(images).numpy()
    out = tmp_path / "p.jsonl"
    assert predict_main([str(finished), *images, "--out", str(out), "--topk", "2", "--quiet"]) == 0
    thresholded = [json.loads(line)["labels"] for line in out.read_text().splitlines()]
    assert predict_main([str(finished), *images, "--out", str(out), "--topk", "2", "--topk-only", "--quiet"]) == 0
    top_only = [json.loads(line)["labels"] for line in out.read_text().splitlines()]
    th = model.thresholds.numpy()
    for p, got, top in zip(probs, thresholded, top_only):
        order = [model.labels[j] for j in np.argsort(-p, kind="stable")[:2]]
        assert set(top) == set(order)
        assert set(got) == {name for name in order if p[model.labels.index(name)] >= th[model.labels.index(name)]}


def test_predict_json_output_and_label_names_that_clash_with_csv(finished, scene_csv, tmp_path):
    good = str(scene_csv / "images" / "val0.png")
    assert predict_main([str(finished), good, "--out", str(tmp_path / "p.json"), "--quiet"]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert isinstance(records, list) and records[0]["path"] == good
    from mlabel.predict import _check_output
    with pytest.raises(ValueError, match=r"label names \['labels', 'a;b'\] clash"):
        _check_output(tmp_path / "p.csv", ["labels", "a;b", "c"], [])
    _check_output(tmp_path / "p.jsonl", ["labels", "a;b", "c"], [])  # JSON keeps any name


def test_a_tex_like_label_name_reaches_the_report(tmp_path, scene_csv):
    rows = list(csv.reader((scene_csv / "train.csv").open()))
    for name in ("train.csv", "val.csv"):
        rows = list(csv.reader((scene_csv / name).open()))
        rows[0][1] = r"$\foo{$"
        _write_rows(tmp_path / name, [[str(scene_csv / r[0]) if i else r[0], *r[1:]] for i, r in enumerate(rows)])
    assert train_main(["quickstart", f"out_dir={tmp_path / 'run'}", f"data.root={tmp_path}", *TINY]) == 0
    assert r"$\foo{$" in (tmp_path / "run" / "report" / "report.html").read_text()


def test_an_empty_class_folder_is_not_a_label(tmp_path, folder_dataset, capsys):
    from mlabel.data.tables import read_folder_table
    shutil.copytree(folder_dataset / "train", tmp_path / "train")
    (tmp_path / "train" / "bird").mkdir()
    table = read_folder_table(tmp_path / "train")
    assert table.labels == ["dog"]  # still binary: cat vs dog
    assert "['bird'] hold no images" in capsys.readouterr().err


def test_an_all_unknown_label_is_left_out_of_macro_f1():
    from mlabel.metrics import evaluate_predictions
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.5).astype(np.float32)
    targets[:, 2] = -1  # no known target for the third label
    probs = rng.random((40, 3)).astype(np.float32)
    both = evaluate_predictions(probs, targets, thresholds=np.full(3, 0.5))
    two = evaluate_predictions(probs[:, :2], targets[:, :2], thresholds=np.full(2, 0.5))
    assert both["macro_f1"] == pytest.approx(two["macro_f1"]) and both["mAP"] == pytest.approx(two["mAP"])


def test_a_truncated_cache_is_built_again(tmp_path, scene_csv, capsys):
    from mlabel.data import build_splits
    from mlabel.config import load_config
    from mlabel.data.cache import DecodedCache
    cfg = load_config("quickstart", [f"data.root={scene_csv}", *TINY[:-1]])
    table = build_splits(cfg.data).val
    prep = {"image_size": 32, "resize": "squish", "interpolation": "bilinear"}
    first = DecodedCache(table, prep, tmp_path, workers=1, quiet=True)
    pixels = np.array(first.images)
    with open(first.path, "r+b") as handle:
        handle.truncate(first.path.stat().st_size // 2)
    first.path.with_suffix(".json").write_text("{not json")
    again = DecodedCache(table, prep, tmp_path, workers=1, quiet=True)
    assert again.built and np.array_equal(np.array(again.images), pixels)
    assert "incomplete or damaged; building it again" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_predict_labels_returns_names_and_scores_at_the_tuned_thresholds(finished, scene_csv):
    import mlabel
    model = mlabel.load(finished)
    images = [str(scene_csv / "images" / f"val{i}.png") for i in range(6)]
    probs, mask = model.predict_proba(images), model.predict(images)
    got = model.predict_labels(images)
    for p, m, row in zip(probs.tolist(), mask.tolist(), got):
        expected = sorted(((model.labels[j], p[j]) for j in range(len(p)) if m[j]), key=lambda x: -x[1])
        assert [name for name, _ in row] == [name for name, _ in expected]
        assert [s for _, s in row] == pytest.approx([s for _, s in expected])
    assert all(len(row) <= 1 for row in model.predict_labels(images, topk=1))


def test_generated_scenes_live_in_their_own_cache_folder(tmp_path, monkeypatch):
    from mlabel.data.synthetic import ensure_scenes, scenes_root
    from mlabel.errors import DataError
    own = scenes_root(".", str(tmp_path / "cache"))
    assert own.is_absolute() and own.parent == (tmp_path / "cache" / "generated").resolve()
    assert scenes_root(str(own), str(tmp_path / "cache")) == own  # a saved config.yaml names it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="holds other files"):
        ensure_scenes(tmp_path / "mine", splits={"train": 2})
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["holiday.jpg"]


def test_a_cache_that_does_not_fit_on_the_disk_is_refused_up_front(tmp_path, scene_csv, monkeypatch):
    import collections
    from mlabel.config import load_config
    from mlabel.data import build_splits
    from mlabel.data import cache as cache_module
    from mlabel.errors import DataError
    table = build_splits(load_config("quickstart", [f"data.root={scene_csv}", *TINY[:-1]]).data).val
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match=r"needs 0\.00 GiB, .* has 0\.00 GiB free; free space"):
        cache_module.DecodedCache(table, {"image_size": 32, "resize": "squish"}, tmp_path, workers=1, quiet=True)
    assert list(tmp_path.iterdir()) == []  # no temp file left


def test_repeated_images_across_splits_are_counted_in_a_warning(tmp_path, scene_csv, capsys):
    from mlabel.config import load_config
    from mlabel.data import build_splits
    rows = list(csv.reader((scene_csv / "val.csv").open()))
    rows = [[str(scene_csv / r[0]) if i else r[0], *r[1:]] for i, r in enumerate(rows)]
    train = list(csv.reader((scene_csv / "train.csv").open()))
    train = [[str(scene_csv / r[0]) if i else r[0], *r[1:]] for i, r in enumerate(train)]
    _write_rows(tmp_path / "train.csv", train + rows[1:4] + train[1:3])  # 3 val images, 2 repeats
    _write_rows(tmp_path / "val.csv", rows)
    build_splits(load_config("quickstart", [f"data.root={tmp_path}", *TINY[:-1]]).data)
    err = capsys.readouterr().err
    assert "warning: 2 images are listed twice in train" in err
    assert "warning: 3 images are in both train and val" in err
