"""mlabel audit: out-of-fold suspicion finds injected label noise (and a shuffled ranking does
not), unknown cells are never flagged, reruns reuse the feature cache and give the same files,
corrections round trip through ``audit apply`` into a label file a run trains on, and every bad
input is one ``error:`` line with exit 2 and nothing written."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlabel
from mlabel.audit import AuditResult, audit, suspicion
from mlabel.audit.rank import SCORINGS, flagged_cells, label_thresholds, noise_rates, wilson_interval
from mlabel.cli import main as cli_main
from mlabel.data.formats import read_jsonl_table
from mlabel.data.tables import read_csv_table

LABELS = ["red", "green", "blue", "white"]
QUADRANTS = [(0, 0), (0, 16), (16, 0), (16, 16)]
COLOURS = [(230, 30, 30), (30, 220, 30), (40, 40, 235), (245, 245, 245)]
TINY = ["data.generate=null", "data.val=val.csv", "data.test=null", "model.backbone=test_resnet",
        "model.pretrained=false", "data.image_size=32", "data.num_workers=0", "data.batch_size=32"]


def _draw(rng: np.random.Generator, target: np.ndarray) -> Image.Image:
    """A dark noisy 32-px square; label j is a bright patch of colour j in quadrant j."""
    pixels = rng.normal(40, 12, (32, 32, 3))
    for j in np.flatnonzero(target):
        y, x = QUADRANTS[j]
        pixels[y + 3:y + 13, x + 3:x + 13] = COLOURS[j]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    """240 train + 60 val images; train labels with 10 positives removed and 8 added (the clean
    table kept), 6 train cells unknown. Returns (root, clean train targets, injected cells)."""
    root = tmp_path_factory.mktemp("audit-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(3)
    clean = {}
    for split, count in (("train", 240), ("val", 60)):
        targets = (rng.random((count, 4)) < 0.3).astype(int)
        for i, t in enumerate(targets):
            _draw(rng, t).save(root / "images" / f"{split}{i}.png")
        clean[split] = targets
    noisy = clean["train"].copy()
    pos, neg = np.argwhere(noisy == 1), np.argwhere(noisy == 0)
    missing = pos[rng.choice(len(pos), 10, replace=False)]
    spurious = neg[rng.choice(len(neg), 8, replace=False)]
    noisy[tuple(missing.T)], noisy[tuple(spurious.T)] = 0, 1
    unknown = [(5, 0), (5, 1), (17, 2), (40, 3), (41, 0), (99, 1)]
    for i, j in unknown:
        noisy[i, j] = -1
    for split, table in (("train", noisy), ("val", clean["val"])):
        with (root / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *LABELS])
            writer.writerows([f"images/{split}{i}.png", *row] for i, row in enumerate(table))
    return root, {"missing": missing, "spurious": spurious, "unknown": unknown}


@pytest.fixture(scope="module")
def audited(noisy_set, tmp_path_factory) -> AuditResult:
    root, _ = noisy_set
    out = tmp_path_factory.mktemp("audit-out") / "audit"
    return audit("quickstart", [f"data.root={root}", *TINY], out=out, folds=3, quiet=True)


def _recall_at_k(score: np.ndarray, cells: np.ndarray) -> float:
    """Share of ``cells`` among the len(cells) highest scores (NaN never listed)."""
    flat = np.where(np.isnan(score), -np.inf, score).ravel()
    top = np.argsort(-flat, kind="stable")[:len(cells)]
    wanted = set(np.ravel_multi_index(tuple(cells.T), score.shape).tolist())
    return len(wanted & set(top.tolist())) / len(cells)


def test_injected_noise_ranks_first_and_a_shuffled_ranking_does_not(audited, noisy_set):
    _, injected = noisy_set
    train = np.arange(240)  # train rows come first
    for kind, score in (("missing", audited.missing[train]), ("spurious", audited.spurious[train])):
        cells = injected[kind]
        chance = len(cells) / np.count_nonzero(~np.isnan(score))
        assert _recall_at_k(score, cells) >= 0.6 > 10 * chance, kind
        rng = np.random.default_rng(0)
        shuffled = np.where(np.isnan(score), np.nan, rng.permutation(score.ravel()).reshape(score.shape))
        assert _recall_at_k(shuffled, cells) < 0.6, kind


def test_result_contract_files_and_unknown_cells(audited, noisy_set):
    _, injected = noisy_set
    n = 300
    assert len(audited.paths) == n and audited.labels == LABELS
    assert audited.given.dtype == np.int8 and audited.probs.dtype == np.float32
    assert audited.probs.shape == audited.missing.shape == audited.spurious.shape == (n, 4)
    assert np.all((audited.probs >= 0) & (audited.probs <= 1))
    for i, j in injected["unknown"]:
        assert audited.given[i, j] == -1 and np.isnan(audited.missing[i, j]) and np.isnan(audited.spurious[i, j])
    assert np.array_equal(np.isnan(audited.missing), audited.given != 0)
    assert np.array_equal(np.isnan(audited.spurious), audited.given != 1)
    rows = list(csv.DictReader((audited.out / "issues.csv").open()))
    assert list(rows[0]) == ["image", "label", "given", "probability", "kind", "score", "rank"]
    unknown = {(audited.paths[i], LABELS[j]) for i, j in injected["unknown"]}
    assert not unknown & {(r["image"], r["label"]) for r in rows}
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:  # given 0 listed as missing only where p >= t, given 1 as spurious only where p < t
        t = audited.thresholds[LABELS.index(r["label"])]
        assert (r["kind"], r["given"]) in (("missing", "0"), ("spurious", "1"))
        assert (float(r["probability"]) >= t - 1e-6) == (r["kind"] == "missing")
    summary = json.loads((audited.out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(audited.summary)) and summary["scoring"] == "abs"
    assert summary["counts"]["issues"] == len(rows) and set(summary["per_label"]) == set(LABELS)
    assert (audited.out / "audit.html").stat().st_size > 1000


def test_model_quality_is_sklearns_ap_over_the_known_cells(audited):
    from sklearn.metrics import average_precision_score
    quality = audited.summary["model"]
    for j, name in enumerate(LABELS):
        known = audited.given[:, j] >= 0
        reference = average_precision_score(audited.given[known, j], audited.probs[known, j])
        assert quality["per_label_ap"][name] == pytest.approx(reference, abs=1e-4)
    assert quality["macro_ap"] == pytest.approx(np.mean(list(quality["per_label_ap"].values())), abs=1e-4)
    assert quality["macro_ap"] > 0.75  # a patch per label: the features see it, so no warning


def test_labels_the_images_do_not_show_warn_that_the_ranking_is_weak(noisy_set, tmp_path, capsys):
    """The same images with labels drawn at random: out-of-fold AP near the label rates, and the
    audit says its suspects are mostly its own mistakes and how to get a stronger model."""
    root, _ = noisy_set
    rng = np.random.default_rng(0)
    files = {}
    for split, count in (("train", 240), ("val", 60)):
        files[split] = (tmp_path / "labels").joinpath(f"{split}.csv")
        files[split].parent.mkdir(exist_ok=True)
        with files[split].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *LABELS])
            writer.writerows([f"images/{split}{i}.png", *(rng.random(4) < 0.3).astype(int)] for i in range(count))
    overrides = [f"data.root={root}", *TINY, f"data.train={files['train']}", f"data.val={files['val']}"]
    result = audit("quickstart", overrides, out=tmp_path / "audit", folds=3, quiet=True)
    assert result.summary["model"]["macro_ap"] < 0.5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and re.match(r"warning: .* macro AP 0\.\d\d \(below 0\.75\).*--from RUN", err[0]), err


def test_rerun_reuses_the_feature_cache_and_gives_the_same_files(audited, noisy_set):
    """What a kill -9 after the features leaves (the cache, no outputs): the rerun reads the cache
    and writes the same issues.csv byte for byte."""
    root, _ = noisy_set
    first = (audited.out / "issues.csv").read_bytes()
    for name in ("issues.csv", "summary.json", "suggestions.csv", "oof.npz"):
        (audited.out / name).unlink()
    again = audit("quickstart", [f"data.root={root}", *TINY], out=audited.out, folds=3, quiet=True)
    assert again.summary["cache_used"] is True
    assert (audited.out / "issues.csv").read_bytes() == first
    assert np.array_equal(again.probs, audited.probs)


def test_suspicion_scorings_against_references():
    rng = np.random.default_rng(1)
    probs = rng.random((50, 3)).astype(np.float32)
    given = rng.integers(-1, 2, (50, 3)).astype(np.int8)
    t = np.array([0.3, 0.5, 0.7])
    missing, spurious = suspicion(probs, given, "abs", t)
    expected = np.abs(given - probs.astype(np.float64))
    assert np.allclose(missing[given == 0], expected[given == 0])
    assert np.allclose(spurious[given == 1], expected[given == 1])
    missing, spurious = suspicion(probs, given, "margin", t)
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    assert np.allclose(missing[given == 0], (logit(probs) - logit(t))[given == 0], atol=1e-5)
    assert np.allclose(spurious[given == 1], (logit(t) - logit(probs))[given == 1], atol=1e-5)
    for scoring in SCORINGS:
        missing, spurious = suspicion(probs, given, scoring, t)
        assert np.array_equal(np.isnan(missing), given != 0) and np.array_equal(np.isnan(spurious), given != 1)
    with pytest.raises(ValueError, match="unknown scoring"):
        suspicion(probs, given, "loud")


def test_flagged_cells_in_blocks_equal_one_pass(monkeypatch):
    from mlabel.audit import rank
    rng = np.random.default_rng(2)
    probs, given = rng.random((400, 7)).astype(np.float32), rng.integers(-1, 2, (400, 7)).astype(np.int8)
    t = label_thresholds(probs, given)
    whole = flagged_cells(probs, *suspicion(probs, given, "margin", t), t, top=50)
    monkeypatch.setattr(rank, "BLOCK_CELLS", 21)  # three rows a block
    blocked = flagged_cells(probs, *suspicion(probs, given, "margin", t), t, top=50)
    assert np.array_equal(whole.rows, blocked.rows) and np.array_equal(whole.cols, blocked.cols)


def test_calibration_per_fold_in_label_blocks_is_sklearns_platt_per_fold(monkeypatch):
    """Each fold's labels are fitted on their own (unknown cells left out), in blocks of labels or
    all at once: scikit-learn's unregularised logistic regression on that fold's logits."""
    from sklearn.linear_model import LogisticRegression
    from mlabel.audit import core
    rng = np.random.default_rng(4)
    given = (rng.random((600, 5)) < 0.3).astype(np.int8)
    given[rng.random(given.shape) < 0.05] = -1
    logits = rng.normal(np.where(given == 1, 1.0, -1.0) * [0.5, 1, 2, 3, 4], 1.2).astype(np.float32)
    fold = rng.integers(0, 3, 600)
    whole = core.calibrate_per_fold(logits, given, fold)
    monkeypatch.setattr(core, "BLOCK_CELLS", 400)  # two labels a block on a fold of about 200 rows
    blocked = core.calibrate_per_fold(logits, given, fold)
    np.testing.assert_allclose(blocked, whole, atol=1e-6)
    for k in range(3):
        for j in range(5):
            rows = (fold == k) & (given[:, j] >= 0)
            model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000)
            model.fit(logits[rows, j:j + 1].astype(np.float64), given[rows, j])
            reference = model.predict_proba(logits[fold == k, j:j + 1].astype(np.float64))[:, 1]
            np.testing.assert_allclose(blocked[fold == k, j], reference, atol=1e-4)


def test_noise_rates_and_wilson_interval():
    low, high = wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    assert np.allclose(low, [0.0, 0.2366, 0.7225], atol=1e-3) and np.allclose(high, [0.2775, 0.7634, 1.0], atol=1e-3)
    probs = np.array([[0.9, 0.1], [0.4, 0.8], [0.6, 0.3], [0.1, 0.9]], dtype=np.float32)
    given = np.array([[0, 1], [0, 1], [1, 0], [1, -1]], dtype=np.int8)
    rates = noise_rates(probs, given, np.array([0.5, 0.5]), ["a", "b"])
    # a: mean p of given positives 0.35, of given negatives 0.65: both negatives reach 0.35, both
    # positives are at most 0.65; at the threshold 0.5 only one of each disagrees
    a, b = rates["a"], rates["b"]
    assert (a["flagged_missing"], a["flagged_spurious"]) == (1, 1)
    assert (a["missing_rate"]["estimate"], a["spurious_rate"]["estimate"]) == (1.0, 1.0)
    # b: positives 0.1 and 0.8 (mean 0.45), one negative 0.3, one unknown
    assert (b["missing_rate"]["estimate"], b["spurious_rate"]["estimate"], b["unknown"]) == (0.0, 0.5, 1)
    assert b["spurious_rate"]["low"] < 0.5 < b["spurious_rate"]["high"]


def _corrections(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label", "decision"), *rows])
    return path


def test_corrections_round_trip_and_train_on_them(audited, noisy_set, tmp_path):
    root, _ = noisy_set
    listed = list(csv.DictReader((audited.out / "issues.csv").open()))
    train_rows = [r for r in listed if r["image"] in set(audited.paths[:240])]
    keep = _corrections(tmp_path / "keep.csv", [(r["image"], r["label"], "keep") for r in train_rows])
    assert cli_main(["audit", "apply", str(audited.out), str(keep), "--out", str(tmp_path / "same.csv")]) == 0
    assert (tmp_path / "same.csv").read_bytes() == (root / "train.csv").read_bytes()
    first, second = train_rows[0], train_rows[1]
    fix = _corrections(tmp_path / "fix.csv", [(first["image"], first["label"], "fix"),
                                              (second["image"], second["label"], "unknown")])
    assert cli_main(["audit", "apply", str(audited.out), str(fix), "--out", str(tmp_path / "new.csv")]) == 0
    before, after = (read_csv_table(root / "train.csv", root).targets,
                     read_csv_table(tmp_path / "new.csv", root).targets)
    i, j = audited.paths.index(first["image"]), LABELS.index(first["label"])
    k, m = audited.paths.index(second["image"]), LABELS.index(second["label"])
    expected = before.copy()
    expected[i, j] = 1 if first["kind"] == "missing" else 0
    expected[k, m] = -1
    assert np.array_equal(after, expected) and not np.array_equal(before, after)
    assert cli_main(["audit", "apply", str(audited.out), str(fix), "--out", str(tmp_path / "new.jsonl")]) == 0
    assert np.array_equal(read_jsonl_table(tmp_path / "new.jsonl", Path("/"), labels=LABELS).targets, expected)
    from mlabel.train import main as train_main
    assert train_main(["quickstart", f"data.root={root}", f"data.train={tmp_path / 'new.csv'}", *TINY,
                       "train.epochs=1", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
                       f"out_dir={tmp_path / 'run'}", "--quiet"]) == 0


def _fails(capsys, argv: list[str], *words: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])


def _unlisted(audited, listed) -> tuple[str, str]:
    seen = {(r["image"], r["label"]) for r in listed}
    return next((p, n) for p in audited.paths for n in LABELS if (p, n) not in seen)


def test_bad_corrections(audited, tmp_path, capsys):
    listed = list(csv.DictReader((audited.out / "issues.csv").open()))
    image, label = listed[0]["image"], listed[0]["label"]
    new = tmp_path / "new.csv"
    cases = [([(image[:-5] + "x.png", label, "fix")], "did you mean"),
             ([(image, label[:-1], "fix")], "did you mean"),
             ([(image, label, "fix"), (image, label, "keep")], "twice"),
             ([(image, label, "accept")], "keep"),
             ([_unlisted(audited, listed) + ("fix",)], "did not list")]
    for n, (rows, word) in enumerate(cases):
        _fails(capsys, ["audit", "apply", str(audited.out), str(_corrections(tmp_path / f"c{n}.csv", rows)),
                        "--out", str(new)], word)
        assert not new.exists()


def test_bad_audit_inputs(noisy_set, tmp_path, capsys):
    root, _ = noisy_set
    base = ["audit", "quickstart", f"data.root={root}", *TINY, "--quiet"]
    out = tmp_path / "out"
    _fails(capsys, [*base, "data.train=", "--out", str(out)], "data.train")
    _fails(capsys, [*base, "--folds", "200", "--out", str(out)], "--folds")
    _fails(capsys, [*base, "--out", str(root / "audit")], "inside the data folder")
    other = tmp_path / "other-model"
    mlabel.create_model("test_resnet", ["cat", "dog"], image_size=32).save_pretrained(other)
    _fails(capsys, [*base, "--from", str(other), "--out", str(out)], "labels")
    assert not out.exists() and not (root / "audit").exists()


def test_feature_size_rule_and_option(audited, noisy_set, tmp_path, capsys):
    """A pretrained backbone scores small images upscaled to 128 px (never past its own size); a
    backbone from scratch, or a run's model (--from), at the recipe's size; --feature-size wins."""
    from mlabel.audit.core import AuditSettings, feature_size
    assert feature_size(64, True, AuditSettings(), native=224) == 128  # the quickstart: 64 px, ImageNet weights
    assert feature_size(64, True, AuditSettings(), native=96) == 96
    assert feature_size(256, True, AuditSettings(), native=224) == 256
    assert feature_size(64, True, AuditSettings(from_run="runs/x"), native=224) == 64
    assert feature_size(64, False, AuditSettings(), native=224) == 64
    assert feature_size(64, True, AuditSettings(feature_size=160), native=224) == 160
    assert audited.summary["feature_size"] == 32 and audited.summary["settings"]["feature_size"] is None
    root, _ = noisy_set
    out = tmp_path / "sized"
    result = audit("quickstart", [f"data.root={root}", *TINY], out=out, folds=3, quiet=True, feature_size=48)
    assert result.summary["feature_size"] == 48
    cached = {p.name for p in (out / "cache").glob("features-*.npy")}
    assert len(cached) == 1 and cached.isdisjoint(p.name for p in (audited.out / "cache").glob("*.npy"))
    base = ["audit", "quickstart", f"data.root={root}", *TINY, "--quiet", "--out", str(tmp_path / "bad")]
    _fails(capsys, [*base, "--feature-size", "8"], "--feature-size 8")
    assert not (tmp_path / "bad").exists()


def test_python_m_and_callable_module(noisy_set, tmp_path):
    root, _ = noisy_set
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mlabel.audit", "quickstart", f"data.root={root}", *TINY,
                           "--folds", "99", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("error: --folds 99 is more than label")
    assert "use --folds" in done.stderr and not out.exists()
    import mlabel.audit as package
    assert callable(mlabel.audit) and mlabel.audit is package and package.suspicion is suspicion


@pytest.mark.slow
def test_full_budget_trains_one_model_per_fold(noisy_set, tmp_path, monkeypatch):
    """One model per fold, also with a relative --out; a rerun reuses a fold's finished model only
    for the same rows and labels: another seed (other folds) trains anew."""
    root, injected = noisy_set
    monkeypatch.chdir(tmp_path)
    keys = [f"data.root={root}", *TINY, "train.epochs=1", "thresholds.bootstrap=0"]
    result = audit("quickstart", keys, out="full", folds=2, budget="full", quiet=True)
    runs = sorted(p.name for p in (tmp_path / "full" / "folds").glob("run*"))
    assert [r.split("-")[0] for r in runs] == ["run0", "run1"]
    assert result.probs.shape == (300, 4) and np.array_equal(np.isnan(result.missing), result.given != 0)
    again = audit("quickstart", keys, out="full", folds=2, budget="full", quiet=True)
    assert sorted(p.name for p in (tmp_path / "full" / "folds").glob("run*")) == runs  # reused: same folds
    assert np.array_equal(again.probs, result.probs)
    audit("quickstart", keys, out="full", folds=2, budget="full", quiet=True, seed=1)
    assert len(list((tmp_path / "full" / "folds").glob("run*"))) == 4  # other folds: trained anew


@pytest.mark.slow
def test_kill_9_after_the_features_then_rerun_gives_the_same_result(audited, noisy_set, tmp_path):
    import signal
    import time
    root, _ = noisy_set
    out = tmp_path / "killed"
    args = [f"data.root={root}", *TINY]
    child = subprocess.Popen([sys.executable, "-m", "mlabel.audit", "quickstart", *args, "--folds", "3", "--quiet",
                              "--out", str(out)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not list((out / "cache").glob("features-*.npy")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    again = audit("quickstart", args, out=out, folds=3, quiet=True)
    assert again.summary["cache_used"] is True
    assert (out / "issues.csv").read_text() == (audited.out / "issues.csv").read_text()


def test_suggestions_follow_the_issues_on_the_page_with_ranks_of_their_own(audited, noisy_set):
    """issues.csv and suggestions.csv each rank from 1; on the page no two tiles share a rank."""
    import re

    from mlabel.audit import outputs
    _, injected = noisy_set
    issues = list(csv.reader((audited.out / "issues.csv").open()))[1:]
    suggested = [[audited.paths[i], LABELS[j], -1, "0.990000", "suggested_positive", "5.000000", rank]
                 for rank, (i, j) in enumerate(injected["unknown"][:2], start=1)]
    outputs._page(audited, [[*row[:-1], int(row[-1])] for row in issues], suggested)
    page = (audited.out / "audit.html").read_text()
    data = json.loads(re.search(r'id="audit-data">(.*?)</script>', page, re.S).group(1))
    ranks = [tile["rank"] for tile in data["tiles"]]
    assert ranks == list(range(1, len(issues) + 3))
    assert [tile["kind"] for tile in data["tiles"][-2:]] == ["suggested_positive"] * 2


def test_one_corrections_file_for_train_and_val_applies_per_split(audited, noisy_set, tmp_path, capsys):
    """The page downloads train and val decisions together: each split's apply takes its own rows
    and names how many it left to the other; a file with none of the split's rows is refused."""
    import shutil
    root, _ = noisy_set
    folder = tmp_path / "audit"  # the clean val set gives no issue: list one of its cells as the audit would
    shutil.copytree(audited.out, folder, ignore=shutil.ignore_patterns("cache"))
    n_train = len(list(csv.reader((root / "train.csv").open()))) - 1
    r, j = n_train + 1, 2
    given = int(audited.given[r, j])
    with (folder / "issues.csv").open("a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(
            [audited.paths[r], LABELS[j], given, "0.5", "spurious" if given else "missing", "0.1", 9999])
    summary = json.loads((folder / "summary.json").read_text())
    summary["counts"]["issues"] += 1  # as the audit would count it (apply checks the rows against the counts)
    (folder / "summary.json").write_text(json.dumps(summary))
    listed = list(csv.DictReader((folder / "issues.csv").open()))
    train = next(r for r in listed if audited.paths.index(r["image"]) < n_train)
    val = listed[-1]
    both = _corrections(tmp_path / "both.csv", [(r["image"], r["label"], "unknown") for r in (train, val)])
    for split, row, source in (("train", train, "train.csv"), ("val", val, "val.csv")):
        out = tmp_path / f"{split}.csv"
        capsys.readouterr()
        assert cli_main(["audit", "apply", str(folder), str(both), "--out", str(out), "--split", split]) == 0
        said = capsys.readouterr().out
        assert "1 cells changed" in said and "1 corrections concern" in said, said
        before, after = read_csv_table(root / source, root), read_csv_table(out, root)
        expected = before.targets.copy()
        expected[[Path(p) for p in before.paths].index(Path(row["image"])), LABELS.index(row["label"])] = -1
        assert np.array_equal(after.targets, expected)
    only_val = _corrections(tmp_path / "val_only.csv", [(val["image"], val["label"], "fix")])
    _fails(capsys, ["audit", "apply", str(folder), str(only_val), "--out", str(tmp_path / "x.csv")], "--split val")
    assert not (tmp_path / "x.csv").exists()


