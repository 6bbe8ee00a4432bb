"""The documentation works: the manual builds with ``mkdocs build --strict`` (no broken link, no
missing page), its generated pages hold what the code declares, the README keeps its promises
(length, the two commands CI runs, links that resolve), and CONTRIBUTING.md's examples run."""
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlabel
from mlabel.config import all_keys, describe_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
QUICKSTART = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 "
              "&& pip install -e . && python -m mlabel.train quickstart")
TESTS = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 "
         "&& pip install -e \".[test]\" && python -m pytest")


def _text(page: Path) -> str:
    """A built page's visible text, tags stripped and entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' builds the manual")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + done.stderr[-6000:]
    return out


def test_every_page_of_the_nav_is_built(site):
    import yaml
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entry):
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for value in entry.values():
                yield from pages(value)
        else:
            for item in entry:
                yield from pages(item)

    listed = list(pages(nav))
    assert len(listed) >= 15
    for page in listed:
        assert (ROOT / "docs" / page).is_file(), page
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page


def test_configuration_reference_holds_every_key_as_help_prints_it(site):
    text = _text(site / "configuration" / "index.html")
    keys = all_keys()
    assert len(describe_keys().splitlines()) == len(keys)
    for key, (field, _) in keys.items():
        assert key in text, key
        assert re.sub(r"\s+", " ", field.metadata["help"]) in text, key


def test_api_page_documents_every_public_name(site):
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", re.sub(r":\w+:", "", _text(site / "api" / "index.html")))  # Sphinx roles shown as text
    for name in mlabel.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(mlabel, name)
        assert f'id="{obj.__module__}.{obj.__qualname__}"' in page, name
        plain = re.sub(r":\w+:", "", obj.__doc__ or "").replace("`", "")  # as rendered: roles and code marks gone
        opening = " ".join(plain.split()[:3])  # the docstring is rendered, not only named
        assert opening and opening in text, name


def test_readme_screenshots_are_published_with_the_site(site):
    for name in ("report-explorer.png", "report-galleries.png"):
        assert (site / "assets" / name).read_bytes() == (ROOT / "assets" / name).read_bytes()


# --------------------------------------------------------------------------- README

def test_readme_is_short_and_keeps_the_two_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert f"```bash\n{QUICKSTART}\n```" in text
    assert f"```bash\n{TESTS}\n```" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and ci.rstrip().endswith("python -m pytest")
    assert "python -m mlabel.train quickstart resume=true" in text


@pytest.mark.parametrize("document", [README, CONTRIBUTING])
def test_relative_links_point_at_files_that_exist(document):
    text = document.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+://|#|mailto:", link)]
    assert relative
    for link in relative:
        assert (document.parent / link.split("#")[0]).exists(), link


# --------------------------------------------------------------------------- CONTRIBUTING examples

def _example(section: str) -> dict:
    """Run the first Python block under ``## section`` of CONTRIBUTING.md; its namespace."""
    text = CONTRIBUTING.read_text(encoding="utf-8")
    part = text[text.index(f"## {section}\n"):]
    code = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, f"CONTRIBUTING.md: {section}", "exec"), namespace)
    return namespace


@pytest.fixture
def registries():
    from mlabel.losses import LOSSES
    from mlabel.models import HEADS
    saved = dict(LOSSES), dict(HEADS)
    yield LOSSES, HEADS
    LOSSES.clear(), LOSSES.update(saved[0])
    HEADS.clear(), HEADS.update(saved[1])


def test_contributing_loss_and_head_compute_what_they_say(registries):
    losses, heads = registries
    _example("Adding a loss or a head")
    loss = losses["squared_hinge"](margin=0.5)
    # positive at 0.2: (0.5 - 0.2)^2; negative at 0.3: (0.5 + 0.3)^2; the unknown target is left out
    got = loss(torch.tensor([[0.2, 0.3, 9.0]]), torch.tensor([[1.0, 0.0, -1.0]]))
    assert got.item() == pytest.approx(((0.5 - 0.2) ** 2 + (0.5 + 0.3) ** 2) / 2)
    head = heads["two_layer"](8, 3, hidden=5)
    assert head(torch.zeros(2, 8)).shape == (2, 3) and head[0].out_features == 5
    from mlabel.checks import load_checked
    load_checked("quickstart", ["loss.name=squared_hinge", "loss.args.margin=0.5", "model.head=two_layer",
                               "model.head_args.hidden=32"])  # accepted by the config's checks


def test_contributing_data_format_reads_what_the_jsonl_reader_reads(tmp_path):
    from mlabel.data.formats import read_jsonl_table
    from mlabel.errors import DataError
    read_tsv_table = _example("Adding a data format")["read_tsv_table"]
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "train.tsv").write_text("a.jpg\tcat,dog\n\nb.jpg\t\nc.jpg\tdog\n")
    (tmp_path / "train.jsonl").write_text('{"image": "a.jpg", "labels": ["cat", "dog"]}\n'
                                          '{"image": "b.jpg", "labels": []}\n{"image": "c.jpg", "labels": ["dog"]}\n')
    got = read_tsv_table(tmp_path / "train.tsv", tmp_path)
    want = read_jsonl_table(tmp_path / "train.jsonl", tmp_path)
    assert got.labels == want.labels == ["cat", "dog"] and got.paths == want.paths
    np.testing.assert_array_equal(got.targets, want.targets)
    (tmp_path / "val.tsv").write_text("a.jpg\tcat\nb.jpg\tbird\n")
    with pytest.raises(DataError, match=r"val.tsv:2: labels \['bird'\]"):
        read_tsv_table(tmp_path / "val.tsv", tmp_path, labels=got.labels)


def _best_f1(scores: np.ndarray, truth: np.ndarray) -> float:
    """Brute force: the best F1 of ``score >= t`` over every distinct score t."""
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & truth)
        best = max(best, 2 * tp / (predicted.sum() + truth.sum()))
    return best


def test_contributing_policy_sits_halfway_between_the_val_optimum_and_one_half():
    midpoint_thresholds = _example("Adding a threshold policy")["midpoint_thresholds"]
    rng = np.random.default_rng(3)
    targets = (rng.random((80, 4)) < [0.1, 0.3, 0.5, 0.7]).astype(np.float64)
    targets[0] = 1  # every label has both classes
    targets[1] = 0
    probs = np.clip(0.35 * targets + rng.random((80, 4)) * 0.65, 0, 1)
    th = midpoint_thresholds(probs, targets)
    assert th.shape == (4,) and np.all((th >= 0) & (th <= 1))
    exact = 2 * th - 0.5  # the exact cut-off inside the policy reaches the brute-force best F1
    for j in range(4):
        predicted, truth = probs[:, j] >= exact[j], targets[:, j] == 1
        f1 = 2 * np.sum(predicted & truth) / (predicted.sum() + truth.sum())
        assert f1 == pytest.approx(_best_f1(probs[:, j], truth), abs=1e-12), j
