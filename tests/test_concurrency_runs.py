"""Commands that rewrite a finished run (``mlabel tune``, ``evaluate``, ``report``) hold its run
directory while they read the model and write: run at the same time, in real processes, they
never leave a ``report.html`` whose thresholds differ from ``model/mlabel.json``.

The interleavings that broke it are made certain, not hoped for: a process is paused in
``write_report`` (after it has read the model, before it writes the page) until the other one is
done; before the lock, the paused one then wrote a page of thresholds that were no longer saved.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the mlabel command line with ``write_report`` paused: READY is written when the process
# gets there, and it waits for GO (at most 10 minutes) before writing the page.
PAUSED = """
import pathlib, sys, time
import mlabel.report as report
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
real = report.write_report
def paused(*args, **kwargs):
    ready.write_text("here")
    deadline = time.time() + 600
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)
    return real(*args, **kwargs)
report.write_report = paused
from mlabel.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(*args: str, pause: tuple[Path, Path] | None = None) -> subprocess.Popen:
    """``mlabel ARGS`` in a new process (paused in write_report with ``pause=(ready, go)``)."""
    head = [sys.executable, "-c", PAUSED, str(pause[0]), str(pause[1])] if pause else \
        [sys.executable, "-m", "mlabel.cli"]
    return subprocess.Popen([*head, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=900)
    return process.returncode, err


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 600
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def page_thresholds(run: Path) -> list[float]:
    """The thresholds the report's explorer shows (its inline JSON)."""
    page = (run / "report" / "report.html").read_text()
    return json.loads(re.search(r'id="explorer-data">(.*?)</script>', page).group(1))["thresholds"]


def saved(run: Path) -> dict:
    return json.loads((run / "model" / "mlabel.json").read_text())


def _refused_or_done(rc: int, err: str) -> bool:
    """A command that lost the race stops at once naming the holder; else it finished."""
    return rc == 0 or (rc == 2 and "is in use by pid" in err and err.count("error:") == 1)


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_two_tunes_at_the_same_time_leave_the_report_agreeing_with_the_model(run):
    for _ in range(2):
        first, second = (_start("tune", str(run), "--metric", metric, "--quiet") for metric in ("fbeta", "f1"))
        results = [_finish(first), _finish(second)]
        assert all(_refused_or_done(*r) for r in results), results
        assert any(rc == 0 for rc, _ in results), results
        assert page_thresholds(run) == saved(run)["thresholds"]
        assert json.loads((run / "tune.json").read_text())["metric"] == saved(run)["threshold_metric"]
        assert not (run / ".lock").exists()


def test_a_tune_that_starts_while_another_writes_stops_naming_it(run, tmp_path):
    """Tune A has saved mlabel.json and is about to write its report; tune B (another metric)
    starts: B stops naming A, and A's page matches the saved thresholds."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = _start("tune", str(run), "--metric", "fbeta", "--beta", "0.5", "--quiet", pause=(ready, go))
    _wait_for(ready, first)
    rc, err = _finish(_start("tune", str(run), "--metric", "f1", "--quiet"))
    go.write_text("go")
    assert _finish(first)[0] == 0
    assert page_thresholds(run) == saved(run)["thresholds"]
    assert rc == 2 and f"run directory {run} is in use by pid {first.pid}" in err and "(mlabel tune)" in err, err
    assert saved(run)["threshold_params"]["beta"] == 0.5


def test_a_tune_during_a_report_build_stops_and_the_report_matches_the_model(run, tmp_path):
    """mlabel report has read the model and is building the page; a tune started then stops naming
    it, so the page written afterwards shows the thresholds mlabel.json still holds."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    before = (run / "model" / "mlabel.json").read_bytes()
    report = _start("report", str(run), "--quiet", pause=(ready, go))
    _wait_for(ready, report)
    rc, err = _finish(_start("tune", str(run), "--metric", "fbeta", "--beta", "0.5", "--quiet"))
    go.write_text("go")
    assert _finish(report)[0] == 0
    assert page_thresholds(run) == saved(run)["thresholds"]
    assert rc == 2 and f"is in use by pid {report.pid}" in err and "(mlabel report)" in err, err
    assert (run / "model" / "mlabel.json").read_bytes() == before


def test_a_held_run_directory_stops_tune_evaluate_and_report_without_writing(run, capsys):
    from mlabel.evaluate import main as evaluate_main
    from mlabel.report import main as report_main
    from mlabel.rundir import hold_run_dir
    from mlabel.tune import main as tune_main
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    with hold_run_dir(run, "a test"):
        for main, argv in ((tune_main, [str(run), "--metric", "fbeta", "--quiet"]),
                           (evaluate_main, [str(run), "--split", "val", "--quiet"]),
                           (report_main, [str(run), "--quiet"])):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"run directory {run} is in use by pid {os.getpid()}" in err and "(a test)" in err, err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files  # and the lock is gone
