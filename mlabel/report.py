"""``report/`` of a run: plots a person reads faster than JSON, and one ``report.html``."""
from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # label names are text: "$x$" must not be read as TeX
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_path, write_text  # noqa: E402
from .metrics import label_curves  # noqa: E402
from .thresholds import _objective  # noqa: E402

__all__ = ["build_report", "write_report"]

MAX_LABELS_PLOTTED = 16


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _grid(n: int):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _label_curves(probs: np.ndarray, targets: np.ndarray):
    """Per label: thresholds, precision, recall, F1 at every distinct score."""
    for t, tp, fp, n_pos, n_neg in label_curves(probs, targets):
        # The very curve the threshold tuner maximises.
        f1 = _objective("f1", tp[None].copy(), fp[None], np.array([[n_pos]]), np.array([[n_neg]]), 1.0, 0.0, 0.0)[0]
        yield t, tp / np.maximum(tp + fp, 1), tp / max(n_pos, 1), f1


def _plot_training(history: list[dict], folder: Path) -> str:
    from matplotlib.ticker import MaxNLocator
    epochs = [int(r["epoch"]) for r in history]
    maps = [r["val_mAP"] for r in history]
    kept = [max(r["val_mAP"], r.get("val_mAP_ema") or -1.0) for r in history]  # the EMA may win an epoch
    best = epochs[int(np.argmax(kept))] if kept else None
    fig, (left, right, rate) = plt.subplots(1, 3, figsize=(13, 3.5), layout="constrained")
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    left.set_xlabel("epoch"), left.set_ylabel("loss"), left.legend(), left.grid(alpha=0.3)
    right.plot(epochs, maps, "o-", color="C2")
    if best is not None:
        right.axvline(best, color="C3", ls="--", lw=1, label=f"best epoch {best}")
        right.legend()
    right.set_xlabel("epoch"), right.set_ylabel("val mAP"), right.grid(alpha=0.3)
    right.set_title("validation mAP (the best epoch's weights are kept)")
    rate.plot(epochs, [r.get("lr") for r in history], "o-", color="C4")
    rate.set_xlabel("epoch"), rate.set_ylabel("learning rate at the epoch's end"), rate.grid(alpha=0.3)
    for ax in (left, right, rate):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, folder / "training_curves.png")


def _plot_pr_and_f1(probs, targets, labels, thresholds, folder: Path) -> tuple[str, str]:
    shown = labels[:MAX_LABELS_PLOTTED]
    pr_fig, pr_axes = _grid(len(shown))
    f1_fig, f1_axes = _grid(len(shown))
    for j, (name, (t, precision, recall, f1), pr_ax, f1_ax) in enumerate(
            zip(shown, _label_curves(probs, targets), pr_axes, f1_axes)):
        chosen = int(np.searchsorted(-t, -thresholds[j], side="right")) - 1
        pr_ax.plot(recall, precision, lw=1.5)
        if chosen >= 0:
            pr_ax.plot(recall[chosen], precision[chosen], "o", color="C3", label="tuned threshold")
        pr_ax.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        pr_ax.grid(alpha=0.3)
        f1_ax.plot(t, f1, lw=1.5)
        f1_ax.axvline(thresholds[j], color="C3", ls="-", label=f"tuned {thresholds[j]:.2f}")
        f1_ax.axvline(0.5, color="grey", ls="--", label="0.5")
        f1_ax.set(title=name, xlabel="threshold", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02))
        f1_ax.legend(fontsize=7, loc="lower center"), f1_ax.grid(alpha=0.3)
    pr_fig.suptitle("precision-recall on val (dot: tuned threshold)")
    f1_fig.suptitle("F1 against threshold on val (the model's probabilities, calibrated when enabled)")
    return _save(pr_fig, folder / "pr_curves.png"), _save(f1_fig, folder / "f1_vs_threshold.png")


def _plot_frequency(counts: dict, labels: list[str], folder: Path) -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 3.5))
    width = 0.8 / len(counts)
    x = np.arange(len(labels))
    for k, (split, c) in enumerate(counts.items()):
        share = [c[name]["positive"] / max(c["images"], 1) for name in labels]
        ax.bar(x + k * width, share, width, label=f"{split} ({c['images']} images)")
    ax.set_xticks(x + width * (len(counts) - 1) / 2, labels, rotation=45, ha="right")
    ax.set_ylabel("share of images positive"), ax.legend(), ax.grid(axis="y", alpha=0.3)
    ax.set_title("label frequency per split")
    return _save(fig, folder / "label_frequency.png")


