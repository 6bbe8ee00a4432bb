"""The Hugging Face Hub: ``mlabel push``, ``mlabel pull`` and ``mlabel.load("hf://owner/name")``.

These are the only places that reach the network, and only because an argument says so. A push
uploads the model directory (weights, ``mlabel.json``), a generated model card (``README.md``
with the Hub's metadata, the per-label thresholds and their evidence) and, on request, the
report; ``--dry-run DIR`` writes exactly that folder instead. A pull or an ``hf://`` load reads
through ``huggingface_hub``'s cache (``HF_HUB_OFFLINE=1``: the cache only) and the files pass the
same validation as a local load before anything is written. Needs the ``hub`` extra
(``pip install 'mlabel[hub]'``, which is ``huggingface_hub``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .cli import ArgumentParser
from .errors import UserError
from .hubpath import MODEL_FILES, check_repo_id, hub_module, snapshot

__all__ = ["model_card", "pull", "push", "stage"]


# --------------------------------------------------------------------------- the model card

def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _front_matter(meta: dict, metrics: dict, repo_id: str) -> str:
    import yaml
    results = []
    for split in ("val", "test"):
        section = metrics.get(split)
        if not section:
            continue
        results.append({"task": {"type": "image-classification", "name": "Multi-label image classification"},
                        "dataset": {"type": "custom", "name": f"{split} split", "split": split},
                        "metrics": [{"type": "mAP", "name": f"{split} mAP", "value": section.get("mAP")},
                                    {"type": "f1", "name": f"{split} macro F1", "value": section.get("macro_f1")}]})
    card = {"library_name": "mlabel", "pipeline_tag": "image-classification",
            "tags": ["mlabel", "timm", "image-classification", "multi-label" if meta["task"] == "multilabel" else "binary"],
            "base_model": f"timm/{meta['backbone']}"}
    if results:
        card["model-index"] = [{"name": repo_id.split("/")[1], "results": results}]
    return "---\n" + yaml.safe_dump(card, sort_keys=False) + "---\n"


def _label_table(meta: dict, metrics: dict) -> list[str]:
    split = "test" if "test" in metrics else "val"
    per_label = metrics.get(split, {}).get("per_label", {})
    rows = [f"| label | threshold | support ({split}) | AP ({split}) | F1 at threshold | F1 at 0.5 |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, threshold in zip(meta["labels"], meta["thresholds"]):
        row = per_label.get(name, {})
        cells = [_fmt(float(threshold)), _fmt(row.get("support")), _fmt(row.get("ap")), _fmt(row.get("f1")),
                 _fmt(row.get("f1@0.5"))]
        rows.append(f"| {_escape_cell(name)} | " + " | ".join(cells) + " |")
    return rows


def _escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def model_card(meta: dict, repo_id: str, metrics: dict | None = None, run: dict | None = None,
               config: dict | None = None) -> str:
    """``README.md`` for the Hub: its YAML metadata (library, tags, pipeline, base model and a
    ``model-index`` of val/test mAP and macro F1), a usage snippet, the per-label table
    (threshold, support, AP, F1 at the threshold and at 0.5), calibration, data and the command
    that trained it. ``metrics``, ``run`` and ``config`` come from the run directory when there
    is one."""
    metrics, run, config = metrics or {}, run or {}, config or {}
    calibration = (meta.get("calibration") or {}).get("method", "none") if isinstance(meta.get("calibration"), dict) else "none"
    lines = [_front_matter(meta, metrics, repo_id), f"# {repo_id.split('/')[1]}", "",
             f"A {meta['task']} image classifier on timm's `{meta['backbone']}` ({len(meta['labels'])} labels, "
             f"head `{meta.get('head', 'linear')}`), trained with [mlabel](https://pypi.org/project/mlabel/): one sigmoid "
             "per label, and a decision threshold per label tuned on the validation split and saved with the model.", "",
             "## Use", "", "```python", "import mlabel", "", f'model = mlabel.load("hf://{repo_id}")',
             'names = model.predict_labels(images)   # the labels at or above each one\'s threshold', "```", "",
             "or `mlabel predict hf://... IMAGES` after `mlabel pull " + repo_id + " --out model/`.", ""]
    summary = [f"| {split} | {_fmt(metrics[split].get('mAP'))} | {_fmt(metrics[split].get('macro_f1'))} | "
               f"{_fmt(metrics[split].get('macro_f1@0.5'))} | {_fmt(metrics[split].get('n_images'))} |"
               for split in ("val", "test") if split in metrics]
    if summary:
        lines += ["## Results", "", "| split | mAP | macro F1 (tuned thresholds) | macro F1 at 0.5 | images |",
                  "|---|---:|---:|---:|---:|", *summary, ""]
    lines += ["## Per label", "", *_label_table(meta, metrics), "",
              f"Thresholds tuned for `{meta.get('threshold_metric') or 'n/a'}` (policy "
              f"`{meta.get('threshold_policy') or 'n/a'}`); calibration: `{calibration}`.", ""]
    counts = run.get("label_counts") or {}
    if counts:
        lines += ["## Data", "", "| split | images |", "|---|---:|",
                  *[f"| {split} | {_fmt(c.get('images'))} |" for split, c in counts.items() if isinstance(c, dict)], ""]
    pre = meta.get("preprocessing", {})
    lines += ["## Preprocessing", "", f"{pre.get('image_size')} px, resize `{pre.get('resize')}`, "
              f"interpolation `{pre.get('interpolation')}`, mean {pre.get('mean')}, std {pre.get('std')}.", ""]
    if config:
        data, model, train = config.get("data", {}), config.get("model", {}), config.get("train", {})
        lines += ["## Training", "", "```bash", f"mlabel train RECIPE model.backbone={model.get('backbone')} "
                  f"train.epochs={train.get('epochs')} data.image_size={data.get('image_size')}", "```", "",
                  "The run's full `config.yaml` reproduces it (`mlabel train config.yaml`).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- push

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def stage(model_or_run: str | Path, repo_id: str, out: Path, with_report: bool = False) -> list[str]:
    """Write into ``out`` exactly what a push uploads; returns the file names. The model is
    loaded (validated) first: a directory that fails validation is refused before anything.
    A model with a linear head also gets timm's ``config.json`` and weights
    (:data:`TIMM_HUB_WEIGHTS`), so ``timm.create_model("hf-hub:OWNER/NAME", pretrained=True)`` loads it."""
    from .config import read_yaml
    from .export import timm_refusal
    from .models import load, locate_model
    from .modeldir import META_FILE
    check_repo_id(repo_id)
    model_dir, run_dir = locate_model(model_or_run)
    model = load(model_dir)  # the same validation as any load: checksum, metadata, weights that fit
    meta = json.loads((model_dir / META_FILE).read_text())
    metrics = _read_json(run_dir / "metrics.json") if run_dir else {}
    run = _read_json(run_dir / "run.json") if run_dir else {}
    saved = run_dir / "config.yaml" if run_dir else None
    config = read_yaml(saved, "the run's config") if saved and saved.is_file() else {}
    report = run_dir / "report" / "report.html" if run_dir else None
    if with_report and (report is None or not report.is_file()):
        raise UserError(f"--with-report: {model_or_run} has no report/report.html; build it with mlabel report RUN_DIR")
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, out / name)
    card = model_card(meta, repo_id, metrics, run, config)
    names = [*MODEL_FILES, "README.md"]
    if timm_refusal(model) is None:  # a linear head: plain timm users get the network too
        names += _stage_timm(model, out)
        card += _TIMM_USE.format(repo_id=repo_id)
    (out / "README.md").write_text(card, encoding="utf-8")
    if with_report:
        shutil.copyfile(report, out / "report.html")
        names.append("report.html")
    return names


# timm's weights beside mlabel's own model.safetensors: config.json names them (hf_hub_filename),
# which timm's hf-hub: loader follows
TIMM_HUB_WEIGHTS = "timm_model.safetensors"
_TIMM_USE = """
## Use with timm alone

