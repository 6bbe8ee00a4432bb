"""Per-label calibration against scikit-learn's logistic regression on the same logits."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import mlabel
from mlabel.calibration import fit_calibration
from mlabel.metrics import calibration_error


def _miscalibrated(seed, n=4000):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, 3))
    true_scale, true_bias = np.array([0.5, 2.0, 1.0]), np.array([-1.0, 1.0, -2.5])
    targets = (rng.random((n, 3)) < 1 / (1 + np.exp(-(logits * true_scale + true_bias)))).astype(np.float32)
    return torch.from_numpy(logits).float(), torch.from_numpy(targets)


def test_platt_equals_unregularised_logistic_regression_per_label():
    logits, targets = _miscalibrated(0)
    scale, bias = fit_calibration(logits, targets, "platt")
    for j in range(3):
        ref = LogisticRegression(C=1e10, tol=1e-10, max_iter=1000).fit(logits[:, j:j + 1].numpy(), targets[:, j].numpy())
        assert scale[j].item() == pytest.approx(ref.coef_[0, 0], rel=1e-3)
        assert bias[j].item() == pytest.approx(ref.intercept_[0], abs=1e-3)


def test_temperature_fits_the_scale_only():
    logits, targets = _miscalibrated(1)
    scale, bias = fit_calibration(logits, targets, "temperature")
    assert torch.equal(bias, torch.zeros(3))
    for j in range(3):
        ref = LogisticRegression(C=1e10, fit_intercept=False, tol=1e-10, max_iter=1000).fit(
            logits[:, j:j + 1].numpy(), targets[:, j].numpy())
        assert scale[j].item() == pytest.approx(ref.coef_[0, 0], rel=1e-3)


def test_calibration_lowers_ece_and_keeps_the_ranking():
    logits, targets = _miscalibrated(2)
    scale, bias = fit_calibration(logits[:2000], targets[:2000], "platt")
    held_logits, held_targets = logits[2000:], targets[2000:]
    before = calibration_error(torch.sigmoid(held_logits), held_targets)
    after = calibration_error(torch.sigmoid(held_logits * scale + bias), held_targets)
    assert (after < before).all() and after.max() < 0.03
    assert torch.equal(torch.argsort(held_logits, 0), torch.argsort(held_logits * scale + bias, 0))


def test_labels_with_one_class_or_unknown_targets_are_handled():
    logits, targets = _miscalibrated(3, n=500)
    targets[:, 1] = 0
    targets[:100, 2] = -1
    scale, bias = fit_calibration(logits, targets, "platt")
    assert scale[1].item() == 1.0 and bias[1].item() == 0.0  # identity: nothing to fit
    ref = LogisticRegression(C=1e10, tol=1e-10, max_iter=1000).fit(logits[100:, 2:3].numpy(), targets[100:, 2].numpy())
    assert scale[2].item() == pytest.approx(ref.coef_[0, 0], rel=1e-3)


def test_model_applies_saves_and_loads_its_calibration(tmp_path):
    model = mlabel.create_model("test_resnet", ["a", "b", "c"])
    images = torch.randn(4, 3, 32, 32)
    plain = model.predict_proba(images)
    scale, bias = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([-1.0, 0.5, 0.0])
    model.set_calibration("platt", scale, bias)
    logits = model.eval()(images)
    torch.testing.assert_close(model.predict_proba(images), torch.sigmoid(logits * scale + bias))
    torch.testing.assert_close(model.predict_proba(images, calibrated=False), plain)
    model.save_pretrained(tmp_path / "m")
    again = mlabel.load(tmp_path / "m")
    assert again.calibration == "platt"
    torch.testing.assert_close(again.predict_proba(images), model.predict_proba(images))
    with pytest.raises(ValueError, match="positive"):
        model.set_calibration("platt", [-1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
