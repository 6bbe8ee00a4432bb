"""mlabel: multi-label and binary image classification on any timm backbone with BCE on logits,
per-label pos_weight, and per-label thresholds tuned on validation data and saved with the model.

Attributes are imported on first use, so ``python -m mlabel.predict model.onnx ...`` runs
without torch installed.
"""
from importlib import import_module
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:  # what the lazy attributes below resolve to, for IDEs and type checkers
    from . import audit
    from .calibration import fit_calibration
    from .checks import load_checked as load_config
    from .export import export_model
    from .losses import BCEWithLogits, pos_weight_from_targets
    from .metrics import evaluate_predictions
    from .models import MultiLabelClassifier, create_model, load
    from .policy import choose_thresholds
    from .thresholds import ThresholdTuner, tune_thresholds
    from .train import FitResult, fit

_EXPORTS = {
    "BCEWithLogits": "losses", "pos_weight_from_targets": "losses",
    "evaluate_predictions": "metrics",
    "MultiLabelClassifier": "models", "create_model": "models", "load": "models",
    "tune_thresholds": "thresholds", "ThresholdTuner": "thresholds", "choose_thresholds": "policy",
    "fit_calibration": "calibration", "export_model": "export",
    "fit": "train", "FitResult": "train", "load_config": "checks:load_checked",
}
# subpackages reached as attributes; mlabel.audit is callable: mlabel.audit(recipe, out=DIR) runs the audit
_SUBMODULES = ("audit",)

__all__ = [*_EXPORTS, "__version__"]  # the API page documents these; mlabel.audit has its own module docs


def __getattr__(name: str):
    if name in _SUBMODULES:  # importing it binds it here
        return import_module(f".{name}", __name__)
    if name in _EXPORTS:
        module, _, attribute = _EXPORTS[name].partition(":")  # "module" or "module:attribute"
        value = getattr(import_module(f".{module}", __name__), attribute or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlabel' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