```python
import timm
net = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()   # logits, one per label
cfg = timm.data.resolve_data_config({{}}, model=net)                  # the preprocessing mlabel evaluates with
transform = timm.data.create_transform(**cfg)
```

`net.pretrained_cfg["label_names"]` names the outputs. The per-label thresholds and the calibration are in
`config.json` under `"mlabel"`: a label is present when its probability (`sigmoid(logit)`, or with a calibration
`sigmoid(scale * logit + bias)`) is at or above its threshold.
"""


def _stage_timm(model, out: Path) -> list[str]:
    """timm's ``config.json`` and weights (as ``mlabel export --format timm`` writes them) into ``out``."""
    from .export import export_timm
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_timm(model, Path(tmp) / "timm", weights_name=TIMM_HUB_WEIGHTS)
        for name in ("config.json", TIMM_HUB_WEIGHTS):
            shutil.copyfile(folder / name, out / name)
    return ["config.json", TIMM_HUB_WEIGHTS]


def push(model_or_run: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         with_report: bool = False, dry_run: str | Path | None = None) -> str:
    """Upload the model and its card to ``repo_id`` (or with ``dry_run``, write the folder that
    would be uploaded there and upload nothing); returns where it went."""
    check_repo_id(repo_id)
    if dry_run is not None:
        target = Path(dry_run)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UserError(f"--dry-run {target}: exists and is not an empty folder; give a new folder")
        with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
            stage(model_or_run, repo_id, Path(tmp) / "stage", with_report)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.rmdir()
            shutil.move(str(Path(tmp) / "stage"), str(target))
        return str(target)
    hub = hub_module()
    with tempfile.TemporaryDirectory() as tmp:
        stage(model_or_run, repo_id, Path(tmp), with_report)  # validated before any upload
        api = hub.HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision,
                          commit_message="mlabel push: model, thresholds and card")
    return f"https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else "")