def _reliability(probs: np.ndarray, targets: np.ndarray, bins: int):
    known = targets >= 0
    p, t = probs[known], targets[known]
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, p, bins) / np.maximum(count, 1)
    mean_t = np.bincount(which, t, bins) / np.maximum(count, 1)
    return count, mean_p, mean_t


def _plot_calibration(probs, targets, folder: Path, metrics: dict, labels: list[str],
                      raw_probs=None, bins: int = 10) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained",
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    left.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    curves = [("sigmoid of logits", raw_probs, "C1"), ("calibrated" if raw_probs is not None else "model", probs, "C0")]
    for name, values, color in curves:
        if values is None:
            continue
        count, mean_p, mean_t = _reliability(values, targets, bins)
        left.plot(mean_p[count > 0], mean_t[count > 0], "o-", color=color, label=name)
    left.set(xlabel="predicted probability (all labels pooled)", ylabel="observed positive rate",
             title="reliability on val", xlim=(0, 1), ylim=(0, 1))
    left.legend(fontsize=8), left.grid(alpha=0.3)
    split = "test" if "test" in metrics else "val"
    per = metrics[split]["per_label"]
    shown = labels[:MAX_LABELS_PLOTTED * 2]
    x = np.arange(len(shown))
    after = [per[n]["ece"] or 0.0 for n in shown]
    if "ece_uncalibrated" in per[shown[0]]:
        before = [per[n]["ece_uncalibrated"] or 0.0 for n in shown]
        right.bar(x - 0.2, before, 0.4, color="C1", label="sigmoid of logits")
        right.bar(x + 0.2, after, 0.4, color="C0", label="calibrated")
    else:
        right.bar(x, after, 0.6, color="C0", label="model")
    right.set_xticks(x, shown, rotation=45, ha="right")
    right.set(ylabel="expected calibration error", title=f"per-label ECE on {split} (lower is better)")
    right.legend(fontsize=8), right.grid(axis="y", alpha=0.3)
    return _save(fig, folder / "calibration.png")


SUMMARY_KEYS = ["mAP", "macro_f1", "cross_fit", "macro_f1@0.5", "micro_f1", "micro_f1@0.5", "samples_f1",
                "weighted_f1", "CF1", "OF1", "hamming_loss", "subset_accuracy", "macro_auroc",
                "micro_auroc", "coverage_error", "label_ranking_ap", "macro_ece", "macro_ece_uncalibrated",
                "accuracy", "accuracy@0.5"]


def _summary_value(m: dict, key: str):
    if key == "cross_fit":  # the cross-fitted F1 beside the in-sample one
        return m["cross_fit"]["macro_f1"] if "cross_fit" in m else None
    return m.get(key)


def _table(metrics: dict, labels: list[str]) -> str:
    head = "".join(f"<th>{s}</th>" for s in metrics)
    names = {"cross_fit": "macro_f1 (thresholds cross-fitted on val)"}
    rows = "".join(
        f"<tr><td>{names.get(k, k)}</td>" + "".join(
            f"<td>{v:.4f}</td>" if isinstance(v := _summary_value(m, k), float) else "<td>-</td>"
            for m in metrics.values()) + "</tr>"
        for k in SUMMARY_KEYS if any(_summary_value(m, k) is not None for m in metrics.values()))
    return f"<h2>Summary</h2><table><tr><th>metric</th>{head}</tr>{rows}</table>" + "".join(
        _label_table(split, m["per_label"], labels) for split, m in metrics.items())


