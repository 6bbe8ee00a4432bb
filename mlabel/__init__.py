"""mlabel: multi-label and binary image classification on any timm backbone with BCE on logits,
per-label pos_weight, and per-label thresholds tuned on validation data and saved with the model."""
__version__ = "0.1.0"

from .losses import BCEWithLogits, pos_weight_from_targets
from .metrics import evaluate_predictions
from .models import MultiLabelClassifier, create_model, load
from .thresholds import tune_thresholds

__all__ = ["BCEWithLogits", "MultiLabelClassifier", "create_model", "evaluate_predictions", "load",
           "pos_weight_from_targets", "tune_thresholds", "__version__"]