# --------------------------------------------------------------------------- pull and hf:// loads

def pull(repo_id: str, out: str | Path, revision: str | None = None) -> Path:
    """Copy the model of ``repo_id`` into ``out`` after it passed a local load's validation;
    nothing is written to ``out`` when it fails."""
    from .models import load
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; give a new folder")
    folder = snapshot(repo_id, revision)
    load(folder)  # checksum, metadata, weights
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for name in MODEL_FILES:
            shutil.copyfile(folder / name, staged / name)
        if (folder / "README.md").is_file():
            shutil.copyfile(folder / "README.md", staged / "README.md")
        if out.exists():
            out.rmdir()
        staged.rename(out)
    return out


# --------------------------------------------------------------------------- commands

def push_main(argv: list[str]) -> int:
    """``mlabel push``; the command line runs it under its error policy."""
    parser = ArgumentParser(prog="mlabel push", description="Upload a model and its card to the Hugging Face Hub.")
    parser.add_argument("model", help="a model directory or a run directory")
    parser.add_argument("repo_id", help="OWNER/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="a branch to upload to (created when missing)")
    parser.add_argument("--with-report", action="store_true", help="also upload the run's report.html")
    parser.add_argument("--dry-run", metavar="DIR", help="write the folder that would be uploaded into DIR; upload nothing")
    args = parser.parse_args(argv)
    where = push(args.model, args.repo_id, private=args.private, revision=args.revision,
                 with_report=args.with_report, dry_run=args.dry_run)
    print(f"{'written (dry run)' if args.dry_run else 'pushed'}: {where}")
    return 0


def pull_main(argv: list[str]) -> int:
    """``mlabel pull``; the command line runs it under its error policy."""
    parser = ArgumentParser(prog="mlabel pull", description="Download a model from the Hugging Face Hub.")
    parser.add_argument("repo_id", help="OWNER/NAME[@REVISION] on the Hub")
    parser.add_argument("--out", required=True, help="a new folder for the model")
    parser.add_argument("--revision", help="a branch, tag or commit")
    args = parser.parse_args(argv)
    repo, _, at = args.repo_id.partition("@")
    print(f"model: {pull(repo, args.out, args.revision or at or None)}")
    return 0
