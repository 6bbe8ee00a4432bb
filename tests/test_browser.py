"""The report in a real browser: headless Chromium opens a quickstart-sized report from file://,
the threshold explorer's numbers are checked against ``mlabel.evaluate_predictions``, the table
sorts, the galleries show images, and the downloaded thresholds apply with ``mlabel tune``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium;
skipped with the reason when they are absent. Screenshots go to ``$MLABEL_SCREENSHOTS`` when set,
else into the test's temporary folder."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import mlabel

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1300,1000"]

pytestmark = pytest.mark.browser
# a label name that ends an inline script block, or opens a comment in it, unless the JSON is escaped
HOSTILE = "<!--<script> a</script> & b"


def start_chromium(user_dir: Path):
    """A headless Chromium under selenium, or a skip that says what is missing."""
    if not (CHROMIUM.is_file() and DRIVER.is_file()):
        pytest.skip("Chromium is absent: apt-get install chromium chromium-driver (as .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is absent: pip install selenium")
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={user_dir}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(DRIVER)), options=options)


@pytest.fixture
def browser(tmp_path):
    driver = start_chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


def quickstart_sized(run: Path, scene_csv: Path, seed: int = 0) -> dict:
    """Replace the tiny run's predictions with quickstart-sized ones (600 val, 1,000 test images,
    6 labels, some targets unknown) on the same images, and rebuild its report from them."""
    import torch

    from mlabel.outputs import Outputs, Targets
    from mlabel.predictions import save_predictions
    from mlabel.report import main as report_main
    model = mlabel.load(run)
    rng = np.random.default_rng(seed)
    model.set_thresholds(rng.uniform(0.35, 0.65, model.num_labels))  # where these scores have errors either way
    model.save_metadata(run / "model")
    images = sorted(str(p) for p in (scene_csv / "images").glob("val*.png"))
    scores = {}
    for split, n in (("val", 600), ("test", 1000)):
        targets = (rng.random((n, model.num_labels)) < np.linspace(0.1, 0.5, model.num_labels)).astype(np.float32)
        logits = (rng.normal(0, 1.5, targets.shape) + 2.5 * (targets - 0.5)).astype(np.float32)
        targets[rng.random(targets.shape) < 0.03] = -1
        save_predictions(run, split, Outputs(torch.from_numpy(logits)), Targets(torch.from_numpy(targets)),
                         [images[i % len(images)] for i in range(n)], model.labels)
        scores[split] = (model.probabilities(torch.from_numpy(logits)).numpy(), targets)
    assert report_main([str(run), "--quiet"]) == 0
    return scores


def wait_ready(driver, page: Path, limit: float = 20.0) -> float:
    start = time.perf_counter()
    driver.get(page.as_uri())
    while not driver.execute_script("return document.getElementById('explorer').dataset.ready === 'true'"):
        note = driver.execute_script("return document.getElementById('explorer-note').textContent")
        assert "could not start" not in note, note
        assert time.perf_counter() - start < limit, "the explorer did not start"
        time.sleep(0.02)
    return time.perf_counter() - start


def shown(driver, split: str) -> dict:
    text = {key: driver.find_element("id", f"{split}-{key}").text
            for key in ("tp", "fp", "fn", "tn", "precision", "recall", "f1")}
    return {key: int(v) if key in ("tp", "fp", "fn", "tn") else float(v) for key, v in text.items()}


def check_against_reference(driver, scores: dict, label: int, threshold: float) -> None:
    for split, (probs, targets) in scores.items():
        thresholds = np.full(probs.shape[1], threshold)
        row = mlabel.evaluate_predictions(probs, targets, thresholds=thresholds)["per_label"][str(label)]
        page = shown(driver, split)
        assert [page[k] for k in ("tp", "fp", "fn", "tn")] == [row[k] for k in ("tp", "fp", "fn", "tn")], split
        for key in ("precision", "recall", "f1"):
            assert abs(page[key] - row[key]) <= 1e-6, (split, key, page[key], row[key])


def screenshot(driver, tmp_path: Path, name: str, element_id: str) -> Path:
    folder = Path(os.environ.get("MLABEL_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script(f"document.getElementById('{element_id}').scrollIntoView()")
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    return path


def test_the_explorer_agrees_with_evaluate_predictions_in_a_real_browser(browser, tiny_run, scene_csv, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    from mlabel.tune import main as tune_main
    run = Path(shutil.copytree(tiny_run, tmp_path / "run<!--<script>"))
    label = 2
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    meta["labels"][label] = HOSTILE  # the explorer's inline JSON must survive it (issue 27)
    (run / "model" / "mlabel.json").write_text(json.dumps(meta))
    scores = quickstart_sized(run, scene_csv)
    model = mlabel.load(run)
    wait_ready(browser, run / "report" / "report.html")
    assert browser.get_log("browser") == []  # no script error, nothing fetched
    assert browser.execute_script("return document.getElementById('explorer-data').textContent.length") > 1000

    assert model.labels[label] == HOSTILE
    Select(browser.find_element("id", "explorer-label")).select_by_visible_text(model.labels[label])
    check_against_reference(browser, scores, label, float(model.thresholds[label]))
    slider = browser.find_element("id", "explorer-slider")
    for key, presses in ((Keys.ARROW_RIGHT, 37), (Keys.ARROW_LEFT, 90), (Keys.ARROW_LEFT, 1), (Keys.ARROW_RIGHT, 3)):
        before = float(slider.get_attribute("value"))
        slider.send_keys(*[key] * presses)  # move the slider as a person does
        moved = float(slider.get_attribute("value"))
        assert abs(abs(moved - before) - presses / 1000) < 2e-3
        check_against_reference(browser, scores, label, moved)
    tie = float(scores["test"][0][7, label])  # a threshold equal to an image's score counts it as positive
    typed = browser.find_element("id", "explorer-value")
    for value in (0.3141592, tie):
        typed.clear()
        typed.send_keys(repr(value), Keys.TAB)
        check_against_reference(browser, scores, label, value)
    screenshot(browser, tmp_path, "explorer", "explorer")

    # the chosen thresholds download as a file that mlabel tune applies
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.find_element("id", "explorer-download").click()
    target = downloads / "thresholds.json"
    for _ in range(200):
        if target.is_file():
            break
        time.sleep(0.05)
    assert tune_main([str(run), "--from-json", str(target), "--quiet"]) == 0
    expected = model.thresholds.tolist()
    expected[label] = tie
    np.testing.assert_allclose(mlabel.load(run).thresholds.numpy(), expected, rtol=0, atol=1e-7)

    # the per-label table sorts by a clicked column
    browser.get((run / "report" / "report.html").as_uri())
    table = browser.find_elements("css selector", "table.labels")[0]
    header = [th for th in table.find_elements("css selector", "th") if th.text == "F1"][0]
    column = [th.text for th in table.find_elements("css selector", "th")].index("F1")
    header.click()
    values = [float(v) for v in browser.execute_script(
        "return [...arguments[0].rows].slice(1).map(r => r.cells[arguments[1]].dataset.v)", table, column)]
    assert values == sorted(values) and len(set(values)) > 1
    header.click()
    values = [float(v) for v in browser.execute_script(
        "return [...arguments[0].rows].slice(1).map(r => r.cells[arguments[1]].dataset.v)", table, column)]
    assert values == sorted(values, reverse=True)

    # the galleries show the images
    widths = browser.execute_script(
        "return [...document.querySelectorAll('#galleries img')].map(i => i.complete ? i.naturalWidth : -1)")
    assert len(widths) >= 10 and all(w > 0 for w in widths)
    screenshot(browser, tmp_path, "galleries", "galleries")
    # the checkbox swaps every tile's picture for the heat map of the label it is about
    shown = "return [...document.querySelectorAll(arguments[0])].map(i => i.offsetWidth > 0)"
    assert all(browser.execute_script(shown, "#galleries img.plain"))
    assert not any(browser.execute_script(shown, "#galleries img.cam"))
    browser.find_element("css selector", "#galleries input[type=checkbox]").click()
    assert all(browser.execute_script(shown, "#galleries img.cam"))
    assert not any(browser.execute_script(shown, "#galleries img.plain"))
    screenshot(browser, tmp_path, "heat-maps", "galleries")


def test_past_the_size_limit_the_explorer_snaps_to_bin_edges_and_stays_exact_there(
        browser, tiny_run, scene_csv, tmp_path, monkeypatch):
    from selenium.webdriver.common.keys import Keys
    from mlabel.report import explorer
    monkeypatch.setattr(explorer, "EXACT_LIMIT", 1000)  # 600 x 6 scores: histograms
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    scores = quickstart_sized(run, scene_csv, seed=1)
    wait_ready(browser, run / "report" / "report.html")
    typed = browser.find_element("id", "explorer-value")
    for value, snapped in (("0.31415", 0.314), ("0.4276", 0.428), ("0.9", 0.9), ("1", 1.0), ("0", 0.0)):
        typed.clear()
        typed.send_keys(value, Keys.TAB)
        assert float(typed.get_attribute("value")) == snapped
        assert "steps of 0.001" in browser.find_element("id", "explorer-note").text
        check_against_reference(browser, scores, 0, snapped)
    slider = browser.find_element("id", "explorer-slider")
    slider.send_keys(*[Keys.ARROW_RIGHT] * 250)
    moved = float(slider.get_attribute("value"))
    assert moved == pytest.approx(0.25) and round(moved * 1000) / 1000 == moved
    check_against_reference(browser, scores, 0, moved)


AUDIT_IDS = ["a,b.png", 'q"uote.png', "new\nline.png", "<img src=x onerror=alert(1)>.png", "</script>&.png"]


def audit_tiles(n: int = 24, seed: int = 0) -> tuple[list, list[str]]:
    """``n`` tiles of ``mlabel.audit.page`` over four labels (one hostile), each its own image (the
    first ones with ids a CSV must quote or a page must escape), ranks shuffled."""
    import io

    from PIL import Image

    from mlabel.audit.page import KINDS, Tile
    labels = ["circle", "square", HOSTILE, "star"]
    rng = np.random.default_rng(seed)
    tiles = []
    for k, rank in enumerate(rng.permutation(n) + 1):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=70)
        label, kind = labels[k % 4], KINDS[(k // 4) % 4]
        given = [name for name in labels if name != label and rng.random() < 0.4] + (
            [label] if kind == "spurious" else [])
        unknown = [label] if kind.startswith("suggested") else []
        tiles.append(Tile(image=AUDIT_IDS[k] if k < len(AUDIT_IDS) else f"images/scene {k}.png",
                          thumbnail=buffer.getvalue(), given=given, unknown=unknown,
                          predicted=[name for name in labels if rng.random() < 0.5], label=label, kind=kind,
                          probability=float(rng.random()), score=float(n - rank), rank=int(rank)))
    return tiles, labels


def wait_audit_ready(driver, page: Path, limit: float = 20.0) -> None:
    start = time.perf_counter()
    driver.get(page.as_uri())
    while not driver.execute_script("return document.body && document.body.dataset.ready === 'true'"):
        assert time.perf_counter() - start < limit, "the audit page did not start"
        time.sleep(0.02)


def audit_state(driver) -> tuple[int, list[str]]:
    """The shown count the page states, and each tile's pressed button ('' when undecided), in page order."""
    shown = int(driver.find_element("id", "audit-count").get_attribute("data-shown"))
    pressed = driver.execute_script("return [...document.querySelectorAll('#tiles .tile')].map(t => "
                                    "(t.querySelector('button[aria-pressed=true]') || {dataset: {}}).dataset.decision || '')")
    return shown, pressed


