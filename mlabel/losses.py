"""The loss registry (``loss.name``: bce, bce_prob, focal, asl, hinge) and the rule that derives
the per-label ``pos_weight`` from label counts.

Targets are float 0/1 with the shape of the logits; -1 marks an unknown target, which every loss
leaves out (the mean is taken over the known elements only). ``pos_weight`` multiplies each
loss's positive term; ``weight`` multiplies elements.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import checked
from .outputs import Outputs, Targets

__all__ = ["MaskedLoss", "TaskLoss", "task_loss", "BCEWithLogits", "BCEOnProbabilities", "FocalLoss", "AsymmetricLoss", "HingeLoss", "LOSSES",
           "build_loss", "loss_kwargs", "pos_weight_from_targets", "DEFAULT_POS_WEIGHT_MAX"]

# neg/pos is bounded because a label with 3 positives in 30,000 would otherwise get a weight of
# 10,000: its few examples dominate every batch they appear in, gradients spike, and the
# probabilities drift far above the label's real frequency. The per-label threshold tuned on
# val sets the operating point anyway, so the weight only needs to keep rare labels from being
# ignored; 10 does that without destabilising training. The same bound applies below (1/10).
DEFAULT_POS_WEIGHT_MAX = 10.0


def loss_kwargs(loss) -> dict:
    """The constructor arguments of the ``loss`` section (:class:`mlabel.config.LossConfig`):
    the flat keys its loss takes, then ``loss.args``."""
    from ._registry import settable
    if loss.name not in LOSSES:
        return dict(loss.args)
    flat = {arg: getattr(loss, arg) for arg in settable(LOSSES[loss.name]) if hasattr(loss, arg)}
    return {**flat, **loss.args}

def pos_weight_from_targets(targets: torch.Tensor, max_weight: float = DEFAULT_POS_WEIGHT_MAX,
                            labels: Sequence[str] | None = None) -> torch.Tensor:
    """Per-label negatives / positives, bounded to ``[1 / max_weight, max_weight]``.

    Args:
        targets: (N, L) with 1 = positive, 0 = negative, -1 = unknown (ignored).
        max_weight: the bound; labels without positives get ``max_weight`` and a warning,
            labels without negatives get ``1 / max_weight``.
        labels: names used in the warning.

    Returns:
        (L,) float32, always finite.
    """
    targets = torch.as_tensor(targets, dtype=torch.float32)
    if targets.ndim == 1:
        targets = targets[:, None]
    return pos_weight_from_counts((targets == 1).sum(0), (targets == 0).sum(0), max_weight, labels)


def pos_weight_from_counts(positives, negatives, max_weight: float = DEFAULT_POS_WEIGHT_MAX,
                           labels: Sequence[str] | None = None) -> torch.Tensor:
    """:func:`pos_weight_from_targets` from per-label counts of positives and negatives (as a
    sparse label table gives them without a dense table)."""
    positives = torch.as_tensor(positives).float()
    negatives = torch.as_tensor(negatives).float()
    no_pos = positives == 0
    if no_pos.any():
        names = [labels[i] if labels else str(i) for i in no_pos.nonzero().flatten().tolist()]
        warnings.warn(f"labels with no positive training example: {names}; their pos_weight is "
                      f"set to the bound {max_weight:g}. Add positives or drop these labels.",
                      stacklevel=2)
    weight = negatives / positives.clamp(min=1)
    weight = torch.where(no_pos, torch.full_like(weight, max_weight), weight)
    return weight.clamp(1.0 / max_weight, max_weight)


class _MaskedLoss(nn.Module):
    """Shared frame: unknown targets (-1) masked out, per-element ``weight``, a per-label
    ``pos_weight`` on the positive term, and ``reduction`` mean (over known elements) | sum | none.
    Subclasses give the per-element loss of their positive and negative terms."""

    def __init__(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """logits, targets: (N, L); weight: broadcastable to (N, L)."""
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                             "must have the same shape")
        known = (targets >= 0).to(logits.dtype)
        loss = self.elementwise(logits, targets.clamp(min=0).to(logits.dtype))
        if weight is not None:
            loss = loss * weight
        loss = loss * known  # a product, so NaN cannot leak from masked elements: they are finite
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / known.sum().clamp(min=1)

    def _weigh(self, positive: torch.Tensor, negative: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.pos_weight is not None:
            positive = positive * self.pos_weight
        return targets * positive + (1 - targets) * negative


MaskedLoss = _MaskedLoss  # the public name of the frame a new loss subclasses


class BCEWithLogits(_MaskedLoss):
    """``BCEWithLogitsLoss`` with a per-label ``pos_weight``, per-element ``weight``, optional
    label smoothing (targets become ``y (1 - s) + s / 2``) and unknown targets (-1) masked out.

    With no unknown targets and no smoothing it equals ``F.binary_cross_entropy_with_logits``.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__(pos_weight, reduction)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def elementwise(self, logits, targets):
        targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")


