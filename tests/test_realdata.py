"""Checks on the real photos in ../shared/data; skipped when that folder is absent."""
import pytest

from conftest import SHARED_DATA
from mlabel.config import load_config
from mlabel.data import build_splits

pytestmark = pytest.mark.realdata


@pytest.fixture
def need(request):
    def check(name):
        if not (SHARED_DATA / name).is_dir():
            pytest.skip(f"{SHARED_DATA / name} is absent")
        return SHARED_DATA / name
    return check


def test_miml_recipe_reads_all_images_with_known_label_counts(need):
    root = need("miml-scene")
    cfg = load_config("miml_scene", [f"data.root={root / 'images'}"])
    splits = build_splits(cfg.data, cfg.task, cfg.seed)
    assert splits.labels == ["desert", "mountains", "sea", "sunset", "trees"]
    total = sum(t.targets.sum(0) for t in (splits.train, splits.val, splits.test))
    assert total.tolist() == [409, 458, 580, 465, 560]
    sizes = len(splits.train), len(splits.val), len(splits.test)
    # iterative stratification meets label quotas first, so fold sizes are close, not exact
    assert sum(sizes) == 2000
    assert all(abs(got - want) <= 20 for got, want in zip(sizes, (1200, 300, 500))), sizes


def test_dogcat_recipe_is_binary_with_dog_positive(need):
    root = need("catsdogs")
    cfg = load_config("dogcat", [f"data.root={root}"])
    splits = build_splits(cfg.data, cfg.task, cfg.seed)
    assert splits.task == "binary" and splits.labels == ["dog"]
    assert len(splits.test) == 2000 and splits.test.targets.sum() == 1000
    assert len(splits.train) + len(splits.val) == 2000
