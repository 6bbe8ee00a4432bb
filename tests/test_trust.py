"""Nothing lost, nothing silently wrong (issue 15): the run directory (lock, no overwrite, what is
saved), the model directory as one unit (kill -9 loop), and metadata checked on load."""
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import mlabel
from mlabel.models import create_model
from mlabel.train import main as train_main

TINY = ["model.backbone=test_resnet", "model.pretrained=false", "data.generate=null", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "train.channels_last=false", "data.val=val.csv",
        "data.test=null", "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1", "--quiet"]


def _train(out, scene_csv, *extra):
    return train_main(["quickstart", f"out_dir={out}", f"data.root={scene_csv}", *TINY, *extra])


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the run directory (15.2-15.5, 15.13)

def test_a_finished_run_is_kept_and_a_new_directory_chosen(tmp_path, scene_csv, capsys):
    out = tmp_path / "run"
    assert _train(out, scene_csv) == 0
    before = _snapshot(out)
    assert _train(out, scene_csv) == 0
    assert "this run writes to" in capsys.readouterr().out
    assert _snapshot(out) == before and (tmp_path / "run-2" / "model" / "mlabel.json").is_file()
    saved = yaml.safe_load((tmp_path / "run-2" / "config.yaml").read_text())
    assert saved["out_dir"] == str(tmp_path / "run-2")
    assert _train(out, scene_csv, "overwrite=true", "seed=5") == 0  # asked: replaced in place
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    assert not (tmp_path / "run-3").exists()


def test_a_failed_run_writes_nothing_and_leaves_the_earlier_run_byte_identical(tmp_path, scene_csv):
    out = tmp_path / "run"
    assert _train(out, scene_csv) == 0
    before = _snapshot(out)
    # overwrite asked, but the data is broken: nothing may be written before everything is checked
    assert _train(out, scene_csv, "overwrite=true", "data.val=missing.csv") == 2
    assert _train(out, scene_csv, "overwrite=true", "model.backbone=no_such_net") == 2
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_run_into_a_new_directory_leaves_no_directory(tmp_path, scene_csv):
    assert _train(tmp_path / "new", scene_csv, "data.val=missing.csv") == 2
    assert not (tmp_path / "new").exists()


def test_saved_config_neither_resumes_nor_overwrites(tmp_path, scene_csv):
    out = tmp_path / "run"
    assert _train(out, scene_csv) == 0
    assert _train(out, scene_csv, "resume=true", "overwrite=true") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["resume"] is False and saved["overwrite"] is False


def test_a_second_training_into_a_held_directory_stops_naming_the_holder(tmp_path, scene_csv, capsys):
    from mlabel.rundir import claim_run_dir
    out = tmp_path / "run"
    with claim_run_dir(out, overwrite=False, resume=False):
        assert _train(out, scene_csv) == 2
        err = capsys.readouterr().err
        assert f"out_dir {out} is in use by pid {os.getpid()}" in err and err.count("\n") == 1
    assert not out.exists()  # released, and the empty directory removed
    assert _train(out, scene_csv) == 0