class BCEOnProbabilities(_MaskedLoss):
    """``BCELoss`` on ``sigmoid(logits)``: the textbook path, kept for comparison.

    Less stable than :class:`BCEWithLogits`: in float32 ``sigmoid(17)`` is exactly 1, so
    ``log(1 - p)`` is ``-inf`` and its gradient ``1 / (1 - p)`` is infinite. The probabilities are
    therefore clamped to ``[eps, 1 - eps]``: the loss saturates at ``-log(eps)`` and the gradient
    of a saturated element is 0 (the model stops learning from its worst mistakes, which
    BCE on logits never does).
    """

    def __init__(self, pos_weight=None, reduction: str = "mean", eps: float = 1e-7, label_smoothing: float = 0.0):
        super().__init__(pos_weight, reduction)
        self.eps = eps
        self.label_smoothing = label_smoothing

    def elementwise(self, logits, targets):
        targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        p = torch.sigmoid(logits).clamp(self.eps, 1 - self.eps)
        return self._weigh(-torch.log(p), -torch.log1p(-p), targets)


class FocalLoss(_MaskedLoss):
    """Sigmoid focal loss (Lin et al. 2017): ``alpha_t (1 - p_t)^gamma BCE``; ``alpha`` None or
    negative turns the class balancing off. Equals ``torchvision.ops.sigmoid_focal_loss``."""

    def __init__(self, pos_weight=None, reduction: str = "mean", gamma: float = 2.0, alpha: float | None = 0.25):
        super().__init__(pos_weight, reduction)
        self.gamma, self.alpha = gamma, alpha

    def elementwise(self, logits, targets):
        p = torch.sigmoid(logits)
        positive = (1 - p).pow(self.gamma) * -F.logsigmoid(logits)
        negative = p.pow(self.gamma) * -F.logsigmoid(-logits)
        if self.alpha is not None and self.alpha >= 0:
            positive, negative = self.alpha * positive, (1 - self.alpha) * negative
        return self._weigh(positive, negative, targets)


class AsymmetricLoss(_MaskedLoss):
    """Asymmetric loss (Ridnik et al. 2021): positives ``(1 - p)^gamma_pos * -log p``; negatives
    use the shifted probability ``p_m = max(p - clip, 0)``: ``p_m^gamma_neg * -log(1 - p_m)``.

    Scale: the authors' code returns the **sum** over images and labels; here the default
    reduction is the **mean** over known elements, i.e. their value / (N * L). Learning rates
    from their recipes must be scaled accordingly (or use ``reduction="sum"``).

    Gradient: as in the published training (the official code's
    ``disable_torch_grad_focal_loss=True``), no gradient flows through the focusing weights
    ``(1 - p)^gamma_pos`` and ``p_m^gamma_neg``; ``focal_grad=True`` lets it flow (this class's
    behaviour before). Values are the same either way, except that the official code clamps
    ``log p`` at ``log(1e-8)``, so below a logit of about -18.4 its positive term stops growing,
    where ``-logsigmoid`` here keeps growing linearly.
    """

    def __init__(self, pos_weight=None, reduction: str = "mean", gamma_neg: float = 4.0,
                 gamma_pos: float = 0.0, clip: float = 0.05, focal_grad: bool = False):
        super().__init__(pos_weight, reduction)
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must lie in [0, 1), got {clip}")
        self.gamma_neg, self.gamma_pos, self.clip, self.focal_grad = gamma_neg, gamma_pos, clip, focal_grad

    def elementwise(self, logits, targets):
        p = torch.sigmoid(logits)
        if self.clip > 0:
            shifted = (p - self.clip).clamp(min=0)
            log_not = torch.log((1 - shifted).clamp(min=self.clip))  # 1 - p_m >= clip: finite
        else:
            shifted, log_not = p, F.logsigmoid(-logits)
        weight_pos, weight_neg = (1 - p).pow(self.gamma_pos), shifted.pow(self.gamma_neg)
        if not self.focal_grad:
            weight_pos, weight_neg = weight_pos.detach(), weight_neg.detach()
        positive = weight_pos * -F.logsigmoid(logits)
        negative = weight_neg * -log_not
        return self._weigh(positive, negative, targets)


