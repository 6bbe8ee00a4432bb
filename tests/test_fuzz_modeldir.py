"""Property test of the ``mlabel.json`` reader (issue 27): random structures and values in every
field give a loaded model with finite probabilities, or a ValueError / UserError that names the
model directory; never another exception type, never NaN."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import mlabel
from mlabel.errors import UserError
from mlabel.preprocess import preprocess_image

LABELS = ["a", "b"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid tiny model directory and its metadata as saved."""
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    model = mlabel.create_model("test_resnet", LABELS, image_size=32, resize="squish")
    model.set_thresholds([0.3, 0.6])
    model.set_calibration("platt", [1.5, 0.5], [0.2, -0.1])
    model.save_pretrained(folder)
    return folder, json.loads((folder / "mlabel.json").read_text())


# any JSON value: what a damaged or hand-edited file can hold
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.sampled_from([0, -1, 1, 7, 8, 32, 4097, 60000, 2**63, 1e-40, 1e308, 0.0, 0.5, 1.0, "", "linear",
                              "mlp", "csra", "platt", "temperature", "binary", "multilabel", "crop", "squish",
                              "bilinear", "test_resnet", "resnet18", "a", "b"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)
NUMBER_LISTS = st.lists(SCALARS, min_size=0, max_size=4)
NESTED = {  # fields that are objects: their own fields get random values too
    "preprocessing": ["image_size", "resize", "crop_pct", "interpolation", "mean", "std"],
    "calibration": ["method", "scale", "bias"],
    "regression": ["names", "mean", "std"],
    "head_args": ["hidden", "dropout", "lam", "temperature", "other"],
}
TOP = ["format_version", "backbone", "labels", "task", "thresholds", "calibration", "head", "head_args", "drop_rate",
       "preprocessing", "regression", "weights_sha256", "mlabel_version"]


@st.composite
def damaged(draw, meta: dict) -> dict:
    """``meta`` with some fields replaced by random values, some nested fields changed, some removed."""
    meta = json.loads(json.dumps(meta))
    for key in draw(st.lists(st.sampled_from(TOP), max_size=3, unique=True)):
        meta[key] = draw(JSON | NUMBER_LISTS)
    for key in draw(st.lists(st.sampled_from(sorted(NESTED)), max_size=2, unique=True)):
        inner = meta.get(key) if isinstance(meta.get(key), dict) else {}
        for field in draw(st.lists(st.sampled_from(NESTED[key]), min_size=1, max_size=3, unique=True)):
            inner[field] = draw(JSON | NUMBER_LISTS)
        meta[key] = inner
    for key in draw(st.lists(st.sampled_from(TOP), max_size=2, unique=True)):
        meta.pop(key, None)
    return meta


def _probabilities(model, image: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The preprocessed pixels and the model's probabilities. A large saved size is tried with
    the pixels at that size (where std/mean act) but the network at 64 px: the network's
    output does not depend on the size for NaN, and a 4096 px forward pass takes half a minute."""
    pixels = preprocess_image(image, model.preprocessing)
    if model.preprocessing["image_size"] > 64:
        small = preprocess_image(image, {**model.preprocessing, "image_size": 64})
        return pixels, model.predict_proba(torch.from_numpy(small)[None])
    return pixels, model.predict_proba(torch.from_numpy(pixels)[None])


def test_an_unchanged_file_loads(saved):
    folder, meta = saved
    model = mlabel.load(folder)
    assert model.labels == LABELS and model.thresholds.tolist() == pytest.approx([0.3, 0.6])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mlabel_json_loads_a_finite_model_or_is_refused_naming_the_file(saved, data):
    folder, meta = saved
    changed = data.draw(damaged(meta))
    (folder / "mlabel.json").write_text(json.dumps(changed, allow_nan=True))
    try:
        model = mlabel.load(folder)
    except (UserError, ValueError) as err:  # anything else fails the test with its traceback
        assert str(folder) in str(err), err
        event("refused")
        return
    event("loaded")
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    pixels, probs = _probabilities(model, image)
    assert np.isfinite(pixels).all(), model.preprocessing
    assert torch.isfinite(probs).all() and torch.isfinite(model.thresholds).all(), changed
    assert all(0 <= t <= 1 for t in model.thresholds.tolist())
    for value in (model.preprocessing["image_size"], *model.preprocessing["mean"], *model.preprocessing["std"]):
        assert math.isfinite(value)


def test_the_file_is_put_back(saved):
    """Leaves the module's model loadable for any test that runs after the property test."""
    folder, meta = saved
    (folder / "mlabel.json").write_text(json.dumps(meta))
    assert mlabel.load(folder).labels == LABELS


@pytest.mark.parametrize("labels,preprocessing,fragment", [
    (["a", ""], {}, "label 2 has an empty label name"),
    (["a", "b"], {"std": [0.0, 0.0, 0.0]}, r"preprocessing.std must be 3 numbers in \[0.001, 10\]"),
])
def test_a_model_load_would_refuse_is_never_saved(tmp_path, labels, preprocessing, fragment):
    model = mlabel.create_model("test_resnet", labels, image_size=32)
    model.preprocessing.update(preprocessing)
    with pytest.raises(ValueError, match=fragment):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())
