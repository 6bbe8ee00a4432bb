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
    ("thresholds.bins=0", _train_case("thresholds.bins=0"), "thresholds.bins must lie in [2, 65536]"),
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


# issue 27, section 3 (tune, evaluate, report, predictions/, --from-json, the data chart): every
# case ends in one error line naming the file or key, and the run it was given stays byte-identical.
def _val_csv(tmp: Path, scene_csv: Path, edit, name: str = "val.csv") -> Path:
    """A copy of val.csv (absolute image paths) whose target rows ``edit(rows)`` changes."""
    def write(rows, path):
        edit(rows)
        _write_rows(path, rows)
    return _copy_csv(scene_csv, tmp, "val.csv", write).rename(tmp / name)


def _targets_to(value: str, columns=None):
    def edit(rows):
        for row in rows[1:]:
            for j in columns or range(1, len(row)):
                row[j] = value
    return edit


def _tune_on(value):
    def build(tmp, scene_csv, run):
        return tune_main, [str(run), f"data.val={_val_csv(tmp, scene_csv, _targets_to(value))}", "--quiet"], run, "data.val="
    return build


def _from_json(text):
    def build(tmp, scene_csv, run):
        path = tmp / "thresholds.json"
        path.write_text(text)
        return tune_main, [str(run), "--from-json", str(path), "--quiet"], run, str(path)
    return build


def _run_copy(tmp: Path, run: Path) -> Path:
    return Path(shutil.copytree(run, tmp / "copy"))


def _truncated_predictions(main_name):
    def build(tmp, scene_csv, run):
        from mlabel.report import main as report_main
        copy = _run_copy(tmp, run)
        path = copy / "predictions" / "val.npz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        chosen = tmp / "t.json"
        chosen.write_text('{"thresholds": {"circle": 0.25}}')
        argv = {"report": (report_main, [str(copy), "--quiet"]),
                "tune": (tune_main, [str(copy), "--from-json", str(chosen), "--quiet"])}[main_name]
        return (*argv, copy, str(path))
    return build


def _renamed_labels(tmp, scene_csv, run):
    from mlabel.report import main as report_main
    copy = _run_copy(tmp, run)
    meta = json.loads((copy / "model" / "mlabel.json").read_text())
    meta["labels"] = [f"x{j}" for j in range(len(meta["labels"]))]
    (copy / "model" / "mlabel.json").write_text(json.dumps(meta))
    return report_main, [str(copy), "--quiet"], copy, "'x0'"


def _damaged_history(main_name, damage):
    def build(tmp, scene_csv, run):
        from mlabel.report import main as report_main
        copy = _run_copy(tmp, run)
        path = copy / "history.csv"
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], damage(lines[1]), *lines[2:]]) + "\n")
        main = {"report": report_main, "evaluate": evaluate_main, "tune": tune_main}[main_name]
        split = ["--split", "val"] if main_name == "evaluate" else []  # the fixture's run has no test split
        return main, [str(copy), *split, "--quiet"], copy, f"{path}:2:"
    return build


def _bad_yaml_config(tmp, scene_csv, run):
    copy = _run_copy(tmp, run)
    path = copy / "config.yaml"
    path.write_text(path.read_text().replace("data:", "data:\n  root: [unclosed\n", 1))
    return evaluate_main, [str(copy), "--quiet"], copy, f"{path}:"