def test_a_second_process_stops_and_a_killed_holder_frees_the_directory(tmp_path, scene_csv):
    """Process A trains; B, started while A holds the directory, stops at once with exit 2 naming
    A; A is killed with SIGKILL; C then trains there (the kernel released A's lock)."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mlabel.train", "quickstart", f"out_dir={out}", f"data.root={scene_csv}",
            *TINY[:-1], "--quiet"]
    holder = subprocess.Popen([*args, "train.epochs=200"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / ".lock").exists() or not (out / ".lock").read_text():
        assert time.time() < deadline and holder.poll() is None, holder.stderr.read()
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"is in use by pid {holder.pid}" in second.stderr, second.stderr
    holder.kill()
    holder.wait()
    third = subprocess.run([*args, "overwrite=true"], capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert (out / "model" / "mlabel.json").is_file() and not (tmp_path / "run-2").exists()


# A holder that has locked ``.lock`` and signs it only after ``sys.argv[2]`` seconds (``-1``: never).
LATE_SIGNER = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
if float(sys.argv[2]) >= 0:
    time.sleep(float(sys.argv[2]))
    handle.write(f"pid {os.getpid()} (mlabel tune)\\n")
    handle.flush()
time.sleep(30)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the late signer uses fcntl")
@pytest.mark.parametrize("delay", [0.4, -1])
def test_a_holder_caught_before_it_signs_is_still_named(tmp_path, delay):
    """The window between a holder's lock and its line: a second command asked in it waits for
    the line and names the holder; a lock that stays unsigned is reported as another process."""
    from mlabel.config import ConfigError
    from mlabel.rundir import hold_run_dir
    holder = subprocess.Popen([sys.executable, "-c", LATE_SIGNER, str(tmp_path / ".lock"), str(delay)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as caught:
            with hold_run_dir(tmp_path, "mlabel tune"):
                pass
        named = f"is in use by pid {holder.pid} (mlabel tune);" if delay >= 0 else "is in use by another process;"
        assert named in str(caught.value), caught.value
    finally:
        holder.kill()
        holder.wait()


def test_outputs_honour_the_umask(tmp_path, scene_csv):
    old = os.umask(0o022)
    try:
        assert _train(tmp_path / "run", scene_csv) == 0
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.json", "model/model.safetensors", "model/mlabel.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_a_failing_post_training_step_leaves_the_trained_model_saved(tmp_path, scene_csv, monkeypatch):
    from mlabel import evaluation

    def broken(*args, **kwargs):
        raise ValueError("thresholds: simulated failure after training")

    monkeypatch.setattr(evaluation, "calibrate_and_tune", broken)
    out = tmp_path / "run"
    assert _train(out, scene_csv) == 2
    model = mlabel.load(out / "model")
    assert model.labels and torch.equal(model.thresholds, torch.full((len(model.labels),), 0.5))


# --------------------------------------------------------------------------- the model directory (15.1, 15.7, 15.15)

def test_kill_9_during_saves_leaves_the_old_or_the_new_model_never_a_mix(tmp_path):
    """SIGKILL a (forked) process that saves two different models in turn into one directory, at
    random moments, 24 times: each time the directory loads as exactly one of the two."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    models, expected = [], {}
    for labels, th in ((["a", "b", "c"], [0.1, 0.2, 0.3]), (["x", "y"], [0.7, 0.8])):
        m = create_model("test_resnet", labels, image_size=32)
        m.set_thresholds(th)
        models.append(m)
        expected[tuple(labels)] = ({k: v.clone() for k, v in m.state_dict().items()}, th)
    rng = random.Random(0)
    seen = set()
    for trial in range(24):
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                while True:
                    for m in models:
                        m.save_pretrained(folder)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (folder / "mlabel.json").exists():
            continue  # killed before the first save finished: nothing to load yet
        model = mlabel.load(folder)
        state, th = expected[tuple(model.labels)]
        seen.add(tuple(model.labels))
        assert model.thresholds.tolist() == pytest.approx(th)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), (trial, key)
        assert len(list(folder.glob(".model.safetensors.*.tmp"))) <= 1  # the next save removes it
    assert len(seen) == 2


def test_kill_9_during_checkpointing_leaves_the_old_or_the_new_checkpoint(tmp_path):
    """The same for the epoch checkpoint: 24 random SIGKILLs of a process that writes two
    different training states in turn; every time the file reads back as exactly one of them."""
    from mlabel.checkpoint import load_checkpoint, save_checkpoint
    path = tmp_path / "checkpoint.pt"
    states = [{"model": {"w": torch.full((256, 256), float(i))}, "train_state": {"epoch": i}} for i in (1, 2)]
    rng = random.Random(1)
    seen = set()
    for trial in range(24):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    for state in states:
                        save_checkpoint(path, state)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.01, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not path.exists():
            continue
        saved = load_checkpoint(path)
        epoch = saved["train_state"]["epoch"]
        seen.add(epoch)
        assert torch.equal(saved["model"]["w"], states[epoch - 1]["model"]["w"]), trial
    assert seen == {1, 2}
    assert len(list(tmp_path.glob(".checkpoint.pt.*.tmp"))) <= 1  # the next save removes a killed writer's


