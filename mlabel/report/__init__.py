"""``report/`` of a run: plots a person reads faster than JSON, and one ``report.html``."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..io import read_text, write_text
from .explorer import explorer_data, explorer_html
from .gallery import error_galleries, heat_map_thumbnails
from .page import inline_json, page, run_header, summary_tables
from .plots import (MAX_LABELS_PLOTTED, plot_calibration, plot_frequency, plot_pr_and_f1, plot_structure,
                    plot_training)

__all__ = ["Known", "ReportInputs", "build_report", "mark_stale", "rebuild_run_report", "report_inputs",
           "write_report"]


@dataclass
class ReportInputs:
    """What a report is drawn from: ``metrics`` (metrics.json's dict), the ``history`` rows,
    ``splits`` mapping ``val`` (and ``test``) to the model's (calibrated) probabilities and the
    targets, (N, L) each, the ``labels``, the (L,) ``thresholds`` and the label ``counts``
    (run.json's). ``raw_val_probs`` is the plain sigmoid on val, drawn beside the calibrated
    probabilities in the reliability diagram when a calibration is used; ``header`` opens the
    page; ``paths`` maps a split to its image files (for the error galleries); ``explain(path,
    label)`` gives a gallery tile its heat map (:func:`~mlabel.report.gallery.heat_map_thumbnails`)."""
    metrics: dict
    history: list[dict]
    splits: dict
    labels: list[str]
    thresholds: np.ndarray
    counts: dict
    raw_val_probs: np.ndarray | None = None
    header: str = ""
    paths: dict | None = None
    explain: Callable | None = None


def write_report(run_dir: Path, inputs: ReportInputs) -> Path:
    """Write the PNGs and ``report.html`` of ``inputs`` into ``run_dir/report`` and return that folder."""
    metrics, history, splits, labels, counts = inputs.metrics, inputs.history, inputs.splits, inputs.labels, inputs.counts
    raw_val_probs, header, paths, explain = inputs.raw_val_probs, inputs.header, inputs.paths, inputs.explain
    folder = Path(run_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    thresholds = np.asarray(inputs.thresholds, np.float64)
    val_probs, val_targets = splits["val"]
    shown = list(splits)[-1]  # test when there is one, or the split the caller put last
    probs, targets = splits[shown]
    decisions = probs >= thresholds
    images = [plot_training(history, folder), *plot_pr_and_f1(val_probs, val_targets, labels, thresholds, folder),
              plot_frequency(counts, labels, folder),
              plot_calibration(val_probs, val_targets, folder, metrics, labels, raw_val_probs)]
    more = f"<p>Plots show the first {MAX_LABELS_PLOTTED} of {len(labels)} labels.</p>" \
        if len(labels) > MAX_LABELS_PLOTTED else ""
    figures = "".join(f'<figure><img src="{_data_uri(folder / name)}" alt="{name}"></figure>' for name in images)
    structure = plot_structure(targets, decisions, labels, shown, folder)
    galleries, thumbs = error_galleries(probs, targets, decisions, (paths or {}).get(shown), labels, shown, explain)
    explorer = explorer_html(explorer_data(splits, labels, thresholds, f"mlabel tune {run_dir} --from-json thresholds.json"))
    body = (f"{header}<p>Thresholds are tuned per label on val; test figures use them unchanged.</p>"
            f"{summary_tables(metrics, labels)}{explorer}{galleries}<h2>Label structure ({shown})</h2>"
            f'<figure><img src="{_data_uri(folder / structure)}" alt="{structure}"></figure>'
            f"<h2>Curves</h2>{more}{figures}"
            f'<script type="application/json" id="thumbs">{inline_json(thumbs)}</script>')
    write_text(folder / "report.html", page(body))
    return folder


def _data_uri(path: Path) -> str:
    """The PNG inlined, so ``report.html`` is one file that opens anywhere (the PNGs stay beside it)."""
    import base64
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _read_history(path: Path) -> list[dict]:
    """``history.csv`` rows as numbers (empty cells as None)."""
    import csv
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the report is built from a finished run directory")
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    for line, row in enumerate(reader, start=2):
        if None in row or None in row.values():
            raise DataError(f"{path}:{line}: {len(reader.fieldnames or ())} columns in the header, another number "
                            "here; the run's history is damaged: train the run again (or restore the file)")
        values = {}
        for key, value in row.items():
            try:
                values[key] = float(value) if value != "" else None
            except ValueError:
                raise DataError(f"{path}:{line}: {key} = {value[:40]!r} is not a number; the run's history is "
                                "damaged: train the run again (or restore the file)") from None
        rows.append(values)
    return rows


@dataclass
class Known:
    """What the caller of :func:`build_report` already holds (None: read from the run
    directory): ``metrics``, ``history``, ``scores`` (``{split: (Outputs, Targets)}``, what
    training has in memory and has just saved) and ``paths`` (``{split: image files}``)."""
    metrics: dict | None = None
    history: list[dict] | None = None
    scores: dict | None = None
    paths: dict | None = None


def build_report(run_dir: str | Path, model=None, *, known: Known = Known(), device=None, quiet: bool = False,
                 split: str | None = None) -> Path:
    """``RUN_DIR/report/`` from the run as it is now: the saved model (its current thresholds and
    calibration, e.g. after ``mlabel tune``) applied to the scores in ``predictions/`` (scored
    afresh when a run has none), with the run's history and label counts. Training, ``mlabel
    tune``, ``mlabel evaluate`` and ``mlabel report`` all build the page here, so it matches
    ``model/mlabel.json``. ``known``: what the caller holds already; ``split`` picks the
    galleries' and label structure's split (default: test when the run has one)."""
    import torch
    metrics, history, scores, paths = known.metrics, known.history, known.scores, known.paths

    from ..evaluation import evaluate_outputs
    from ..predictions import load_paths, load_scores
    run_dir = Path(run_dir)
    if model is None:
        from ..models import load
        model = load(run_dir)
    if scores is None:
        scores = {split: pair for split in ("val", "test")
                  if (pair := load_scores(run_dir, split, model.labels)) is not None}
    if "val" not in scores:
        scores = _score_afresh(run_dir, model, device, quiet)
    if split is not None and split not in scores:
        raise ValueError(f"{run_dir} has no {split} split to show; choose one of {sorted(scores)}")
    if metrics is None:
        metrics = {name: evaluate_outputs(model, *pair) for name, pair in scores.items()}
    history = _read_history(run_dir / "history.csv") if history is None else history
    counts = _label_counts(run_dir / "run.json", model.labels)
    probs = {name: (model.probabilities(outputs.logits).numpy(), targets.labels.numpy())
             for name, (outputs, targets) in scores.items()}
    if split is not None:  # the split shown in the galleries goes last
        probs[split] = probs.pop(split)
    if paths is None:
        paths = {name: found for name in scores if (found := load_paths(run_dir, name, len(probs[name][0]))) is not None}
    raw = torch.sigmoid(scores["val"][0].logits).numpy() if model.calibration else None
    return write_report(run_dir, ReportInputs(metrics, history, probs, model.labels, model.thresholds.cpu().numpy(),
                                              counts, raw_val_probs=raw, header=run_header(run_dir, history),
                                              paths=paths, explain=heat_map_thumbnails(model.eval())))


def _label_counts(path: Path, labels: list[str]) -> dict:
    """The label counts of ``run.json`` under the model's label names: by name when it counts
    every one of them, else by column (labels renamed in ``mlabel.json`` after the run: column j
    was trained on the run's j-th label)."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        counts = run["label_counts"]
        trained = run.get("labels") or [k for k in next(iter(counts.values())) if k != "images"]
        if all(name in c for c in counts.values() for name in labels):
            return counts
        if len(trained) == len(labels):
            return {split: {"images": c["images"], **{new: c[old] for old, new in zip(trained, labels)}}
                    for split, c in counts.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as err:
        raise ValueError(f"{path} is not a readable run record ({type(err).__name__}: {err}); "
                         "the report needs the run's label_counts") from None
    raise ValueError(f"{path} counts {len(trained)} labels but the model's mlabel.json names {len(labels)} "
                     f"({', '.join(labels[:5])}...): give the run directory that trained this model")


def rebuild_run_report(run_dir: Path, model, device=None, quiet: bool = False) -> None:
    """After a command changed or scored a saved model: rebuild the report of its run directory
    (when it is one, with ``run.json``) and print where it is."""
    report_inputs(run_dir, model)(device, quiet)


def report_inputs(run_dir: Path | None, model, streamed: bool = False) -> Callable[..., None]:
    """What rebuilding the report of ``run_dir`` for ``model`` takes, read now, before a command
    writes anything (a damaged ``predictions/`` file or ``history.csv`` stops the command here, not
    after it has changed ``mlabel.json`` or written its metrics). Returns ``step(device=None, quiet=False)`` that rebuilds the report
    and prints where it is. ``streamed``: the command kept no per-image scores, so a run without
    ``predictions/`` for these labels is not scored afresh; its report is marked out of date."""
    if run_dir is None or not (Path(run_dir) / "run.json").is_file():
        return lambda device=None, quiet=False: None
    from ..predictions import load_scores
    run_dir = Path(run_dir)
    scores = {split: pair for split in ("val", "test") if (pair := load_scores(run_dir, split, model.labels))}
    history = _read_history(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else None
    if streamed and "val" not in scores:
        return lambda device=None, quiet=False: mark_stale(run_dir, "the thresholds were tuned from streamed "
                                                                    "histograms, which keep no per-image scores")

    def step(device=None, quiet: bool = False) -> None:
        known = Known(history=history, scores=scores if "val" in scores else None)
        folder = build_report(run_dir, model, known=known, device=device, quiet=quiet)
        print(f"report: {folder / 'report.html'}")
    return step


STALE = '<p class="bad" id="stale">'


def mark_stale(run_dir: Path, why: str) -> None:
    """Say at the top of an existing ``report.html`` (and on stderr) that it no longer shows the
    saved model's thresholds, and how to rebuild it."""
    import html
    import re
    import sys
    path = Path(run_dir) / "report" / "report.html"
    if not path.is_file():
        return
    command = f"mlabel report {run_dir}"
    note = (f"{STALE}This report is out of date: it shows the thresholds from before the last "
            f"<code>mlabel tune</code> ({html.escape(why)}); <code>{html.escape(command)}</code> rebuilds it.</p>")
    page = re.sub(re.escape(STALE) + r".*?</p>", "", path.read_text(encoding="utf-8"), count=1)
    write_text(path, page.replace("<h1>mlabel run report</h1>", "<h1>mlabel run report</h1>" + note, 1))
    print(f"warning: {path} is out of date ({why}); {command} rebuilds it", file=sys.stderr)


def _score_afresh(run_dir: Path, model, device, quiet: bool) -> dict:
    """Val and test outputs of a run without ``predictions/`` (written by older versions)."""
    from ..checks import load_checked
    from ..distributed import resolve_device
    from ..evaluation import split_outputs
    cfg = load_checked(run_dir / "config.yaml")
    device = resolve_device(device or cfg.train.device)
    scores = {"val": split_outputs(model, cfg, "val", device, quiet)}
    if cfg.data.test or cfg.data.test_fraction > 0:
        scores["test"] = split_outputs(model, cfg, "test", device, quiet)
    return scores


def main(argv: list[str] | None = None) -> int:
    from ..cli import guarded
    return guarded(_main)(argv)


def _main(argv: list[str]) -> int:
    from ..cli import ArgumentParser
    parser = ArgumentParser(prog="mlabel report", description="(Re)build RUN_DIR/report/report.html "
                                     "from the run's saved model (its current thresholds), data and history.")
    parser.add_argument("run_dir", help="a run directory (with config.yaml, model/, history.csv and run.json)")
    parser.add_argument("--split", choices=["val", "test"],
                        help="the split of the error galleries and label structure (default: test when there is one)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the config's)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from ..models import locate_model
    _, run_dir = locate_model(args.run_dir)
    if run_dir is None:
        raise ValueError(f"{args.run_dir} is a model directory without its run (config.yaml, history.csv, "
                         "run.json); give the run directory")
    from ..rundir import hold_run_dir
    with hold_run_dir(run_dir, "mlabel report"):  # reads the model and writes the page as one step
        folder = build_report(run_dir, device=args.device, quiet=args.quiet, split=args.split)
    print(f"report: {folder / 'report.html'}")
    return 0