def _copy_of_audit(audited, tmp_path, cache: bool = False) -> tuple[Path, Path]:
    """A copy of the audit's folder (without the feature cache unless ``cache``) and a
    corrections.csv fixing its most suspect cell."""
    import shutil
    folder = tmp_path / "audit"
    shutil.copytree(audited.out, folder, ignore=None if cache else shutil.ignore_patterns("cache"))
    first = next(csv.DictReader((folder / "issues.csv").open()))
    return folder, _corrections(tmp_path / "c.csv", [(first["image"], first["label"], "fix")])


def test_apply_never_writes_over_its_own_inputs_or_the_audits_files(audited, tmp_path, capsys):
    folder, corrections = _copy_of_audit(audited, tmp_path)
    kept = {p: p.read_bytes() for p in [corrections, *folder.iterdir()]}
    for out in (corrections, folder / "issues.csv", folder / "suggestions.csv"):
        _fails(capsys, ["audit", "apply", str(folder), str(corrections), "--out", str(out)], "input")
    assert {p: p.read_bytes() for p in kept} == kept


def _damage(folder: Path, name: str, how: str) -> None:
    path = folder / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "header":
        path.write_text("a,b,c\n1,2,3\n")
    elif how == "rows cut":  # whole rows lost: every row that is left reads well
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    else:
        path.write_text(how)


