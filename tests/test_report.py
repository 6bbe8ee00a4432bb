"""The report's explorer data, galleries, label structure and ``mlabel tune --from-json``; the
page itself in a real browser (marker ``browser``)."""
from __future__ import annotations

import base64
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlabel
from mlabel.report.explorer import BINS, EXACT_LIMIT, explorer_data, histogram_counts
from mlabel.report.gallery import PER_LABEL, error_galleries, image_losses
from mlabel.report.plots import cooccurrence


def _unpack(b64: str, dtype) -> np.ndarray:
    return np.frombuffer(gzip.decompress(base64.b64decode(b64)), dtype)


def _counts_from_cuts(cuts, tp, fp, t):
    """What report.js does: with k = number of (descending) cuts >= t, TP and FP are the sums of the first k."""
    k = int(np.sum(cuts.astype(np.float64) >= t))
    return int(tp[:k].sum()), int(fp[:k].sum()), int(tp.sum()), int(fp.sum())


def _scores(rng, n, n_labels):
    """Probabilities with ties, exact 0 and 1, values on the explorer's bin edges, and unknown targets."""
    probs = rng.random((n, n_labels)).astype(np.float32)
    probs[rng.random((n, n_labels)) < 0.2] = np.float32(0.3)
    probs[: n // 10, 0] = np.float32(1.0)
    probs[n // 10: n // 5, 0] = 0.0
    probs[:, -1] = (rng.integers(0, BINS + 1, n) / BINS).astype(np.float32)  # float32 of k / BINS: around the edges
    targets = (rng.random((n, n_labels)) < np.linspace(0.05, 0.6, n_labels)).astype(np.float32)
    targets[rng.random((n, n_labels)) < 0.1] = -1
    return probs, targets


def _reference(probs, targets, t, j):
    row = mlabel.evaluate_predictions(probs, targets, thresholds=np.full(probs.shape[1], t))["per_label"][str(j)]
    return row["tp"], row["fp"], row["fn"], row["tn"]


def test_exact_explorer_counts_equal_evaluate_predictions_at_any_threshold():
    rng = np.random.default_rng(0)
    probs, targets = _scores(rng, 500, 4)
    data = explorer_data({"val": (probs, targets)}, list("abcd"), np.full(4, 0.5), "cmd")
    assert data["mode"] == "exact"
    split = data["splits"]["val"]
    offsets = _unpack(split["offsets"], np.uint32)
    cuts, tp, fp = (_unpack(split[key], dtype) for key, dtype in
                    (("cuts", np.float32), ("tp", np.uint32), ("fp", np.uint32)))
    for j in range(4):
        part = slice(offsets[j], offsets[j + 1])
        assert np.all(np.diff(cuts[part]) < 0)  # distinct, descending
        for t in (0.0, 0.3, float(np.float32(0.3)), 0.30000001, 0.5, 0.123456789, 0.999, 1.0, 1.5,
                  *probs[:5, j].astype(np.float64)):
            tp_t, fp_t, pos, neg = _counts_from_cuts(cuts[part], tp[part], fp[part], t)
            assert (tp_t, fp_t, pos - tp_t, neg - fp_t) == _reference(probs, targets, t, j), (j, t)


def test_histogram_explorer_counts_are_exact_at_every_bin_edge():
    rng = np.random.default_rng(1)
    probs, targets = _scores(rng, 400, 3)
    edges = np.arange(BINS + 1) / BINS
    below = np.nextafter(edges, -1.0)[rng.integers(1, BINS + 1, 400)]  # float64 a hair under an edge: p * BINS
    for p, t in ((probs, targets), (np.column_stack([probs, below]), np.column_stack([targets, targets[:, 0]]))):
        pos, neg = histogram_counts(p, t)  # rounds up to the edge for some of them
        assert pos.shape == neg.shape == (p.shape[1], BINS + 1)
        known = p.astype(np.float64)
        for k in range(BINS + 1):  # the page's snapped threshold k / BINS: the same float64 division
            above = known >= k / BINS
            np.testing.assert_array_equal(pos[:, k:].sum(1), (above & (t == 1)).sum(0), err_msg=f"k={k}")
            np.testing.assert_array_equal(neg[:, k:].sum(1), (above & (t == 0)).sum(0), err_msg=f"k={k}")
    for j, k in [(0, 0), (0, 300), (1, 301), (2, 999), (2, 1000), (2, 117)]:  # the reference is evaluate_predictions'
        tp, fp = int(pos[j, k:].sum()), int(neg[j, k:].sum())
        assert (tp, fp, pos[j].sum() - tp, neg[j].sum() - fp) == _reference(probs, targets, k / BINS, j)


def test_the_explorer_switches_to_histograms_past_the_size_limit_and_stays_small():
    rng = np.random.default_rng(2)
    n = EXACT_LIMIT // 10 + 1
    probs, targets = rng.random((n, 10), dtype=np.float32), (rng.random((n, 10)) < 0.1).astype(np.float32)
    data = explorer_data({"val": (probs, targets)}, [str(i) for i in range(10)], np.full(10, 0.5), "cmd")
    assert data["mode"] == "histogram" and data["splits"]["val"]["dtype"] == "uint16"
    pos = _unpack(data["splits"]["val"]["pos"], np.uint16).reshape(10, BINS + 1)
    assert pos.sum() == (targets == 1).sum()
    assert len(json.dumps(data)) < 0.2 * probs.nbytes  # far smaller than the scores themselves


def test_cooccurrence_counts_images_holding_both_labels():
    rng = np.random.default_rng(3)
    present = rng.random((50, 4)) < 0.4
    both = cooccurrence(present)
    for i in range(4):
        for j in range(4):
            assert both[i, j] == sum(present[n, i] and present[n, j] for n in range(50))


def test_galleries_pick_the_most_confident_errors_and_survive_missing_images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(4)
    n = 40
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "img3.jpg").unlink()  # moved away since the run
    (tmp_path / "img4.jpg").write_bytes(b"not an image")
    probs = rng.random((n, 2)).astype(np.float32)
    targets = (rng.random((n, 2)) < 0.5).astype(np.float32)
    targets[3:5], probs[3:5] = 1, 0.001  # the two broken images are among the highest losses
    decisions = probs >= 0.5
    page, thumbs = error_galleries(probs, targets, decisions, paths, ["a", "<b>"], "test")
    assert "&lt;b&gt;" in page and "<b>" not in page  # label names are escaped
    fp = np.flatnonzero((targets[:, 0] == 0) & decisions[:, 0])
    expected = fp[np.argsort(-probs[fp, 0])][:PER_LABEL]
    section = page.split("<h3>a: ")[1].split("false negatives")[0]
    shown = [f"p = {probs[i, 0]:.3f}" for i in expected]
    assert [s for s in shown if s in section] == shown
    assert all(uri is None or uri.startswith("data:image/jpeg;base64,") for uri in thumbs)
    assert len([u for u in thumbs if u]) == len({u for u in thumbs if u})  # one thumbnail per image
    worst = np.argsort(-image_losses(probs, targets))[:3]
    for i in worst:
        assert paths[i] in page
    assert "2 of" in page and "could not be read" in page
    for i in (3, 4):
        assert f"image not readable: {tmp_path / f'img{i}.jpg'}" in page
    assert sum(uri is None for uri in thumbs) == 2
    nothing, none = error_galleries(probs, targets, decisions, None, ["a", "b"], "val")
    assert none == [] and "no galleries" in nothing


def test_image_losses_match_torch_bce_over_known_labels():
    import torch
    rng = np.random.default_rng(5)
    probs = rng.uniform(0.01, 0.99, (20, 3)).astype(np.float32)
    targets = rng.integers(-1, 2, (20, 3)).astype(np.float32)
    known = torch.from_numpy(targets >= 0)
    bce = torch.nn.functional.binary_cross_entropy(torch.from_numpy(probs).double(),
                                                   torch.from_numpy(targets.clip(0)).double(), reduction="none")
    np.testing.assert_allclose(image_losses(probs, targets), (bce * known).sum(1).numpy(), rtol=1e-9)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_report_page_holds_explorer_galleries_and_structure(tiny_run, tmp_path):
    import re
    run = _copy(tiny_run, tmp_path)
    from mlabel.report import main as report_main
    assert report_main([str(run), "--quiet", "--split", "val"]) == 0
    page = (run / "report" / "report.html").read_text()
    assert "<h2>Errors (val)</h2>" in page and "<h2>Label structure (val)</h2>" in page
    data = json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page).group(1))
    model = mlabel.load(run)
    assert data["labels"] == model.labels and data["thresholds"] == model.thresholds.tolist()
    assert set(data["splits"]) == {"val", "test"} and f"mlabel tune {run} --from-json" in data["tune"]
    thumbs = json.loads(re.search(r'<script type="application/json" id="thumbs">(.*?)</script>', page).group(1))
    refs = {int(i) for i in re.findall(r'data-thumb="(\d+)"', page)}
    assert refs and refs <= set(range(len(thumbs))) and all(thumbs[i] for i in refs)
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere


