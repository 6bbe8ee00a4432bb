"""``mlabel audit`` against injected label noise: does it find the wrong labels, and does fixing them pay?

    pip install cleanlab      # the cleanlab reference only (AGPL: benchmark-only, never an mlabel dependency)
    python benchmarks/audit.py [--sets quickstart,miml,digits] [--scale 1.0] [--folds 5] [--seed 0] [--budget fast]
                               [--loop] [--loop-sets quickstart] [--work DIR]
    python benchmarks/audit.py --sets quickstart --scale 0.2          # a quick look (about a minute)
    python benchmarks/audit.py --sets quickstart --feature-sizes 224  # also audit on 224-px features

For each data set with clean labels it injects noise into the train and val labels, seeded: 5 % of
the positives removed (missing labels, 1 -> 0) and one spurious positive on 2 % of the images (a
random absent label, 0 -> 1). The noisy label files go under --work (never into the data's own
folder); ``mlabel.audit.audit`` runs on the set's recipe with them (``--budget``, fast by default; K folds) and
the table gives, per set, kind and ranking:

  R@k     recall among the top k cells of that kind, k = the number injected; with k the number
          injected it is also the precision at k (hits / k both)
  AUROC   of the score over all known cells of that kind (given 0 for missing, given 1 for spurious),
          sklearn.metrics.roc_auc_score
  flag    where the ranking also flags a set of its own (the audit's issues.csv: the model disagrees at
          the label's threshold; cleanlab's filter): how many, precision, recall
and per audit the out-of-fold macro AP against the clean and the noisy labels (the model behind every
ranking), the wall time, and the missing and spurious counts summary.json's noise rates add up to.

Every ranking is computed on the same out-of-fold probabilities (``result.probs``) of the one audit:

  audit         the audit's own suspicion (``result.missing`` / ``result.spurious``)
  NAME          every scoring ``mlabel.audit.suspicion`` offers, recomputed on ``result.probs``
  |given-p|     the plain reference: p for a given 0, 1 - p for a given 1, across all labels
  cleanlab      cleanlab.multilabel_classification, mapped to cells: per class, the cells its filter
                (``filter.find_multilabel_issues_per_class``, prune_by_noise_rate) flags come first,
                then the others; within each group lowest per-class label quality first
                (``rank.get_label_quality_scores_per_class``, self_confidence). cleanlab's per-image
                API (``filter.find_label_issues``, ``rank.get_label_quality_scores``) aggregates these
                same per-class scores into one score per image and cannot say which label is wrong.
  cleanlab-adj  ``get_label_quality_scores_per_class(method="normalized_margin", adjust_pred_probs=True)``,
                cleanlab's option against class imbalance (quality alone, no filter)
  audit-visible (quickstart) the audit's ranking once more without the clean positives whose shape the
                scene shows less than a quarter of (``mlabel.data.synthetic.scene_visibility``: covered by
                shapes drawn over it), whose clean label says 1 where a reviewer would say 0

``--loop`` closes the loop on ``--loop-sets``: trains the set's recipe (``--loop-epochs``, default 2;
``--loop-seeds`` trainings per label file, default 1, the mean printed) on
the noisy labels, on the noisy labels with the audit's top-k suggestions of each kind accepted (the
first k rows of each kind of its issues.csv into one corrections.csv with ``decision=fix``,
applied by ``mlabel audit apply --split train`` and ``--split val``), and on the clean labels, and prints the test mAP of each
(the test labels are never noisy) and the share of the lost mAP recovered,
(corrected - noisy) / (clean - noisy). ``--loop-from`` also audits with the noisy run's backbone
(``--from RUN``) and trains on its corrections. The audit's wall time is printed per set; with ``--loop`` also as a
ratio to the noisy training run measured in the same process.

Data sets (written under --work, default a temporary folder; reused when already there):
  quickstart  the quickstart recipe's own generated scenes (3,000 train, 600 val, 1,000 test; 64 px,
              6 labels); the quickstart recipe
  miml        ../shared/data/miml-scene (2,000 photos, 5 labels) in benchmarks/defaults.py's seeded
              60/15/25 split; the miml_scene recipe (224 px); skipped with a message when absent
  digits      benchmarks/defaults.py's digit canvases (3,000/800/1,500, 64 px, 10 labels); the quickstart
              recipe's model with ``data.augment=light`` (a digit has an up)
``--feature-sizes 224`` adds audits whose features are computed at that input size
(``data.image_size=224``: an ImageNet backbone sees small images at the size it was trained on).
``--scale`` keeps that share of each split's rows (the first ones) for a quick run.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import SHARED, digit_canvases, miml_scenes  # noqa: E402  (the same sets, not copies)

MISSING, SPURIOUS = 1, 2  # codes of the injected cells in a (N, L) int8 "truth" array
KINDS = {"missing": MISSING, "spurious": SPURIOUS}


@dataclass
class Bench:
    """One data set: its recipe, the overrides that point the recipe at the set's files, and the
    clean label files (absolute paths; names in them are relative to ``root``)."""
    name: str
    recipe: str
    root: str
    files: dict  # split -> absolute CSV path (clean labels)
    extra: list = field(default_factory=list)
    hidden: np.ndarray | None = None  # (train+val rows, L) bool: a clean positive the image barely shows

    def overrides(self, files: dict) -> list[str]:
        """The recipe's overrides that train on ``files`` (split -> CSV) instead of the clean ones."""
        chosen = {**self.files, **files}
        return [*self.extra, f"data.root={self.root}", *(f"data.{s}={chosen[s]}" for s in ("train", "val", "test"))]


