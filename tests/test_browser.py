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