@pytest.mark.parametrize("name, how", [("oof.npz", "truncate"), ("oof.npz", ""), ("summary.json", "truncate"),
                                       ("summary.json", "{}"), ("summary.json", "[]"), ("issues.csv", "header"),
                                       ("issues.csv", "truncate"), ("issues.csv", "rows cut"),
                                       ("suggestions.csv", "header"), ("suggestions.csv", "rows cut")])
def test_a_damaged_audit_folder_is_named_with_the_way_out(audited, tmp_path, capsys, name, how):
    folder, corrections = _copy_of_audit(audited, tmp_path)
    _damage(folder, name, how)
    _fails(capsys, ["audit", "apply", str(folder), str(corrections), "--out", str(tmp_path / "new.csv")],
           name, "run mlabel audit again")
    assert not (tmp_path / "new.csv").exists()


def test_apply_refuses_a_label_file_changed_since_the_audit(audited, noisy_set, tmp_path, capsys):
    import shutil
    root, _ = noisy_set
    folder = tmp_path / "audit"
    shutil.copytree(audited.out, folder, ignore=shutil.ignore_patterns("cache"))
    source = tmp_path / "labels" / "train.csv"  # the file the audit read, as a copy we may change
    source.parent.mkdir()
    shutil.copy(root / "train.csv", source)
    summary = json.loads((folder / "summary.json").read_text())
    summary["sources"][0]["file"] = str(source)
    (folder / "summary.json").write_text(json.dumps(summary))
    listed = [r for r in csv.DictReader((folder / "issues.csv").open()) if r["image"] in set(audited.paths[:240])]
    corrections = _corrections(tmp_path / "c.csv", [(listed[0]["image"], listed[0]["label"], "fix")])
    assert cli_main(["audit", "apply", str(folder), str(corrections), "--out", str(tmp_path / "ok.csv")]) == 0
    lines = source.read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:-1]))  # a row removed after the audit
    _fails(capsys, ["audit", "apply", str(folder), str(corrections), "--out", str(tmp_path / "new.csv")],
           str(source), "changed since the audit")
    source.unlink()
    _fails(capsys, ["audit", "apply", str(folder), str(corrections), "--out", str(tmp_path / "new.csv")],
           str(source), "gone")
    assert not (tmp_path / "new.csv").exists()


