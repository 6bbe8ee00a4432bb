"""Resume (issue 27, item 1): a run killed with SIGKILL continues with ``resume=true`` to the
uninterrupted run's figures, also for a recipe that draws its own data (the shipped quickstart);
a finished run is left as it is; a resume on other data or another stream plan is refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlabel.train import main as train_main

# The shipped quickstart with its generated data (data.generate=scenes), made small and fast.
QUICK = ["model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32", "data.num_workers=0",
         "train.channels_last=false", "thresholds.cross_fit=0", "thresholds.bootstrap=0", "seed=3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One drawn scene set for the module (the generator writes it on first use)."""
    return tmp_path_factory.mktemp("mlabel-cache")


def _env(cache: Path) -> dict:
    return dict(os.environ, PYTHONHASHSEED="0", XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")


def _train(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlabel.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _kill_after_epochs(args: list[str], cwd: Path, env: dict, run: Path, epochs: int) -> None:
    """Start the training, SIGKILL it once its history holds ``epochs`` epochs (the checkpoint
    of the last one written), and check it was killed, not finished."""
    proc = subprocess.Popen([sys.executable, "-m", "mlabel.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    history = run / "history.csv"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 1 + epochs:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run (exit {proc.returncode}): {proc.stderr.read()[-2000:]}"
    assert not (run / "metrics.json").exists()


def _same_metrics(got: dict, expected: dict) -> None:
    for split in expected:
        for key in ("mAP", "macro_f1", "micro_f1", "macro_auroc"):
            assert got[split][key] == pytest.approx(expected[split][key], abs=1e-9), (split, key)
        assert got[split]["per_label"] == expected[split]["per_label"], split


def _quickstart_kill_and_resume(tmp_path: Path, env: dict, args: list[str], kill_after: int) -> None:
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    done = _train(args, tmp_path / "ref", env)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "runs" / "quickstart" / "metrics.json").read_text())
    run = tmp_path / "cut" / "runs" / "quickstart"
    _kill_after_epochs(args, tmp_path / "cut", env, run, kill_after)
    resumed = _train([*args, "resume=true"], tmp_path / "cut", env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after epoch {kill_after}" in resumed.stdout + resumed.stderr
    _same_metrics(json.loads((run / "metrics.json").read_text()), expected)
    assert not (tmp_path / "cut" / "runs" / "quickstart-2").exists()  # continued in place


def test_quickstart_killed_then_resumed_matches_uninterrupted(tmp_path, cache_dir):
    """The quickstart recipe as shipped (generated data into the cache), killed after epoch 1 of 3."""
    _quickstart_kill_and_resume(tmp_path, _env(cache_dir), ["quickstart", *QUICK, "train.epochs=3"], kill_after=1)


@pytest.mark.slow
def test_readme_quickstart_killed_after_two_epochs_then_resumed(tmp_path):
    """Exactly the README's commands: ``python -m mlabel.train quickstart``, killed with -9 after
    two of its four epochs, then ``python -m mlabel.train quickstart resume=true``."""
    env = dict(os.environ, PYTHONHASHSEED="0", XDG_CACHE_HOME=str(tmp_path / "cache"))
    _quickstart_kill_and_resume(tmp_path, env, ["quickstart"], kill_after=2)


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["quickstart", *QUICK, "train.epochs=1", f"out_dir={out}", f"data.cache_dir={cache_dir / 'mlabel'}", "--quiet"]
    assert train_main(argv) == 0
    return out


def _finished_quickstart(tmp_path: Path, finished: Path) -> Path:
    """A copy of a finished one-epoch quickstart run (the shipped recipe on its generated data)."""
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resume_of_a_finished_run_leaves_it_as_it_is(tmp_path, cache_dir, finished_once, capsys):
    out = _finished_quickstart(tmp_path, finished_once)
    meta_path = out / "model" / "mlabel.json"
    meta = json.loads(meta_path.read_text())
    meta["thresholds"] = [0.9] * len(meta["thresholds"])  # as a later mlabel tune --from-json leaves it
    meta_path.write_text(json.dumps(meta))
    before = _snapshot(out)
    capsys.readouterr()
    argv = ["quickstart", *QUICK, "train.epochs=1", f"out_dir={out}", f"data.cache_dir={cache_dir / 'mlabel'}", "resume=true"]
    assert train_main(argv) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert _snapshot(out) == before


def _interrupted_copy(tmp_path: Path, cache: Path) -> tuple[Path, list[str]]:
    """A 2-epoch run on 200 rows of the scene set's CSVs as a kill after its last checkpoint
    leaves it (metrics.json and run.json not yet written), and the command that trained it."""
    from mlabel.data.synthetic import ensure_scenes, scenes_root
    source = ensure_scenes(scenes_root(".", str(cache / "mlabel")))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "val.csv"):
        rows = (source / name).read_text().splitlines()
        header, body = rows[0], [f"{source}/{r}" for r in rows[1:]][:200]
        (data / name).write_text("\n".join([header, *body]) + "\n")
    out = tmp_path / "run"
    argv = ["quickstart", *QUICK, "train.epochs=2", f"out_dir={out}", f"data.root={data}", "data.generate=null",
            "data.test=null", "--quiet"]
    assert train_main(argv) == 0
    for name in ("metrics.json", "run.json"):
        (out / name).unlink()
    return out, argv


def test_resume_after_the_training_csv_was_edited_is_refused(tmp_path, cache_dir, capsys):
    out, argv = _interrupted_copy(tmp_path, cache_dir)
    train_csv = tmp_path / "data" / "train.csv"
    rows = train_csv.read_text().splitlines()
    first = rows[1].split(",")
    first[1] = "0" if first[1] == "1" else "1"  # one label flipped in place
    train_csv.write_text("\n".join([rows[0], ",".join(first), *rows[2:]]) + "\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert train_main([*argv, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resume:") and "train labels" in err and "train.csv" in err, err
    assert _snapshot(out) == before


def test_resume_with_the_same_data_continues(tmp_path, cache_dir):
    """The control for the refusal above: nothing edited, the same resume is accepted."""
    out, argv = _interrupted_copy(tmp_path, cache_dir)
    assert train_main([*argv, "resume=true"]) == 0
    assert json.loads((out / "run.json").read_text())["finished"] is True


@pytest.fixture(scope="module")
def shards(scene_csv, tmp_path_factory) -> Path:
    from mlabel.data.__main__ import main as data_main
    out = tmp_path_factory.mktemp("shards") / "s"
    assert data_main(["shard", "quickstart", f"data.root={scene_csv}", "data.generate=null", "data.val=val.csv",
                      "data.test=null", "--out", str(out), "--shard-size", "10"]) == 0
    return out


def _shard_run_killed_inside_epoch(shards: Path, out: Path, monkeypatch) -> list[str]:
    """A shard run with two loader workers killed just after its checkpoint at step 4 of epoch 1."""
    from mlabel import loop
    argv = ["quickstart", f"out_dir={out}", "data.format=wds", f"data.root={shards}", "data.train=train",
            "data.val=val", "data.test=null", "data.generate=null", "data.batch_size=4", "model.backbone=test_resnet",
            "model.pretrained=false", "data.image_size=32", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
            "train.epochs=2", "train.checkpoint_every_steps=2", "train.precision=fp32", "--quiet"]
    real = loop.save_checkpoint

    def killed_after(path, state):
        real(path, state)
        if state["train_state"].get("in_epoch", {}).get("step") == 4:
            raise RuntimeError("killed")

    monkeypatch.setattr(loop, "save_checkpoint", killed_after)
    with pytest.raises(RuntimeError, match="killed"):
        train_main([*argv, "data.num_workers=2", "--debug"])
    monkeypatch.setattr(loop, "save_checkpoint", real)
    return argv


def test_shard_resume_with_other_loader_workers_is_refused(shards, tmp_path, monkeypatch, capsys):
    """The shard plan is cut per loader worker: continuing an epoch with another worker count
    would train some samples twice and others never, so it is refused, the key named."""
    out = tmp_path / "run"
    argv = _shard_run_killed_inside_epoch(shards, out, monkeypatch)
    before = _snapshot(out)
    capsys.readouterr()
    assert train_main([*argv, "data.num_workers=1", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "data.num_workers: 2 -> 1" in err and "data.num_workers=2 back" in err, err
    assert _snapshot(out) == before
    assert train_main([*argv, "data.num_workers=2", "resume=true"]) == 0  # the same plan continues


def test_resume_with_another_world_size_is_refused(shards, tmp_path, monkeypatch, capsys):
    import torch
    out = tmp_path / "run"
    argv = _shard_run_killed_inside_epoch(shards, out, monkeypatch)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    saved["guard"]["world_size"] = 2  # as written by a 2-process torchrun
    torch.save(saved, out / "checkpoint.pt")
    capsys.readouterr()
    assert train_main([*argv, "data.num_workers=2", "resume=true"]) == 2
    assert "trained by 2 process(es), this run has 1" in capsys.readouterr().err


def test_resume_on_a_finished_dir_names_the_interrupted_run_beside_it(tmp_path, cache_dir, finished_once, capsys):
    """A second training of the same recipe went to DIR-2 (DIR held a run) and was killed:
    resume=true on DIR leaves DIR as it is and says where the interrupted run is."""
    out = _finished_quickstart(tmp_path, finished_once)
    sibling = out.with_name(out.name + "-2")
    sibling.mkdir()
    (sibling / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    argv = ["quickstart", *QUICK, "train.epochs=1", f"out_dir={out}", f"data.cache_dir={cache_dir / 'mlabel'}", "resume=true"]
    assert train_main(argv) == 0
    said = capsys.readouterr().out
    assert "nothing to resume" in said and f"out_dir={sibling} resume=true" in said, said