def test_tune_from_json_applies_the_named_thresholds_and_rebuilds_the_report(tiny_run, tmp_path):
    from mlabel.tune import main as tune_main
    run = _copy(tiny_run, tmp_path)
    labels = mlabel.load(run).labels
    before = mlabel.load(run).thresholds.tolist()
    chosen = tmp_path / "thresholds.json"
    chosen.write_text(json.dumps({"thresholds": {labels[0]: 0.125, labels[2]: 0.875}}))
    assert tune_main([str(run), "--from-json", str(chosen), "--quiet"]) == 0
    after = mlabel.load(run).thresholds.tolist()
    assert after[0] == 0.125 and after[2] == 0.875
    assert after[1] == before[1] and after[3:] == before[3:]  # the others stay
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    assert meta["threshold_policy"] == "manual"
    assert '">0.125</td>' in (run / "report" / "report.html").read_text()


@pytest.mark.parametrize("content, message", [
    ('{"thresholds": {"nope": 0.5}}', "'nope' is not one of the model's"),
    ('{"thresholds": {"LABEL": 1.5}}', "give a number in [0, 1]"),
    ('{"thresholds": {"LABEL": NaN}}', "give a number in [0, 1]"),
    ('{"thresholds": {"LABEL": true}}', "give a number in [0, 1]"),
    ('{"thresholds": {}}', 'needs a non-empty "thresholds" object'),
    ('[0.5]', 'needs a non-empty "thresholds" object'),
    ('{"thresholds": ', "is not valid JSON"),
])
def test_tune_from_json_refuses_a_bad_file_and_keeps_the_model(tiny_run, tmp_path, capsys, content, message):
    from mlabel.tune import main as tune_main
    run = _copy(tiny_run, tmp_path)
    meta = (run / "model" / "mlabel.json").read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(content.replace("LABEL", mlabel.load(run).labels[0]))
    capsys.readouterr()
    assert tune_main([str(run), "--from-json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and "Traceback" not in err
    assert (run / "model" / "mlabel.json").read_bytes() == meta
    assert tune_main([str(run), "--from-json", str(bad), "--metric", "f1"]) == 2


def test_evaluate_rebuilds_the_report_of_a_run(tiny_run, tmp_path):
    from mlabel.evaluate import main as evaluate_main
    run = _copy(tiny_run, tmp_path)
    (run / "report" / "report.html").unlink()
    assert evaluate_main([str(run), "--split", "val", "--quiet"]) == 0
    assert (run / "report" / "report.html").is_file()


def test_the_readme_predict_example_runs_on_the_sample_assets(tiny_run, tmp_path):
    import csv
    from mlabel.predict import main as predict_main
    samples = Path(__file__).resolve().parents[1] / "assets" / "samples"
    out = tmp_path / "preds.csv"
    assert predict_main([str(tiny_run), str(samples), "--out", str(out), "--quiet"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in samples.glob("*.png"))
    assert len(rows) == 4


HOSTILE_NAMES = ["<!--<script>", "</script><img src=x onerror=alert(1)>", "a & b &amp; <c>", "]]>-->"]


def _script_blocks(page: str) -> dict[str, str]:
    """The text of each ``<script type="application/json" id=...>`` element as an HTML parser reads it."""
    from html.parser import HTMLParser

    class Scripts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.blocks, self.current = {}, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "script" and attrs.get("type") == "application/json":
                self.current = attrs["id"]
                self.blocks[self.current] = ""

        def handle_data(self, data):
            if self.current is not None:
                self.blocks[self.current] += data

        def handle_endtag(self, tag):
            if tag == "script":
                self.current = None

    parser = Scripts()
    parser.feed(page)
    return parser.blocks


def test_inline_json_escapes_every_character_that_could_end_its_script_element():
    from mlabel.report.page import inline_json
    value = {"labels": HOSTILE_NAMES, "<key>": "&", "n": [1.5, None]}
    text = inline_json(value)
    assert not set("<>&") & set(text)
    assert json.loads(text) == value


def test_a_report_of_hostile_label_and_folder_names_parses_back_to_the_names(tiny_run, tmp_path):
    """Label names and a run folder holding ``<!--<script>`` and ``</script>``: every inline JSON
    block of the page reads back (json.loads) to the original names, and no name opens a comment
    or closes a script element."""
    from mlabel.report import main as report_main
    run = Path(shutil.copytree(tiny_run, tmp_path / "r<!--<script>x<" / "script>&run"))
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    names = HOSTILE_NAMES + [f"plain {j}" for j in range(len(meta["labels"]) - len(HOSTILE_NAMES))]
    meta["labels"] = names
    (run / "model" / "mlabel.json").write_text(json.dumps(meta))
    for split in ("val", "test"):  # the run's predictions under the new names (renamed, not re-scored)
        saved = dict(np.load(run / "predictions" / f"{split}.npz"))
        saved["labels"] = np.asarray(names)
        np.savez_compressed(run / "predictions" / f"{split}.npz", **saved)
    record = json.loads((run / "run.json").read_text())  # and its label counts, as if trained so
    record["label_counts"] = {split: {"images": c["images"], **{new: c[old] for old, new in zip(record["labels"], names)}}
                              for split, c in record["label_counts"].items()}
    record["labels"] = names
    (run / "run.json").write_text(json.dumps(record))
    assert report_main([str(run), "--quiet"]) == 0
    page = (run / "report" / "report.html").read_text()
    blocks = _script_blocks(page)
    data = json.loads(blocks["explorer-data"])
    assert data["labels"] == names and str(run) in data["tune"]
    assert isinstance(json.loads(blocks["thumbs"]), list)
    assert "<!--" not in page
    assert page.count("<script") == page.count("</script>") == 3  # report.js, the explorer data, the thumbnails


def test_a_streamed_tune_rebuilds_the_report_or_says_it_is_out_of_date(tiny_run, tmp_path, capsys):
    """thresholds.streaming: with the run's predictions/ the report is rebuilt at the new
    thresholds; without them it is marked out of date (on the page and on stderr)."""
    import re
    from mlabel.tune import main as tune_main

    def page_thresholds(page):
        return json.loads(re.search(r'id="explorer-data">(.*?)</script>', page).group(1))["thresholds"]

    run = _copy(tiny_run, tmp_path)
    assert tune_main([str(run), "thresholds.streaming=true", "--metric", "fbeta", "--beta", "0.5", "--quiet"]) == 0
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    assert meta["threshold_params"]["mode"] == "histogram"
    page = (run / "report" / "report.html").read_text()
    assert page_thresholds(page) == meta["thresholds"] and 'id="stale"' not in page

    shutil.rmtree(run / "predictions")
    old = page_thresholds(page)
    capsys.readouterr()
    assert tune_main([str(run), "thresholds.streaming=true", "--metric", "f1", "--quiet"]) == 0
    assert f"warning: {run / 'report' / 'report.html'} is out of date" in capsys.readouterr().err
    page = (run / "report" / "report.html").read_text()
    assert page_thresholds(page) == old != json.loads((run / "model" / "mlabel.json").read_text())["thresholds"]
    assert page.count('id="stale"') == 1 and f"mlabel report {run}" in page
