"""End to end: python -m mlabel.train on generated images writes a complete run directory."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import average_precision_score, f1_score

import mlabel
from mlabel.data import ImageDataset, build_transform, make_loader
from mlabel.data.tables import CsvColumns, read_csv_table
from mlabel.train import main

CONTRACT_KEYS = {"mAP", "macro_f1", "micro_f1", "samples_f1", "hamming_loss", "subset_accuracy",
                 "macro_auroc", "per_label", "macro_f1@0.5", "micro_f1@0.5", "samples_f1@0.5"}


def _train(tmp_path, extra):
    out = tmp_path / "run"
    code = main(["quickstart", f"out_dir={out}", "model.backbone=test_resnet", "model.pretrained=false",
                 "data.generate=null", "data.image_size=32", "data.batch_size=16", "data.num_workers=0",
                 "train.epochs=1", "train.channels_last=false", "--quiet", *extra])
    assert code == 0
    return out


def test_one_epoch_writes_complete_run_directory(tmp_path, scene_csv):
    out = _train(tmp_path, [f"data.root={scene_csv}", "data.val=val.csv", "data.test=val.csv",
                               "data.allow_overlap=true"])
    for name in ["config.yaml", "metrics.json", "history.csv", "run.json", "checkpoint.pt",
                 "model/model.safetensors", "model/mlabel.json", "report/report.html",
                 "report/pr_curves.png", "report/f1_vs_threshold.png", "report/training_curves.png",
                 "report/label_frequency.png", "report/calibration.png"]:
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["backbone"] == "test_resnet" and config["train"]["epochs"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    for split in metrics.values():
        assert CONTRACT_KEYS <= set(split)
        assert set(split["per_label"]["circle"]) >= {"ap", "f1", "precision", "recall", "threshold", "support"}
    history = list(csv.DictReader((out / "history.csv").open()))
    assert len(history) == 1 and {"train_loss", "val_mAP", "lr", "epoch_time_s"} <= set(history[0])
    run = json.loads((out / "run.json").read_text())
    assert len(run["pos_weight"]) == 6 and all(0 < w <= 10 for w in run["pos_weight"].values())

    # the saved model reproduces the reported figures, checked against scikit-learn
    model = mlabel.load(out)
    meta = json.loads((out / "model" / "mlabel.json").read_text())
    thresholds = np.array(meta["thresholds"])
    table = read_csv_table(scene_csv / "val.csv", scene_csv, labels=model.labels)
    loader = make_loader(ImageDataset(table, build_transform(model.preprocessing, False)), 16, train=False)
    probs = torch.cat([model.predict_proba(x) for x, _ in loader]).numpy()
    with torch.no_grad():  # AP from the logits: the calibrated float32 probabilities may tie
        logits = torch.cat([model(x) for x, _ in loader]).numpy()
    targets = table.targets
    keep = targets.sum(0) > 0
    assert metrics["val"]["mAP"] == pytest.approx(
        average_precision_score(targets[:, keep], logits[:, keep], average="macro"), abs=1e-5)
    assert metrics["val"]["macro_f1"] == pytest.approx(
        f1_score(targets, probs >= thresholds, average="macro", zero_division=0), abs=1e-6)
    assert [metrics["val"]["per_label"][n]["threshold"] for n in model.labels] == pytest.approx(thresholds)


def test_binary_folder_run_has_one_output_and_accuracy(tmp_path, folder_dataset):
    out = _train(tmp_path, ["data.format=folder", f"data.root={folder_dataset}", "data.train=train",
                            "data.val=null", "data.test=test", "data.val_fraction=0.25", "task=binary",
                            "train.lr=0.01"])
    model = mlabel.load(out)
    assert model.labels == ["dog"] and model.head.out_features == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "accuracy@0.5"} <= set(metrics["test"])
    assert metrics["test"]["n_images"] == 16


def test_user_mistakes_exit_2_with_message_and_no_traceback(tmp_path, capsys):
    assert main(["quickstart", "train.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "epochs" in err and "Traceback" not in err
    assert main(["quickstart", f"data.root={tmp_path}", "data.generate=null", f"out_dir={tmp_path}/r"]) == 2
    assert "train.csv not found" in capsys.readouterr().err


def test_metrics_carry_calibration_and_cross_fitted_f1(tmp_path, scene_csv):
    out = _train(tmp_path, [f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
                            "thresholds.cross_fit=3"])
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert val["calibration"] == "platt"
    assert {"macro_ece", "macro_ece_uncalibrated", "weighted_f1", "CF1", "OF1", "coverage_error"} <= set(val)
    assert val["cross_fit"]["folds"] == 3 and set(val["cross_fit"]["per_label_f1"]) == set(val["per_label"])
    assert "ece_uncalibrated" in val["per_label"]["circle"]
    assert mlabel.load(out).calibration == "platt"


def test_tune_and_evaluate_commands_rework_a_saved_model(tmp_path, scene_csv, capsys):
    from mlabel.evaluate import main as evaluate_main
    from mlabel.tune import main as tune_main
    out = _train(tmp_path, [f"data.root={scene_csv}", "data.val=val.csv", "data.test=val.csv",
                               "data.allow_overlap=true"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert evaluate_main([str(out), "--split", "test", "--quiet"]) == 0
    again = json.loads((out / "eval-test.json").read_text())["test"]
    for key in ("mAP", "macro_f1", "micro_f1", "macro_ece"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-6), key

    assert tune_main([str(out / "model"), "--metric", "fbeta", "--beta", "2", "--calibration", "none",
                      "--policy", "argmax", "--quiet"]) == 0
    assert "stored in" in capsys.readouterr().out
    model = mlabel.load(out)
    assert model.calibration is None
    meta = json.loads((out / "model" / "mlabel.json").read_text())
    assert meta["threshold_metric"] == "fbeta" and meta["mlabel_version"]  # other keys kept
    table = read_csv_table(scene_csv / "val.csv", scene_csv, labels=model.labels)
    loader = make_loader(ImageDataset(table, build_transform(model.preprocessing, False)), 16, train=False)
    probs = torch.cat([model.predict_proba(x) for x, _ in loader])
    expected = mlabel.tune_thresholds(probs, torch.from_numpy(table.targets), "fbeta", beta=2.0)
    assert torch.equal(model.predict(torch.cat([x for x, _ in loader])), probs >= expected)
    assert (out / "tune.json").is_file()

    assert evaluate_main([str(tmp_path / "nowhere")]) == 2
    assert "neither a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["loss.name=bce_prob"], ["loss.name=focal"], ["loss.name=asl"],
                                   ["loss.name=hinge"], ["loss.name=bce", "loss.label_smoothing=0.1"],
                                   ["model.head=mlp"], ["model.head=csra"]])
def test_every_loss_and_head_trains_through_the_command(tmp_path, scene_csv, extra):
    out = _train(tmp_path, [f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
                            "thresholds.cross_fit=0", *extra])
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    assert 0 <= metrics["mAP"] <= 1
    history = list(csv.DictReader((out / "history.csv").open()))
    assert np.isfinite(float(history[0]["train_loss"]))
    config = yaml.safe_load((out / "config.yaml").read_text())
    for item in extra:
        section, value = item.split("=")
        key, sub = section.split(".")
        assert str(config[key][sub]) == value


def test_partial_labels_train_end_to_end_with_a_wholly_unknown_val_column(tmp_path, scene_csv):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rows = list(csv.reader((scene_csv / f"{split}.csv").open()))
        star = rows[0].index("star")
        for row in rows[1:]:
            for j in range(1, len(row)):
                if split == "val" and j == star:
                    row[j] = ""  # every val target of this label unknown
                elif rng.random() < 0.2:
                    row[j] = "-1"
        with (tmp_path / f"{split}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    out = _train(tmp_path, [f"data.root={scene_csv}", f"data.train={tmp_path / 'train.csv'}",
                            f"data.val={tmp_path / 'val.csv'}", "data.test=null"])
    val = json.loads((out / "metrics.json").read_text())["val"]
    star = val["per_label"]["star"]
    assert star["ap"] is None and star["auroc"] is None and star["support"] == 0 and star["ece"] is None
    assert star["threshold"] == 0.5  # the documented fallback
    assert np.isfinite(val["mAP"]) and np.isfinite(val["macro_f1"])
    model = mlabel.load(out)
    assert model.calibration_scale[model.labels.index("star")].item() == 1.0  # nothing to fit: identity


def test_multitask_regression_head_trains_reports_and_predicts(tmp_path, scene_csv):
    from PIL import Image
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    from mlabel.predict import main as predict_main
    for split in ("train", "val"):
        rows = list(csv.reader((scene_csv / f"{split}.csv").open()))
        rows[0].append("brightness")
        for k, row in enumerate(rows[1:]):
            pixels = np.asarray(Image.open(scene_csv / f"{row[0]}.png").convert("RGB"), dtype=np.float64)
            row.append("" if k == 3 else f"{100 * pixels.mean() / 255:.4f}")  # one value missing
        with (tmp_path / f"{split}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    out = _train(tmp_path, [f"data.root={scene_csv}", f"data.train={tmp_path / 'train.csv'}",
                            f"data.val={tmp_path / 'val.csv'}", "data.test=null",
                            "data.regression_columns=[brightness]", "loss.regression=l1"])
    val = json.loads((out / "metrics.json").read_text())["val"]
    assert "brightness" not in val["per_label"] and val["regression"]["brightness"]["n"] == 23
    model = mlabel.load(out)
    assert model.regression_names == ["brightness"] and model.labels[0] == "circle"
    table = read_csv_table(tmp_path / "val.csv", scene_csv, labels=model.labels,
                           columns=CsvColumns(regression=["brightness"]))
    predicted = model.predict_regression(table.paths).numpy()[:, 0]
    known = ~np.isnan(table.regression[:, 0])
    assert val["regression"]["brightness"]["mse"] == pytest.approx(
        mean_squared_error(table.regression[known, 0], predicted[known]), rel=1e-4)
    assert val["regression"]["brightness"]["mae"] == pytest.approx(
        mean_absolute_error(table.regression[known, 0], predicted[known]), rel=1e-4)
    preds = tmp_path / "preds.csv"
    assert predict_main([str(out), *table.paths[:3], "--out", str(preds), "--quiet"]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert [float(r["brightness"]) for r in rows] == pytest.approx(predicted[:3], rel=1e-4)


def test_fit_trains_from_python_and_returns_run_metrics_and_model(tmp_path, scene_csv):
    result = mlabel.fit("quickstart", ["model.backbone=test_resnet", "model.pretrained=false", "data.generate=null",
                                       f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
                                       "data.num_workers=0", "train.channels_last=false"],
                        quiet=True, out_dir=str(tmp_path / "run"), train={"epochs": 1},
                        data={"image_size": 32, "batch_size": 8}, thresholds={"cross_fit": 0})
    assert result.run_dir == tmp_path / "run"
    assert result.metrics["val"]["mAP"] == json.loads((result.run_dir / "metrics.json").read_text())["val"]["mAP"]
    assert result.model.labels == list(result.metrics["val"]["per_label"])
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["data"]["image_size"] == 32
