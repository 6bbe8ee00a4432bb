"""The HTML of the report: the run header, the summary and per-label tables, and the page around
the figures, the explorer and the galleries (one self-contained file; ``report.js`` is inlined)."""
from __future__ import annotations

import html
import math
from importlib import resources
from pathlib import Path

__all__ = ["inline_json", "run_header", "summary_tables", "page"]

SUMMARY_KEYS = ["mAP", "macro_f1", "cross_fit", "macro_f1@0.5", "micro_f1", "micro_f1@0.5", "samples_f1",
                "weighted_f1", "CF1", "OF1", "hamming_loss", "subset_accuracy", "macro_auroc",
                "micro_auroc", "coverage_error", "label_ranking_ap", "macro_ece", "macro_ece_uncalibrated",
                "accuracy", "accuracy@0.5"]


def inline_json(value) -> str:
    """``value`` as JSON to place inside an HTML ``<script>`` element: every ``<``, ``>`` and ``&``
    written as ``\\u003c``, ``\\u003e``, ``\\u0026`` (the same string to ``JSON.parse``), so no
    name can close the element or open a comment (``</script>``, ``<!--``) in it."""
    import json
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _summary_value(m: dict, key: str):
    if key == "cross_fit":  # the cross-fitted F1 beside the in-sample one
        return m["cross_fit"]["macro_f1"] if "cross_fit" in m else None
    return m.get(key)


def summary_tables(metrics: dict, labels: list[str]) -> str:
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


def run_header(run_dir: Path, history: list[dict]) -> str:
    """What ran: backbone, head, loss, input, epochs and the best one, weights, calibration,
    threshold objective, data and split sizes, wall time, versions and the command that reruns it."""
    import json

    from ..config import read_yaml
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
    from ..version import __version__
    return (f"trained with mlabel {meta.get('mlabel_version', '?')}; report by mlabel {__version__}, "
            f"torch {torch.__version__}, timm {timm.__version__}")

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}td.text{text-align:left}
table.labels th{cursor:pointer}tr.lost td{background:#fde2e1}.lost-note{color:#a11}
.panels{display:flex;gap:2em;flex-wrap:wrap}.panel{display:grid;grid-template-columns:auto auto;gap:0 1em;align-items:start}
.panel h3{grid-column:1/3}.panel canvas{border:1px solid #eee}.bad{color:#c00;font-weight:bold}
#explorer-slider{width:30em;vertical-align:middle}#explorer-value{width:7em}
.tiles{display:flex;flex-wrap:wrap;gap:6px}.tile{margin:0;width:150px;font-size:11px}
.tile img{display:block;max-width:112px;max-height:112px}.tile img.cam{display:none}
#galleries.show-maps .tile img.cam{display:block}#galleries.show-maps .tile img.plain{display:none}.kind{margin:.5em 0 .2em;font-weight:bold}
.missing{width:112px;height:70px;background:#eee;font-size:10px;overflow:hidden;word-break:break-all}"""


def page(body: str) -> str:
    """The whole document around ``body``, with the style and ``report.js`` inlined."""
    script = resources.files(__package__).joinpath("report.js").read_text(encoding="utf-8")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>mlabel report</title><style>{STYLE}</style>'
            f"<script>{script}</script></head><body><h1>mlabel run report</h1>{body}</body></html>")