HUGE = "1" + "0" * 5000
RUN_CASES = [
    ("tune on a val without positives", _tune_on("0"), "has no label with both a positive and a negative known target"),
    ("tune on a val of unknown targets", _tune_on("-1"), "has no label with both a positive and a negative known target"),
    ("--from-json huge integer", _from_json('{"thresholds": {"circle": %s}}' % HUGE), "the threshold of 'circle' is inf"),
    ("--from-json huge exponent", _from_json('{"thresholds": {"circle": 1e999}}'), "the threshold of 'circle' is inf"),
    ("--from-json deep nesting", _from_json('{"thresholds": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nests too deeply"),
    ("--from-json duplicate label", _from_json('{"thresholds": {"circle": 0.1, "square": 0.2, "circle": 0.9}}'),
     "the key 'circle' appears twice"),
    ("--from-json duplicate thresholds", _from_json('{"thresholds": {"circle": 0.1}, "thresholds": {"star": 0.2}}'),
     "the key 'thresholds' appears twice"),
    ("--from-json threshold as text", _from_json('{"thresholds": {"circle": "0.5"}}'), "the threshold of 'circle' is '0.5'"),
    ("--from-json threshold null", _from_json('{"thresholds": {"circle": null}}'), "the threshold of 'circle' is null"),
    ("--from-json threshold as a list", _from_json('{"thresholds": {"circle": [0.5]}}'), "the threshold of 'circle' is a list"),
    ("--from-json threshold as an object", _from_json('{"thresholds": {"circle": {"value": 0.5}}}'),
     "the threshold of 'circle' is an object"),
    ("--from-json thresholds as a list", _from_json('{"thresholds": [0.5, 0.5]}'), 'needs a non-empty "thresholds" object'),
    ("--from-json huge label name", _from_json('{"thresholds": {"%s": 0.5}}' % ("c" * 100_000)), "is not one of the model's"),
    ("report with a truncated predictions file", _truncated_predictions("report"), "is not a readable predictions file"),
    ("tune --from-json with a truncated predictions file", _truncated_predictions("tune"),
     "is not a readable predictions file"),
    ("labels renamed in mlabel.json before report", _renamed_labels, "the data's labels do not match the model's"),
    ("report with a word in history.csv", _damaged_history("report", lambda line: "x" + line), "is not a number"),
    ("evaluate with a word in history.csv", _damaged_history("evaluate", lambda line: "x" + line), "is not a number"),
    ("tune with a short row in history.csv", _damaged_history("tune", lambda line: line.split(",")[0]),
     "columns in the header, another number here"),
    ("evaluate with a config.yaml that is not YAML", _bad_yaml_config, "is not valid YAML"),
]


@pytest.mark.parametrize("build,fragment", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_a_hostile_run_command_exits_2_naming_the_file_and_keeps_the_run(build, fragment, finished, scene_csv,
                                                                         tmp_path, capsys):
    before = _snapshot(finished)
    main, argv, kept, named = build(tmp_path, scene_csv, finished)
    kept_before = _snapshot(kept)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and fragment in errors[0] and named in errors[0], err
    assert "internal error" not in err and "Traceback" not in err and len(errors[0]) < 700
    assert _snapshot(kept) == kept_before and _snapshot(finished) == before


def _tuned(run: Path) -> tuple[list, list, list]:
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    calibration = meta["calibration"] or {"scale": [1.0] * len(meta["labels"]), "bias": [0.0] * len(meta["labels"])}
    return meta["thresholds"], calibration["scale"], calibration["bias"]


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_tune_keeps_the_previous_decision_of_a_label_val_has_no_positive_for(finished, scene_csv, tmp_path, streaming):
    """circle has no positive in the edited val: it keeps its threshold and calibration, while every
    other label is tuned exactly as on the full val (labels are tuned independently)."""
    partial = _val_csv(tmp_path, scene_csv, _targets_to("0", [1]), "partial.csv")
    full = _val_csv(tmp_path, scene_csv, lambda rows: None, "full.csv")
    runs = {}
    for name, val in (("partial", partial), ("full", full)):
        runs[name] = Path(shutil.copytree(finished, tmp_path / name))
        assert tune_main([str(runs[name]), f"data.val={val}", f"thresholds.streaming={streaming}",
                          "--metric", "fbeta", "--beta", "0.5", "--quiet"]) == 0
    old, got, ref = _tuned(finished), _tuned(runs["partial"]), _tuned(runs["full"])
    for k in range(3):  # thresholds, scales, biases
        assert got[k][0] == old[k][0]  # circle: as before
        assert got[k][1:] == ref[k][1:]  # the others: as tuned on the full val
    assert got[0][1:] != old[0][1:]  # the tuning did change something (fbeta 0.5, not the run's f1)
    record = json.loads((runs["partial"] / "tune.json").read_text())
    assert "no positive in val" in record["threshold_policy"]["per_label"]["circle"]["kept"]
    assert record["val_after"]["per_label"]["circle"]["ap"] is None  # no positive: no AP, as mlabel.metrics says
    assert record["val_after"]["mAP"] == pytest.approx(np.mean(
        [row["ap"] for name, row in record["val_after"]["per_label"].items() if name != "circle"]))
    page = (runs["partial"] / "report" / "report.html").read_text()
    import re
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', page).group(1))
    assert data["thresholds"] == got[0]


def test_train_and_evaluate_finish_on_splits_without_positives(finished, scene_csv, tmp_path, capsys):
    import mlabel
    negative = _val_csv(tmp_path, scene_csv, _targets_to("0"), "negative.csv")
    run = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={run}", f"data.root={scene_csv}", *TINY[:-1],
                       f"data.val={negative}", f"data.test={negative}", "data.allow_overlap=true"]) == 0
    out = capsys.readouterr().out
    assert "val: mAP n/a" in out and "test: mAP n/a" in out
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[split]["mAP"] is None and all(r["ap"] is None for r in metrics[split]["per_label"].values())
    assert mlabel.load(run).thresholds.tolist() == [0.5] * 6  # nothing to tune on: the documented fallback
    assert (run / "report" / "report.html").is_file()

    copy = Path(shutil.copytree(finished, tmp_path / "copy"))
    assert evaluate_main([str(copy), f"data.test={negative}", "data.allow_overlap=true", "--quiet"]) == 0
    assert "test: mAP n/a" in capsys.readouterr().out
    got = json.loads((copy / "eval-test.json").read_text())["test"]
    model = mlabel.load(copy)
    images = [row[0] + ".png" for row in csv.reader(negative.open())][1:]  # the CSV leaves out the extension
    probs = model.predict_proba(images)
    reference = mlabel.evaluate_predictions(probs, np.zeros(probs.shape), model.thresholds, model.labels)
    assert got["mAP"] is None
    for name, row in reference["per_label"].items():
        assert {k: got["per_label"][name][k] for k in ("tp", "fp", "fn", "tn")} == \
            {k: row[k] for k in ("tp", "fp", "fn", "tn")}


def test_labels_renamed_in_the_model_and_its_predictions_reach_the_report(finished, tmp_path):
    """A run whose labels were renamed after training (mlabel.json and predictions/): the report is
    built, under the new names, with each column's counts from run.json."""
    import re
    from mlabel.report import main as report_main
    copy = _run_copy(tmp_path, finished)
    meta = json.loads((copy / "model" / "mlabel.json").read_text())
    old = meta["labels"]
    meta["labels"] = [f"renamed {name}" for name in old]
    (copy / "model" / "mlabel.json").write_text(json.dumps(meta))
    saved = dict(np.load(copy / "predictions" / "val.npz"))
    saved["labels"] = np.asarray(meta["labels"])
    np.savez_compressed(copy / "predictions" / "val.npz", **saved)
    assert report_main([str(copy), "--quiet"]) == 0
    page = (copy / "report" / "report.html").read_text()
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', page).group(1))
    assert data["labels"] == meta["labels"]


def test_a_tex_like_label_name_is_drawn_as_text_in_the_data_chart(tmp_path, scene_csv, monkeypatch):
    import matplotlib
    from mlabel.data.__main__ import main as data_main
    monkeypatch.setitem(matplotlib.rcParams, "text.parse_math", True)  # matplotlib's default, as in a fresh process
    for name in ("train.csv", "val.csv"):
        rows = list(csv.reader((scene_csv / name).open()))
        rows[0][1] = r"$\foo{$"
        (tmp_path / "data").mkdir(exist_ok=True)
        _write_rows(tmp_path / "data" / name, [[str(scene_csv / r[0]) if i else r[0], *r[1:]] for i, r in enumerate(rows)])
    out = tmp_path / "summary"  # outside the data folder, which mlabel never writes into
    assert data_main(["quickstart", f"data.root={tmp_path / 'data'}", "data.generate=null", "data.val=val.csv",
                      "data.test=null", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["labels"][0] == r"$\foo{$"
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