def test_audit_refuses_duplicates_image_folders_model_folders_and_bad_seeds(noisy_set, tmp_path, capsys):
    root, _ = noisy_set
    rows = (root / "train.csv").read_text().splitlines()
    elsewhere = tmp_path / "labels"  # a root of its own whose rows name the images where they are
    elsewhere.mkdir()
    absolute = [rows[0], *(f"{root / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows[1:])]
    (elsewhere / "train.csv").write_text("\n".join(absolute) + "\n")
    (elsewhere / "val.csv").write_text("\n".join([rows[0], *absolute[1:31]]) + "\n")  # val repeats train's rows
    base = ["audit", "quickstart", f"data.root={elsewhere}", *TINY, "--quiet"]
    assert cli_main([*base, "--out", str(tmp_path / "dup")]) == 2
    said = capsys.readouterr().err.strip().splitlines()  # the reader's own warning about the overlap, then the refusal
    assert said[-1].startswith("error: image ") and all(w in said[-1] for w in ("listed twice", "data.train row 1",
                                                                                "data.val row 1")), said
    (elsewhere / "val.csv").write_text("\n".join([rows[0]]) + "\n")
    base = ["audit", "quickstart", f"data.root={elsewhere}", *TINY, "data.val=null", "--quiet"]
    _fails(capsys, [*base, "--out", str(root / "images" / "audit")], "inside the data folder", str(root / "images"))
    model = tmp_path / "model"
    mlabel.create_model("test_resnet", LABELS, image_size=32).save_pretrained(model)
    _fails(capsys, [*base, "--out", str(model / "audit")], "model directory")
    _fails(capsys, [*base, "--seed", "-1", "--out", str(tmp_path / "seed")], "--seed -1")
    assert not any((tmp_path / n).exists() for n in ("dup", "seed")) and not (root / "images" / "audit").exists()
    assert not (model / "audit").exists()


def test_an_unreadable_image_found_while_scoring_leaves_no_folder(noisy_set, tmp_path, capsys):
    root, _ = noisy_set
    rows = (root / "train.csv").read_text().splitlines()
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing
    table = [rows[0], *(f"{root / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows[1:]),
             f"broken.png,{rows[1].split(',', 1)[1]}"]
    (labels / "train.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "out"
    _fails(capsys, ["audit", "quickstart", f"data.root={labels}", *TINY, "data.val=null", "--quiet", "--out", str(out)],
           "broken.png")
    assert not out.exists()


def test_with_on_bad_image_skip_an_unreadable_image_is_left_out_and_listed(noisy_set, tmp_path, capsys):
    root, _ = noisy_set
    rows = (root / "train.csv").read_text().splitlines()
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    broken = f"broken.png,{rows[1].split(',', 1)[1]}"
    table = [rows[0], *(f"{root / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows[1:]), broken]
    (labels / "train.csv").write_text("\n".join(table) + "\n")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "skipped.csv").write_text("split,path,reason\ntrain,stale.png,an earlier audit's\n")
    base = ["audit", "quickstart", f"data.root={labels}", *TINY, "data.val=null", "--quiet"]
    assert cli_main([*base, "data.on_bad_image=skip", "--out", str(out)]) == 0, capsys.readouterr().err
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert [(r["split"], Path(r["path"]).name) for r in skipped] == [("train", "broken.png")] and skipped[0]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["images"] == len(rows) - 1
    assert "broken.png" not in (out / "issues.csv").read_text() + (out / "suggestions.csv").read_text()
    first = next(csv.DictReader((out / "issues.csv").open()))
    fixed = tmp_path / "fixed.csv"
    corrections = _corrections(tmp_path / "c.csv", [(first["image"], first["label"], "fix")])
    assert cli_main(["audit", "apply", str(out), str(corrections), "--out", str(fixed)]) == 0
    new = fixed.read_text().splitlines()
    assert new[-1] == broken and sum(a != b for a, b in zip(new, table)) == 1  # the unreadable row stays as it was
    assert cli_main([*base, "--out", str(out)]) == 2  # data.on_bad_image=error: refused, naming the image
    assert "broken.png" in capsys.readouterr().err and (out / "skipped.csv").is_file()


def test_corrections_may_name_the_image_as_the_label_file_does(audited, noisy_set, tmp_path):
    root, _ = noisy_set
    listed = [r for r in csv.DictReader((audited.out / "issues.csv").open()) if r["image"] in set(audited.paths[:240])]
    row = listed[0]
    relative = os.path.relpath(row["image"], root)  # images/train17.png, as train.csv names it
    by_path = _corrections(tmp_path / "a.csv", [(row["image"], row["label"], "fix")])
    by_name = _corrections(tmp_path / "b.csv", [(relative, row["label"], "fix")])
    for corrections, out in ((by_path, "a-new.csv"), (by_name, "b-new.csv")):
        assert cli_main(["audit", "apply", str(audited.out), str(corrections), "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "a-new.csv").read_bytes() == (tmp_path / "b-new.csv").read_bytes()
    assert (tmp_path / "a-new.csv").read_bytes() != (root / "train.csv").read_bytes()


def test_one_audit_at_a_time_in_a_folder_and_a_killed_ones_temporaries_go(audited, noisy_set, tmp_path, capsys):
    from mlabel.rundir import hold_run_dir
    root, _ = noisy_set
    folder, corrections = _copy_of_audit(audited, tmp_path, cache=True)
    stale = [folder / "cache" / ".features-0123.npy.x1y2.tmp", folder / ".issues.csv.abcd.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with hold_run_dir(folder, "mlabel audit"):  # another audit holds the folder
        _fails(capsys, ["audit", "quickstart", f"data.root={root}", *TINY, "--quiet", "--folds", "3",
                        "--out", str(folder)], str(folder), "mlabel audit")
        _fails(capsys, ["audit", "apply", str(folder), str(corrections), "--out", str(tmp_path / "new.csv")],
               "mlabel audit")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not (tmp_path / "new.csv").exists()
    assert cli_main(["audit", "quickstart", f"data.root={root}", *TINY, "--quiet", "--folds", "3",
                     "--out", str(folder)]) == 0
    assert not any(p.exists() for p in stale) and not (folder / ".lock").exists()
    assert (folder / "issues.csv").read_bytes() == (audited.out / "issues.csv").read_bytes()
