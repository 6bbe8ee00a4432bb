"""Per-label probability calibration fitted on validation logits.

``sigmoid(scale * logit + bias)`` per label: ``temperature`` fits only the scale (1 / T),
``platt`` both. Platt is the default in recipes because ``pos_weight`` shifts a label's logits
by about ``log(pos_weight)``: a bias that a temperature alone cannot undo. Both maps are
increasing (the scale is kept positive), so rankings, AP and AUROC do not change; the thresholds
are tuned after calibration, on the calibrated probabilities.
"""
from __future__ import annotations

import torch

from .metrics import _as_tensors

__all__ = ["fit_calibration", "apply_calibration", "CALIBRATION_METHODS"]

CALIBRATION_METHODS = ("none", "temperature", "platt")


def fit_calibration(logits, targets, method: str = "platt", max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit per-label ``scale`` and ``bias`` (L,) minimising the mean BCE on known targets.

    Labels without both classes keep the identity (scale 1, bias 0). Returns float32 tensors.
    """
    if method not in ("temperature", "platt"):
        raise ValueError(f"unknown calibration method {method!r}; available: {list(CALIBRATION_METHODS)}")
    logits, targets = _as_tensors(logits, targets)
    logits, targets = logits.cpu(), targets.cpu()
    known = (targets >= 0).double()
    positive = (targets == 1).double()
    n_known = known.sum(0).clamp(min=1)
    fit = ((positive * known).sum(0) > 0) & (((1 - positive) * known).sum(0) > 0)
    log_scale = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=method == "platt")
    params = [log_scale, bias] if method == "platt" else [log_scale]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        z = logits * log_scale.exp() + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, positive, reduction="none")
        # The labels are independent: the sum of their mean losses has per-label optima.
        total = ((loss * known).sum(0) / n_known)[fit].sum()
        total.backward()
        return total

    if fit.any():
        optimizer.step(closure)
    # Logits that carry no signal drive the scale towards 0: keep it positive (the map increasing).
    scale = log_scale.detach().exp().clamp(min=1e-6)
    shift = bias.detach()
    fit &= torch.isfinite(scale) & torch.isfinite(shift)
    scale = torch.where(fit, scale, torch.ones_like(scale))
    shift = torch.where(fit, shift, torch.zeros_like(shift))
    return scale.float(), shift.float()


def apply_calibration(logits: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Calibrated probabilities ``sigmoid(scale * logits + bias)`` (plain sigmoid without them)."""
    if scale is None:
        return torch.sigmoid(logits)
    return torch.sigmoid(logits * scale.to(logits) + bias.to(logits))  # in the logits' dtype and device