class HingeLoss(_MaskedLoss):
    """Hinge on logits with ±1 targets (``t = 2y - 1``): ``max(0, margin - t * logit)``.

    The ±1 target convention and margin of ``HingeEmbeddingLoss``, applied to logits as scores:
    ``HingeEmbeddingLoss`` itself takes distances (its positive term ``x`` pulls toward 0), so on
    logits both terms are hinges. Hinge logits are not probabilities: the per-label calibration
    fitted on val (``calibration.method: platt``) maps them to calibrated ones.
    """

    def __init__(self, pos_weight=None, reduction: str = "mean", margin: float = 1.0):
        super().__init__(pos_weight, reduction)
        self.margin = margin

    def elementwise(self, logits, targets):
        return self._weigh(F.relu(self.margin - logits), F.relu(self.margin + logits), targets)


class TaskLoss(nn.Module):
    """The training objective on named outputs and targets (:mod:`mlabel.outputs`): the
    classification loss on the label logits, plus, with a regression ``kind`` (``mse`` or ``l1``),
    ``weight`` x the regression loss (mean over known targets; NaN = missing). The regression
    targets are standardised with the training split's ``mean``/``std`` so both terms have
    comparable scales whatever the units."""

    def __init__(self, classification: nn.Module, kind: str | None = None, weight: float = 1.0,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        if kind not in (None, "mse", "l1"):
            raise ValueError(f"unknown regression loss {kind!r}; available: ['l1', 'mse']")
        self.classification, self.kind, self.weight = classification, kind, weight
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else 0.0).float())
        self.register_buffer("std", torch.as_tensor(std if std is not None else 1.0).float())

    def forward(self, outputs: Outputs, targets: Targets) -> torch.Tensor:
        loss = self.classification(outputs.logits, targets.labels)
        if self.kind is None or targets.regression is None:
            return loss
        known = ~torch.isnan(targets.regression)
        if known.any():
            error = outputs.regression - ((targets.regression - self.mean) / self.std).nan_to_num()
            per = error.square() if self.kind == "mse" else error.abs()
            loss = loss + self.weight * (per * known).sum() / known.sum()
        return loss


def task_loss(loss_fn: nn.Module) -> TaskLoss:
    """``loss_fn`` as a :class:`TaskLoss` (a plain classification loss gets the label logits)."""
    return loss_fn if isinstance(loss_fn, TaskLoss) else TaskLoss(loss_fn)


LOSSES = {"bce": BCEWithLogits, "bce_prob": BCEOnProbabilities, "focal": FocalLoss,
          "asl": AsymmetricLoss, "hinge": HingeLoss}


def build_loss(name: str, pos_weight: torch.Tensor | None = None, **args) -> _MaskedLoss:
    """The classification loss registered as ``name`` in :data:`LOSSES`, built with its
    constructor's keyword ``args`` (checked against its signature). A new loss is a subclass of
    ``_MaskedLoss`` with an ``elementwise`` method and one line: ``LOSSES["name"] = Class``."""
    return checked(LOSSES, name, args, "loss")(pos_weight, **args)