LABEL_COLUMNS = (("support", "support", "d"), ("AP", "ap", ".3f"), ("AUROC", "auroc", ".3f"),
                 ("threshold", "threshold", ".3f"), ("TP", "tp", "d"), ("FP", "fp", "d"), ("FN", "fn", "d"),
                 ("TN", "tn", "d"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
                 ("F1", "f1", ".3f"), ("precision at 0.5", "precision@0.5", ".3f"),
                 ("recall at 0.5", "recall@0.5", ".3f"), ("F1 at 0.5", "f1@0.5", ".3f"), ("ECE", "ece", ".3f"))


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td data-v="">-</td>'
    shown = format(int(value), fmt) if fmt == "d" else format(value, fmt)
    return f'<td data-v="{float(value)!r}">{shown}</td>'


def _label_table(split: str, per: dict, labels: list[str]) -> str:
    """Per-label figures of one split, sortable by any column (click its header); labels whose
    tuned threshold gave a lower F1 than 0.5 are marked."""
    lost = [n for n in labels if per[n].get("f1") is not None and per[n].get("f1@0.5") is not None
            and per[n]["f1"] < per[n]["f1@0.5"]]
    marked = ' class="lost"'
    rows = "".join(
        f'<tr{marked if n in lost else ""}><td data-v="{html.escape(n)}">{html.escape(n)}</td>'
        + "".join(_cell(per[n].get(key), fmt) for _, key, fmt in LABEL_COLUMNS) + "</tr>" for n in labels)
    note = (f'<p class="lost-note">{len(lost)} of {len(labels)} labels have a lower {split} F1 at their tuned '
            f"threshold than at 0.5 (marked): {', '.join(html.escape(n) for n in lost)}.</p>") if lost else ""
    head = "".join(f"<th onclick=\"sortBy(this)\">{title}</th>" for title, _, _ in (("label", "", ""), *LABEL_COLUMNS))
    return f"<h2>Per label ({split})</h2>{note}<table class=\"labels\"><tr>{head}</tr>{rows}</table>"


SORT_SCRIPT = """<script>
function sortBy(th) {
  const table = th.closest("table"), i = [...th.parentNode.children].indexOf(th);
  const rows = [...table.rows].slice(1), up = th.dataset.dir !== "up";
  const key = r => { const v = r.cells[i].dataset.v; return v === "" ? NaN : (isNaN(+v) ? v : +v); };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (Number.isNaN(x)) return 1; if (Number.isNaN(y)) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
  th.dataset.dir = up ? "up" : "down";
  rows.forEach(r => table.appendChild(r));
}
</script>"""


def run_header(run_dir: Path, history: list[dict]) -> str:
    """What ran: backbone, head, loss, input, epochs and the best one, weights, calibration,
    threshold objective, data and split sizes, wall time, versions and the command that reruns it."""
    import json

    from .config import read_yaml
    rows = []
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    meta_path = run_dir / "model" / "mlabel.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    counts = run.get("label_counts", {})
    calibration = (meta.get("calibration") or {}).get("method", "none")
    rows += [("backbone", f"{model.get('backbone')} (pretrained: {model.get('pretrained')})"),
             ("head, loss", f"{model.get('head')}, {config.get('loss', {}).get('name')}"),
             ("input", f"{data.get('image_size')} px, resize {data.get('resize')}, augment {data.get('augment')}"),
             ("epochs", f"{len(history)} of {train.get('epochs')}; best epoch {run.get('best_epoch')} "
                        f"(val mAP {run.get('best_val_mAP', float('nan')):.4f}), weights saved: {run.get('weights')}"),
             ("decision", f"calibration {calibration}; thresholds: {meta.get('threshold_metric')}, policy "
                          f"{meta.get('threshold_policy')}"),
             ("data", f"{data.get('format')} at {data.get('root')}: " + ", ".join(
                 f"{split} {c.get('images')}" for split, c in counts.items())),
             ("wall time", f"{run.get('wall_time_s', float('nan')):.0f} s on {run.get('device')} "
                           f"(world size {run.get('world_size')})"),
             ("versions", _versions(meta)),
             ("rerun", f"<code>mlabel train {html.escape(str(run_dir / 'config.yaml'))}</code>")]
    body = "".join(f"<tr><th>{k}</th><td class=\"text\">{v if k == 'rerun' else html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<h2>Run</h2><table class=\"run\">{body}</table>"


def _versions(meta: dict) -> str:
    import timm
    import torch
    from . import __version__
    return (f"trained with mlabel {meta.get('mlabel_version', '?')}; report by mlabel {__version__}, "
            f"torch {torch.__version__}, timm {timm.__version__}")


def write_report(run_dir: Path, metrics: dict, history: list[dict], val_probs: np.ndarray,
                 val_targets: np.ndarray, labels: list[str], thresholds: np.ndarray, counts: dict,
                 raw_probs: np.ndarray | None = None, header: str = "") -> Path:
    """Write the PNGs and ``report.html`` into ``run_dir/report`` and return that folder.

    ``val_probs`` are the model's (calibrated) probabilities; ``raw_probs`` the plain sigmoid,
    drawn beside them in the reliability diagram when a calibration is used.
    """
    folder = Path(run_dir) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    images = [_plot_training(history, folder), *_plot_pr_and_f1(val_probs, val_targets, labels, thresholds, folder),
              _plot_frequency(counts, labels, folder), _plot_calibration(val_probs, val_targets, folder, metrics, labels, raw_probs)]
    more = f"<p>Plots show the first {MAX_LABELS_PLOTTED} of {len(labels)} labels.</p>" \
        if len(labels) > MAX_LABELS_PLOTTED else ""
    body = "".join(f'<figure><img src="{_data_uri(folder / name)}" alt="{name}"></figure>' for name in images)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mlabel report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}
td.text{{text-align:left}}table.labels th{{cursor:pointer}}tr.lost td{{background:#fde2e1}}</style>{SORT_SCRIPT}</head>
<body><h1>mlabel run report</h1>{header}<p>Thresholds are tuned per label on val; test figures use them unchanged.</p>
{_table(metrics, labels)}{more}{body}</body></html>"""
    write_text(folder / "report.html", page)
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
    with path.open(newline="") as handle:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(handle)]


def build_report(run_dir: str | Path, model=None, metrics: dict | None = None, history: list[dict] | None = None,
                 scores: dict | None = None, device=None, quiet: bool = False) -> Path:
    """``RUN_DIR/report/`` from the run as it is now: the saved model (its current thresholds and
    calibration, e.g. after ``mlabel tune``) applied to the scores in ``predictions/`` (scored
    afresh when a run has none), with the run's history and label counts. Training, ``mlabel
    tune`` and ``mlabel report`` all build the page here, so it matches ``model/mlabel.json``.
    ``scores`` (``{split: (outputs, targets)}``) is what training has in memory and has just saved."""
    import json

    import torch

    from .evaluate import evaluate_outputs
    from .predictions import load_scores
    run_dir = Path(run_dir)
    if model is None:
        from .models import load
        model = load(run_dir)
    if scores is None:
        scores = {split: tuple(torch.from_numpy(x) for x in pair) for split in ("val", "test")
                  if (pair := load_scores(run_dir, split, model.labels)) is not None}
    if "val" not in scores:
        scores = _score_afresh(run_dir, model, device, quiet)
    if metrics is None:
        metrics = {split: evaluate_outputs(model, *pair) for split, pair in scores.items()}
    history = _read_history(run_dir / "history.csv") if history is None else history
    counts = json.loads((run_dir / "run.json").read_text())["label_counts"]
    n = model.num_labels
    logits, targets = scores["val"][0][:, :n], scores["val"][1][:, :n]
    return write_report(run_dir, metrics, history, model.probabilities(logits).numpy(), targets.numpy(),
                        model.labels, model.thresholds.cpu().numpy(), counts,
                        raw_probs=torch.sigmoid(logits).numpy() if model.calibration else None,
                        header=run_header(run_dir, history))


def _score_afresh(run_dir: Path, model, device, quiet: bool) -> dict:
    """Val and test outputs of a run without ``predictions/`` (written by older versions)."""
    from .config import load_config
    from .distributed import resolve_device
    from .evaluate import split_logits
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(device or cfg.train.device)
    scores = {"val": split_logits(model, cfg, "val", device, quiet)}
    if cfg.data.test or cfg.data.test_fraction > 0:
        scores["test"] = split_logits(model, cfg, "test", device, quiet)
    return scores


def main(argv: list[str] | None = None) -> int:
    from .cli import guarded
    return guarded(_main)(argv)


def _main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="mlabel report", description="(Re)build RUN_DIR/report/report.html "
                                     "from the run's saved model (its current thresholds), data and history.")
    parser.add_argument("run_dir", help="a run directory (with config.yaml, model/, history.csv and run.json)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the config's)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from .models import locate_model
    _, run_dir = locate_model(args.run_dir)
    if run_dir is None:
        raise ValueError(f"{args.run_dir} is a model directory without its run (config.yaml, history.csv, "
                         "run.json); give the run directory")
    folder = build_report(run_dir, device=args.device, quiet=args.quiet)
    print(f"report: {folder / 'report.html'}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