def click(driver, element) -> None:
    """Click ``element`` where a person would see it: in mid-screen, clear of the page's sticky bar
    (chromedriver clicks an element in view without scrolling, even under a sticky header)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def download_file(driver, folder: Path, button_id: str, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.find_element("id", button_id).click()
    target = folder / name
    for _ in range(200):
        if target.is_file():
            break
        time.sleep(0.05)
    assert target.is_file(), f"{name} was not downloaded"
    return target


def test_the_audit_page_filters_decides_and_downloads_corrections_in_a_real_browser(browser, tmp_path):
    import csv
    import io

    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from mlabel.audit.page import write_audit_page
    tiles, labels = audit_tiles()
    page = tmp_path / "audit<!--" / "audit.html"
    write_audit_page(page, tiles, labels, "audit of <b>scenes</b>")
    wait_audit_ready(browser, page)
    assert browser.get_log("browser") == []  # no script error, nothing fetched
    ordered = sorted(tiles, key=lambda t: t.rank)
    nodes = browser.find_elements("css selector", "#tiles .tile")
    assert [node.get_attribute("title") for node in nodes] == [t.image for t in ordered]  # by suspicion
    widths = browser.execute_script("return [...document.querySelectorAll('#tiles img')].map(i => i.naturalWidth)")
    assert widths == [80] * len(tiles)  # every thumbnail shows, and no name became an <img>
    assert browser.find_element("tag name", "h1").text == "audit of <b>scenes</b>"
    assert browser.find_element("id", "audit-folder").text == ""  # no folder common to every id
    assert [n.find_element("css selector", ".image").get_attribute("textContent") for n in nodes] == \
        [t.image for t in ordered]
    assert HOSTILE in nodes[[t.label for t in ordered].index(HOSTILE)].text
    assert audit_state(browser) == (24, [""] * 24)

    # the filters: by label, by kind, both; the stated count and the shown tiles agree with the tiles
    label, kind = Select(browser.find_element("id", "audit-label")), Select(browser.find_element("id", "audit-kind"))
    for j, name in ((2, HOSTILE), (0, "circle")):
        label.select_by_value(str(j))
        for chosen in ("", "missing", "suggested_negative"):
            kind.select_by_value(chosen)
            expected = [t.image for t in ordered if t.label == name and chosen in ("", t.kind)]
            assert 0 < audit_state(browser)[0] == len(expected)
            assert [n.get_attribute("title") for n in nodes if n.is_displayed()] == expected
    label.select_by_value("")
    kind.select_by_value("spurious")
    assert audit_state(browser)[0] == sum(t.kind == "spurious" for t in ordered)
    kind.select_by_value("")

    # decide: fix, unknown, keep by the buttons; keep chosen twice is cleared; u and f by keyboard
    at = {t.image: i for i, t in enumerate(ordered)}
    decisions = {at["a,b.png"]: "fix", at['q"uote.png']: "unknown", at["new\nline.png"]: "keep"}
    for i, decision in (*decisions.items(), (at["images/scene 9.png"], "keep"), (at["images/scene 9.png"], "keep")):
        click(browser, nodes[i].find_element("css selector", f"button.{decision}"))
    start = at["<img src=x onerror=alert(1)>.png"]
    click(browser, nodes[start].find_element("tag name", "img"))  # selects the tile
    browser.switch_to.active_element.send_keys("u")  # decides, and moves on to the next tile
    if start + 2 < len(nodes):
        browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT, "f")
        decisions[start + 2] = "fix"
    decisions[start] = "unknown"
    expected = [decisions.get(i, "") for i in range(len(nodes))]
    assert audit_state(browser) == (24, expected)
    status = Select(browser.find_element("id", "audit-status"))
    status.select_by_value("undecided")
    assert audit_state(browser)[0] == 24 - len(decisions)
    status.select_by_value("fix")
    assert audit_state(browser)[0] == sum(d == "fix" for d in decisions.values())
    screenshot(browser, tmp_path, "audit", "tiles")

    # the decisions survive a reload; the download is what Python's csv module writes and reads
    wait_audit_ready(browser, page)
    assert audit_state(browser) == (24, expected)
    target = download_file(browser, tmp_path / "downloads", "audit-download", "corrections.csv")
    rows = [["image", "label", "decision"]] + [[ordered[i].image, ordered[i].label, decisions[i]]
                                                 for i in sorted(decisions)]
    with target.open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == rows
    reference = io.StringIO(newline="")
    csv.writer(reference).writerows(rows)
    assert target.read_bytes() == reference.getvalue().encode("utf-8")
    assert browser.execute_script("return window.auditCorrections()") == reference.getvalue()


def test_an_audit_reviewed_on_its_page_applies_exactly_the_decided_cells(browser, scene_csv, tmp_path):
    """The whole loop: mlabel audit on generated scenes (a few cells unknown), its audit.html
    decided in the browser, the downloaded corrections.csv through mlabel audit apply."""
    import csv

    from selenium.webdriver.support.ui import Select

    from mlabel.audit.__main__ import main as audit_main
    from mlabel.data.synthetic import SCENE_LABELS
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(scene_csv / "images")
    rng = np.random.default_rng(3)
    with (scene_csv / "train.csv").open(newline="") as handle:
        given = list(csv.reader(handle))
    for row in given[1:]:
        row[1:] = ["-1" if rng.random() < 0.05 else v for v in row[1:]]  # unknown cells: suggestions
    with (root / "train.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(given)
    shutil.copy(scene_csv / "val.csv", root / "val.csv")
    out = tmp_path / "audit"
    assert audit_main(["quickstart", f"data.root={root}", "data.val=val.csv", "data.test=null", "data.generate=null",
                       "model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32",
                       "data.num_workers=0", "--out", str(out), "--folds", "2", "--quiet"]) == 0
    listed = []
    for name in ("issues.csv", "suggestions.csv"):
        with (out / name).open(newline="") as handle:
            listed += list(csv.DictReader(handle))

    wait_audit_ready(browser, out / "audit.html")
    assert browser.get_log("browser") == []
    nodes = browser.find_elements("css selector", "#tiles .tile")
    assert len(nodes) == len(listed) > 10
    folder = os.path.commonpath([row["image"] for row in listed]) + os.sep  # the tiles show the ids after it
    assert browser.find_element("id", "audit-folder").text == f"Images in {folder}."
    assert [n.find_element("css selector", ".image").text for n in nodes] == \
        [row["image"][len(folder):] for row in sorted(listed, key=lambda row: int(row["rank"]))]
    Select(browser.find_element("id", "audit-label")).select_by_value("3")
    assert audit_state(browser)[0] == sum(row["label"] == SCENE_LABELS[3] for row in listed)
    Select(browser.find_element("id", "audit-label")).select_by_value("")
    # decide on train images (val has a file of its own): each decision on each kind there is
    train = [(i, n.get_attribute("data-kind")) for i, n in enumerate(nodes)
             if Path(n.get_attribute("title")).name.startswith("train")]
    chosen = []
    for kind in ("missing", "spurious", "suggested_positive", "suggested_negative"):
        for decision, (i, _) in zip(("fix", "unknown", "keep"), [t for t in train if t[1] == kind]):
            click(browser, nodes[i].find_element("css selector", f"button.{decision}"))
            chosen.append((kind, decision))
    assert {("missing", "fix"), ("spurious", "fix"), ("spurious", "unknown"), ("missing", "keep")} <= set(chosen)
    corrections = download_file(browser, tmp_path / "downloads", "audit-download", "corrections.csv")
    with corrections.open(newline="") as handle:
        decided = {(row["image"], row["label"]): row["decision"] for row in csv.DictReader(handle)}
    assert len(decided) == len(chosen)

    new = tmp_path / "reviewed" / "train.csv"
    assert audit_main(["apply", str(out), str(corrections), "--out", str(new)]) == 0
    kinds = {(row["image"], row["label"]): row["kind"] for row in listed}
    fixed = {"missing": "1", "spurious": "0", "suggested_positive": "1", "suggested_negative": "0"}
    expected = [list(row) for row in given]
    for row in expected[1:]:
        image = str(root / f"{row[0]}.png")
        for j, label in enumerate(SCENE_LABELS, 1):
            decision = decided.get((image, label), "keep")
            row[j] = {"keep": row[j], "unknown": "-1", "fix": fixed.get(kinds.get((image, label)))}[decision]
    with new.open(newline="") as handle:
        assert list(csv.reader(handle)) == expected
    assert sum(a != b for old, now in zip(given, expected) for a, b in zip(old, now)) == \
        sum(d != "keep" for d in decided.values()) > 0
