"""The decision policy of a model: calibration, then one threshold per label.

``logits -> probabilities -> decisions`` lives here once, for ``predict_proba`` / ``predict``
and for the exported graphs (ONNX, TorchScript). Its tensors are buffers that are not part of
the weights file: they travel in ``mlabel.json`` (:meth:`describe`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Decision"]


class Decision(nn.Module):
    """Per label: ``p = sigmoid(scale * logit + bias)`` (plain sigmoid without a calibration)
    and the decision ``p >= threshold``."""

    def __init__(self, num_labels: int, thresholds: Sequence[float] | None = None,
                 calibration: dict | None = None):
        super().__init__()
        self.num_labels = num_labels
        initial = torch.full((num_labels,), 0.5) if thresholds is None else torch.as_tensor(thresholds)
        self.register_buffer("thresholds", initial.float().clone(), persistent=False)
        self.method: str | None = None
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        if calibration:
            self.set_calibration(calibration["method"], calibration["scale"], calibration["bias"])

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor) -> None:
        th = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        if th.numel() != self.num_labels:
            raise ValueError(f"expected {self.num_labels} thresholds, got {th.numel()}")
        self.thresholds = th.to(self.thresholds.device)

    def set_calibration(self, method: str | None, scale=None, bias=None) -> None:
        """Use ``sigmoid(scale * logit + bias)`` per label (``None`` / ``"none"`` turns it off)."""
        if method in (None, "none"):
            self.method, self.scale, self.bias = None, None, None
            return
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
        if scale.numel() != self.num_labels or bias.numel() != self.num_labels:
            raise ValueError(f"calibration needs {self.num_labels} scales and biases")
        if not bool((scale > 0).all()):
            raise ValueError("calibration scales must be positive (an increasing map keeps the ranking)")
        device = self.thresholds.device
        self.method, self.scale, self.bias = method, scale.to(device), bias.to(device)

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Logits (N, L) -> probabilities (float32), calibrated when there is a calibration."""
        if calibrated and self.method is not None:
            return torch.sigmoid(logits.float() * self.scale + self.bias)
        return torch.sigmoid(logits.float())

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, L) -> (probabilities, decisions ``probabilities >= thresholds``)."""
        probs = self.probabilities(logits)
        return probs, probs >= self.thresholds

    def describe(self) -> dict:
        """The JSON fields of ``mlabel.json``: ``thresholds`` and ``calibration``."""
        return {"thresholds": [float(t) for t in self.thresholds.cpu()],
                "calibration": None if self.method is None else {
                    "method": self.method, "scale": [float(v) for v in self.scale.cpu()],
                    "bias": [float(v) for v in self.bias.cpu()]}}