def read_table(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(header, image names, targets (N, L) int8) of a one-hot CSV."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [r[0] for r in rows[1:]], np.array([[int(v) for v in r[1:]] for r in rows[1:]], np.int8)


def write_table(path: Path, header: list[str], names: list[str], targets: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([name, *map(int, row)] for name, row in zip(names, targets))
    return path


def shrink(files: dict, folder: Path, scale: float) -> dict:
    """Copies of the split files in ``folder`` holding the first ``scale`` share of each one's rows."""
    out = {}
    for split, path in files.items():
        header, names, targets = read_table(Path(path))
        keep = max(1, int(len(names) * scale))
        out[split] = str(write_table(folder / f"{split}.csv", header, names[:keep], targets[:keep]))
    return out


def quickstart_bench(folder: Path, scale: float, visible: float = 0.25) -> Bench:
    """The quickstart's scenes; ``hidden`` marks the labelled shapes less than ``visible`` of which
    the image shows (covered by shapes drawn over them)."""
    from mlabel.data.synthetic import ensure_scenes, scene_visibility, scenes_root
    root = ensure_scenes(scenes_root(".", None))  # the recipe's own set, drawn once into the cache
    files = shrink({s: str(root / f"{s}.csv") for s in ("train", "val", "test")}, folder / "clean", scale)
    shares = scene_visibility()
    rows = {s: len(read_table(Path(files[s]))[1]) for s in ("train", "val")}
    hidden = np.concatenate([shares[s][:rows[s]] < visible for s in ("train", "val")])  # NaN (absent): False
    return Bench("quickstart", "quickstart", str(root), files, ["data.generate=null"], hidden)


def miml_bench(folder: Path, scale: float) -> Bench | None:
    if not (SHARED / "miml-scene" / "labels.csv").is_file():
        print(f"miml: skipped, {SHARED / 'miml-scene'} is absent")
        return None
    data = miml_scenes(folder / "clean", scale)
    return Bench("miml", "miml_scene", data["root"], {s: data[s] for s in ("train", "val", "test")})


def digits_bench(folder: Path, scale: float) -> Bench:
    clean = folder / "clean"
    if not (clean / "test.csv").is_file():
        digit_canvases(clean, scale)
    return Bench("digits", "quickstart", str(clean), {s: str(clean / f"{s}.csv") for s in ("train", "val", "test")},
                 ["data.generate=null", "data.augment=light"])


BUILDERS = {"quickstart": quickstart_bench, "miml": miml_bench, "digits": digits_bench}


def inject_noise(targets: np.ndarray, seed: int, missing: float = 0.05, spurious: float = 0.02):
    """Noisy copy of ``targets`` (N, L) and the truth (N, L) int8: MISSING where a positive was
    removed, SPURIOUS where an absent label was set; a spurious cell is never a removed one."""
    rng = np.random.default_rng(seed)
    noisy, truth = targets.copy(), np.zeros_like(targets, np.int8)
    rows, cols = np.nonzero(targets == 1)
    drop = rng.choice(len(rows), round(missing * len(rows)), replace=False)
    noisy[rows[drop], cols[drop]], truth[rows[drop], cols[drop]] = 0, MISSING
    open_rows = np.flatnonzero((targets == 0).any(1))
    for i in rng.choice(open_rows, round(spurious * len(targets)), replace=False):
        j = rng.choice(np.flatnonzero(targets[i] == 0))
        noisy[i, j], truth[i, j] = 1, SPURIOUS
    return noisy, truth


@dataclass
class Noisy:
    """The audited rows (train then val) of one set: clean and noisy targets, truth, noisy files."""
    header: list
    names: list
    sizes: dict  # split -> rows
    clean: np.ndarray
    noisy: np.ndarray
    truth: np.ndarray
    files: dict  # split -> noisy CSV


def make_noisy(bench: Bench, folder: Path, seed: int) -> Noisy:
    tables = {s: read_table(Path(bench.files[s])) for s in ("train", "val")}
    header = tables["train"][0]
    clean = np.concatenate([t[2] for t in tables.values()])
    noisy, truth = inject_noise(clean, seed)
    sizes = {s: len(t[1]) for s, t in tables.items()}
    parts = np.split(noisy, [sizes["train"]])
    files = {s: str(write_table(folder / "noisy" / f"{s}.csv", header, tables[s][1], part))
             for s, part in zip(("train", "val"), parts)}
    return Noisy(header, [n for t in tables.values() for n in t[1]], sizes, clean, noisy, truth, files)


def run_audit(bench: Bench, noisy: Noisy, out: Path, args, from_run: Path | None = None,
              feature_size: int | None = None) -> tuple[object, float]:
    """The audit on the noisy recipe with ``args.budget`` (fast: features from ``from_run``'s backbone
    when given, computed at ``feature_size`` when given, else the audit's default); (result, wall seconds)."""
    from mlabel.audit import audit
    start = time.perf_counter()
    result = audit(bench.recipe, bench.overrides(noisy.files), out=str(out), folds=args.folds, budget=args.budget,
                   feature_size=feature_size,
                   from_run=None if from_run is None else str(from_run), seed=args.seed, quiet=True)
    return result, time.perf_counter() - start


def check_rows(result, noisy: Noisy) -> None:
    """The audit's rows are the noisy files' rows in their order (train then val)."""
    if len(result.paths) != len(noisy.names) or not all(
            str(p).replace("\\", "/").endswith(n) for p, n in zip(result.paths, noisy.names)):
        raise SystemExit(f"the audit's {len(result.paths)} rows are not the {len(noisy.names)} train+val rows in order")
    if not np.array_equal(np.asarray(result.given), noisy.noisy):
        raise SystemExit("the audit's given labels differ from the noisy files")


def plain_scores(probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|given - p| per cell, split by kind (NaN where the kind does not apply)."""
    return np.where(given == 0, probs, np.nan), np.where(given == 1, 1 - probs, np.nan)


def cleanlab_scores(probs: np.ndarray, given: np.ndarray, adjusted: bool = False):
    """cleanlab's per-class view as cell scores (higher: more suspect); None when not installed.

    Plain: flagged by its per-class filter (+1) then 1 - per-class self-confidence quality.
    Adjusted: 1 - normalized_margin quality on imbalance-adjusted probabilities, no filter."""
    try:
        from cleanlab.multilabel_classification import filter as cl_filter, rank as cl_rank
    except ImportError:
        return None
    labels = [list(np.flatnonzero(row == 1)) for row in given]  # cleanlab has no unknown cells
    kwargs = {"method": "normalized_margin", "adjust_pred_probs": True} if adjusted else {}
    quality = np.asarray(cl_rank.get_label_quality_scores_per_class(labels, probs, **kwargs))  # (N, L)
    score = 1 - quality
    if not adjusted:
        score = score + np.asarray(cl_filter.find_multilabel_issues_per_class(labels, probs))  # (N, L) bool
    return np.where(given == 0, score, np.nan), np.where(given == 1, score, np.nan)


def rankings(result, cleanlab: bool = True) -> dict:
    """Ranking name -> (missing (N, L), spurious (N, L)) scores, all on ``result.probs``."""
    from mlabel.audit import suspicion
    probs, given = np.asarray(result.probs, np.float64), np.asarray(result.given)
    out = {"audit": (np.asarray(result.missing), np.asarray(result.spurious))}
    for name in scoring_names():
        out[name] = suspicion(probs, given, scoring=name)
    out["|given-p|"] = plain_scores(probs, given)
    if cleanlab:
        found = cleanlab_scores(probs, given)
        if found is None:
            print("cleanlab: skipped, not installed (pip install cleanlab)")
        else:
            out["cleanlab"] = found
            out["cleanlab-adj"] = cleanlab_scores(probs, given, adjusted=True)
    return out


def scoring_names() -> list[str]:
    """Every scoring ``mlabel.audit.suspicion`` offers (its SCORINGS registry)."""
    import mlabel.audit as audit_module
    registry = getattr(audit_module, "SCORINGS", None)
    return list(registry) if registry is not None else []


def top_k(score: np.ndarray, candidates: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Flat indices of the k highest-scoring candidate cells (ties broken at random, seeded)."""
    flat = np.flatnonzero(candidates.ravel())
    values = np.nan_to_num(score.ravel()[flat].astype(np.float64), nan=-np.inf)
    jitter = np.random.default_rng(seed).random(len(flat))
    return flat[np.lexsort((jitter, -values))[:k]]


def kind_figures(score: np.ndarray, given: np.ndarray, truth: np.ndarray, kind: str,
                 left_out: np.ndarray | None = None) -> dict:
    """R@k and AUROC of one kind's score over the known cells of that kind (less ``left_out``)."""
    code = KINDS[kind]
    candidates = (given == (0 if kind == "missing" else 1)) & (True if left_out is None else ~left_out)
    hits = (truth == code) & candidates
    k = int(hits.sum())
    top = top_k(score, candidates, k)
    values = np.nan_to_num(score[candidates].astype(np.float64), nan=-1e9)
    return {"k": k, "recall": float(hits.ravel()[top].mean()) if k else float("nan"),
            "auroc": float(roc_auc_score(hits[candidates], values)) if k else float("nan")}


def flag_figures(flagged: np.ndarray, truth: np.ndarray, kind: str) -> dict:
    """A ranking's own flagged set of one kind (N, L bool): its size, precision and recall."""
    hits = truth == KINDS[kind]
    tp = int((flagged & hits).sum())
    return {"flagged": int(flagged.sum()), "precision": tp / max(1, int(flagged.sum())),
            "recall_flag": tp / max(1, int(hits.sum()))}


def own_flags(name: str, scores: tuple, result) -> tuple | None:
    """(missing, spurious) cells a ranking flags itself: the audit's issues.csv (the model
    disagrees at the label's threshold), cleanlab's filter (score above 1); None for the others."""
    if name == "audit":
        probs, given, t = np.asarray(result.probs), np.asarray(result.given), np.asarray(result.thresholds)
        return (given == 0) & (probs >= t), (given == 1) & (probs < t)
    if name == "cleanlab":
        return tuple(np.nan_to_num(s, nan=0) > 1 for s in scores)
    return None


def evaluate(ranked: dict, result, truth: np.ndarray, hidden: np.ndarray | None = None) -> list[dict]:
    """One row per ranking and kind: R@k, AUROC and, where the ranking flags cells itself, its flags.
    With ``hidden`` the audit's ranking also once more without the clean positives the images barely
    show (ranking ``audit-visible``): their clean label says 1 where a reviewer would say 0."""
    given = np.asarray(result.given)
    rows = []
    for name, scores in ranked.items():
        flags = own_flags(name, scores, result)
        for index, kind in enumerate(("missing", "spurious")):
            row = {"ranking": name, "kind": kind, **kind_figures(scores[index], given, truth, kind)}
            if flags is not None:
                row.update(flag_figures(flags[index], truth, kind))
            rows.append(row)
    if hidden is not None:
        rows += [{"ranking": "audit-visible", "kind": kind,
                  **kind_figures(ranked["audit"][index], given, truth, kind, left_out=hidden)}
                 for index, kind in enumerate(("missing", "spurious"))]
    return rows


def model_quality(result, noisy: "Noisy") -> tuple[float, float]:
    """Macro AP of the out-of-fold probabilities against the clean and against the noisy labels:
    how good the model behind the ranking is (the ranking cannot beat it)."""
    probs = np.asarray(result.probs)
    return tuple(float(np.mean([average_precision_score(t[:, j], probs[:, j]) for j in range(t.shape[1])]))
                 for t in (noisy.clean, noisy.noisy))


def print_table(set_name: str, rows: list[dict], label: str) -> None:
    for row in rows:
        flag = (f"{row['flagged']:>9}{row['precision']:>7.3f}{row['recall_flag']:>7.3f}" if "flagged" in row else "")
        print(f"{set_name:<12}{label:<16}{row['kind']:<10}{row['ranking']:<14}{row['k']:>5}{row['recall']:>7.3f}"
              f"{row['auroc']:>7.3f}{flag}", flush=True)


def write_corrections(audit_dir: Path, noisy: Noisy, folder: Path) -> dict:
    """corrections.csv accepting (decision=fix) the first k rows of each kind of the audit's own
    issues.csv (k = the number injected of that kind), as a reviewer who accepts every suggestion;
    returns split -> that file, or None for a split none of whose rows was corrected."""
    with open(audit_dir / "issues.csv", newline="") as handle:
        issues = list(csv.DictReader(handle))
    accepted = []
    for kind, code in KINDS.items():
        accepted += [r for r in issues if r["kind"] == kind][:int((noisy.truth == code).sum())]
    path = folder / "corrections.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "decision"])
        writer.writerows([r["image"], r["label"], "fix"] for r in accepted)
    train_names = set(noisy.names[:noisy.sizes["train"]])
    in_train = [_short(r["image"], train_names) is not None for r in accepted]
    return {"train": path if any(in_train) else None, "val": path if not all(in_train) else None}


def _short(image: str, names: set) -> str | None:
    """The name in ``names`` that the listed image path ends with (the CSV's relative name), if any."""
    parts = image.replace("\\", "/").split("/")
    return next((tail for tail in ("/".join(parts[-i:]) for i in range(1, len(parts) + 1)) if tail in names), None)


def corrected_files(audit_dir: Path, corrections: dict, noisy: Noisy, folder: Path) -> dict:
    """The noisy train and val files with the corrections written by ``mlabel audit apply --split``
    (a split without corrections keeps its noisy file)."""
    files = {}
    for split in ("train", "val"):
        if corrections[split] is None:
            files[split] = noisy.files[split]
            continue
        out = folder / f"{split}.csv"
        done = subprocess.run([sys.executable, "-m", "mlabel.audit", "apply", str(audit_dir), str(corrections[split]),
                               "--out", str(out), "--split", split], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mlabel audit apply failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        files[split] = str(out)
    return files


def check_corrected(files: dict, noisy: Noisy) -> None:
    """Print how many injected cells the corrected files fixed and how many clean cells they broke."""
    fixed = np.concatenate([read_table(Path(files[s]))[2] for s in ("train", "val")])
    repaired = int(((fixed == noisy.clean) & (noisy.truth > 0)).sum())
    broken = int(((fixed != noisy.clean) & (noisy.truth == 0)).sum())
    print(f"{'':<12}corrected files: {repaired} of {int((noisy.truth > 0).sum())} injected cells repaired, "
          f"{broken} clean cells changed", flush=True)


def train(bench: Bench, files: dict, out: Path, epochs: int, seed: int = 0) -> tuple[float, float]:
    """The set's recipe on ``files`` in a fresh process with ``seed=SEED`` (the initialisation and
    augmentation; the splits are files); (test mAP, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlabel.train", bench.recipe, *bench.overrides(files),
                           f"train.epochs={epochs}", f"seed={seed}", f"out_dir={out}", "overwrite=true"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training {out.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())["test"]["mAP"], seconds


def audit_and_print(bench: Bench, noisy: Noisy, args, label: str, from_run: Path | None = None,
                    feature_size: int | None = None):
    """Audit (``args.budget``), print its table and model quality, save the figures; (result, seconds)."""
    folder = args.work / bench.name
    result, seconds = run_audit(bench, noisy, folder / f"audit-{label}", args, from_run, feature_size)
    check_rows(result, noisy)
    rows = evaluate(rankings(result, cleanlab=from_run is None or args.all_rankings), result, noisy.truth,
                    bench.hidden)
    print_table(f"{bench.name}", rows, label)
    clean_ap, noisy_ap = model_quality(result, noisy)
    print(f"{bench.name:<12}{label}: {len(noisy.names)} images, {seconds:.1f} s; out-of-fold macro AP against the "
          f"clean labels {clean_ap:.3f}, against the noisy ones {noisy_ap:.3f}", flush=True)
    estimated = estimated_counts(result.summary)
    print(f"{bench.name:<12}{label}: summary.json's noise rates estimate {estimated['missing']:.0f} missing "
          f"(injected {int((noisy.truth == MISSING).sum())}) and {estimated['spurious']:.0f} spurious "
          f"(injected {int((noisy.truth == SPURIOUS).sum())})", flush=True)
    (folder / f"figures-{label}.json").write_text(json.dumps(
        {"rows": rows, "seconds": seconds, "images": len(noisy.names), "ap_clean": clean_ap, "ap_noisy": noisy_ap,
         "estimated": estimated}))
    return result, seconds


def estimated_counts(summary: dict) -> dict:
    """Cells of each kind the audit's per-label noise-rate estimates add up to (rate x given cells)."""
    per_label = summary.get("per_label", {}).values()
    return {"missing": sum((v["missing_rate"]["estimate"] or 0) * v["given_negative"] for v in per_label),
            "spurious": sum((v["spurious_rate"]["estimate"] or 0) * v["given_positive"] for v in per_label)}


def trainings(bench: Bench, files: dict, out: Path, args) -> tuple[float, float, list]:
    """``--loop-seeds`` trainings on ``files`` (seed=0, 1, ...; the first into ``out``):
    (mean test mAP, seconds per training, each test mAP)."""
    done = [train(bench, files, out if seed == 0 else out.with_name(f"{out.name}-seed{seed}"), args.loop_epochs, seed)
            for seed in range(args.loop_seeds)]
    maps = [m for m, _ in done]
    return float(np.mean(maps)), float(np.mean([t for _, t in done])), maps


def close_loop(bench: Bench, noisy: Noisy, args, audit_seconds: float) -> None:
    """Train on noisy labels; with --loop-from audit again with that run's backbone (--from); train on
    the labels corrected by each audit's top k and on the clean labels (each --loop-seeds times);
    print test mAP and the share of the lost mAP recovered."""
    folder = args.work / bench.name
    runs = {"noisy": trainings(bench, noisy.files, folder / "runs" / "noisy", args)}
    audits = ["pretrained"]
    if args.loop_from:
        audit_and_print(bench, noisy, args, "from-noisy-run", folder / "runs" / "noisy")
        audits.append("from-noisy-run")
    for label in audits:
        audit_dir, fixed = folder / f"audit-{label}", folder / f"corrected-{label}"
        fixed.mkdir(parents=True, exist_ok=True)
        files = corrected_files(audit_dir, write_corrections(audit_dir, noisy, fixed), noisy, fixed)
        check_corrected(files, noisy)
        runs[f"fixed by {label}"] = trainings(bench, files, folder / "runs" / f"corrected-{label}", args)
    runs["clean"] = trainings(bench, {}, folder / "runs" / "clean", args)
    print_loop(bench.name, runs, audit_seconds)
    (folder / "loop.json").write_text(json.dumps({k: {"mAP": v[0], "seconds": v[1], "each": v[2]}
                                                  for k, v in runs.items()}))


def print_loop(name: str, runs: dict, audit_seconds: float) -> None:
    """Test mAP per training and the share of the mAP lost to the noise that each one recovers."""
    lost = runs["clean"][0] - runs["noisy"][0]
    for run, (mean_ap, seconds, each) in runs.items():
        share = (mean_ap - runs["noisy"][0]) / lost if lost > 0 else float("nan")
        spread = f"  (each: {', '.join(f'{m:.4f}' for m in each)})" if len(each) > 1 else ""
        print(f"{name:<12}loop: trained on {run:<26} test mAP {mean_ap:.4f}  recovered {share:>5.2f}  "
              f"{seconds:.0f} s a training{spread}", flush=True)
    print(f"{name:<12}audit (pretrained features) / one training: {audit_seconds / runs['noisy'][1]:.2f}")


def bench_one(name: str, args) -> None:
    bench = BUILDERS[name](args.work / name, args.scale)
    if bench is None:
        return
    noisy = make_noisy(bench, args.work / name, args.seed)
    print(f"{name:<12}{len(noisy.names)} train+val images, {len(noisy.header) - 1} labels: "
          f"{int((noisy.truth == MISSING).sum())} positives removed, {int((noisy.truth == SPURIOUS).sum())} spurious added")
    _, seconds = audit_and_print(bench, noisy, args, "pretrained" if args.budget == "fast" else "full")
    for size in filter(None, args.feature_sizes.split(",")):
        audit_and_print(bench, noisy, args, f"pretrained@{size}", feature_size=int(size))
    if args.loop and name in args.loop_sets.split(","):
        close_loop(bench, noisy, args, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="quickstart,miml,digits")
    parser.add_argument("--scale", type=float, default=1.0, help="share of each split's rows")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the audit")
    parser.add_argument("--budget", choices=("fast", "full"), default="fast",
                        help="full: K trainings with the recipe per audit (slow)")
    parser.add_argument("--loop", action="store_true", help="train on noisy, corrected and clean labels")
    parser.add_argument("--loop-sets", default="quickstart")
    parser.add_argument("--loop-epochs", type=int, default=2)
    parser.add_argument("--loop-seeds", type=int, default=1, help="trainings per label file (seed=0, 1, ...)")
    parser.add_argument("--loop-from", action="store_true",
                        help="also audit with the noisy run's backbone (--from) and train on its corrections")
    parser.add_argument("--feature-sizes", default="", help="extra audits with features at S px (--feature-size S), e.g. 64,224")
    parser.add_argument("--all-rankings", action="store_true", help="the references for the --from audit too")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="mlabel-audit-"))
    print(f"work folder: {args.work}")
    print(f"{'data set':<12}{'features':<16}{'kind':<10}{'ranking':<14}{'k':>5}{'R@k':>7}{'AUROC':>7}"
          f"{'flagged':>9}{'prec.':>7}{'recall':>7}")
    for name in args.sets.split(","):
        bench_one(name, args)


if __name__ == "__main__":
    main()