def test_weights_and_metadata_from_different_saves_are_refused(tmp_path):
    a = create_model("test_resnet", ["a", "b"], image_size=32)
    b = create_model("test_resnet", ["b", "a"], image_size=32)  # same shapes, labels swapped
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match .*mlabel.json.*different saves"):
        mlabel.load(tmp_path / "a")


def test_an_interrupted_save_rolls_forward_to_the_new_model(tmp_path):
    """The state a kill leaves between the two renames: new weights, old metadata, pending metadata."""
    a = create_model("test_resnet", ["a", "b"], image_size=32)
    b = create_model("test_resnet", ["b", "a"], image_size=32)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    old_meta = (tmp_path / "a" / "mlabel.json").read_text()
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    (tmp_path / "a" / "mlabel.json.pending").write_text((tmp_path / "b" / "mlabel.json").read_text())
    assert (tmp_path / "a" / "mlabel.json").read_text() == old_meta
    assert mlabel.load(tmp_path / "a").labels == ["b", "a"]


def _edit_meta(folder: Path, **changes):
    path = folder / "mlabel.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("changes,fragment", [
    ({"thresholds": [float("nan"), 0.5]}, "thresholds holds NaN"),
    ({"thresholds": [2.0, 0.5]}, r"thresholds are probabilities in \[0, 1\]"),
    ({"thresholds": [-1.0, 0.5]}, r"thresholds are probabilities in \[0, 1\]"),
    ({"thresholds": [0.5]}, "thresholds has 1 values for 2 labels"),
    ({"calibration": {"method": "platt", "scale": [1.0, float("nan")], "bias": [0.0, 0.0]}},
     "calibration.scale holds NaN"),
    ({"calibration": {"method": "platt", "scale": [1.0, -1.0], "bias": [0.0, 0.0]}}, "scale must be positive"),
    ({"labels": ["a", "b", "c"], "thresholds": [0.5, 0.5, 0.5]}, "do not fit its mlabel.json .3 labels"),
    ({"labels": ["a", "a"]}, "labels repeat a name"),
    ({"backbone": "hf-hub:timm/resnet18.a1_in1k"}, "loading a model never downloads"),
])
def test_damaged_metadata_is_refused_on_load(tmp_path, changes, fragment):
    model = create_model("test_resnet", ["a", "b"], image_size=32)
    model.save_pretrained(tmp_path)
    digest = json.loads((tmp_path / "mlabel.json").read_text())["weights_sha256"]
    _edit_meta(tmp_path, weights_sha256=digest, **changes)  # the weights are intact: only the values lie
    with pytest.raises(ValueError, match=fragment):
        mlabel.load(tmp_path)


def test_regression_std_zero_is_refused(tmp_path):
    model = create_model("test_resnet", ["a"], image_size=32, regression=["r"])
    model.set_regression_scale([1.0], [2.0])
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "mlabel.json").read_text())
    _edit_meta(tmp_path, regression={**meta["regression"], "std": [0.0]})
    with pytest.raises(ValueError, match="regression.std must be positive"):
        mlabel.load(tmp_path)


def test_tampered_safetensors_without_digest_is_a_clear_error(tmp_path):
    create_model("test_resnet", ["a", "b"], image_size=32).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "mlabel.json").read_text())
    del meta["weights_sha256"]  # as written by an older mlabel
    (tmp_path / "mlabel.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mlabel.load(tmp_path)
