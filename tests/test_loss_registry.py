"""Every registered loss against an independent reference, at extreme logits, with unknown targets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from mlabel.losses import LOSSES, AsymmetricLoss, BCEOnProbabilities, BCEWithLogits, FocalLoss, HingeLoss


def _batch(seed, n=16, labels=5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, labels, generator=g, dtype=torch.float64) * scale
    targets = (torch.rand(n, labels, generator=g) < 0.3).double()
    return logits, targets


def test_bce_with_label_smoothing_equals_functional_on_smoothed_targets():
    logits, targets = _batch(0)
    pw = torch.linspace(0.5, 4, 5, dtype=torch.float64)
    got = BCEWithLogits(pw, reduction="sum", label_smoothing=0.1)(logits, targets)
    ref = F.binary_cross_entropy_with_logits(logits, targets * 0.9 + 0.05, pos_weight=pw, reduction="sum")
    torch.testing.assert_close(got, ref)


def test_bce_prob_equals_bce_loss_and_needs_its_clamp():
    logits, targets = _batch(1)
    got = BCEOnProbabilities(reduction="none")(logits, targets)
    torch.testing.assert_close(got, F.binary_cross_entropy(torch.sigmoid(logits), targets, reduction="none"))
    pw = torch.tensor([2.0, 1, 1, 3, 1], dtype=torch.float64)
    p = torch.sigmoid(logits)
    manual = -(pw * targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    torch.testing.assert_close(BCEOnProbabilities(pw, reduction="none")(logits, targets), manual)
    # Where the clamp is needed: in float32 sigmoid(20) is exactly 1, so log(1 - p) is -inf.
    x = torch.tensor([[20.0, -120.0]])
    y = torch.tensor([[0.0, 1.0]])
    p = torch.sigmoid(x)
    assert torch.isinf(-(y * torch.log(p) + (1 - y) * torch.log(1 - p))).all()
    x.requires_grad_(True)
    loss = BCEOnProbabilities()(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # saturated near -log(eps) (in float32, 1 - 1e-7 rounds to 1 - 1.19e-7)
    assert loss.item() == pytest.approx(-np.log(1e-7), rel=0.01)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, -1.0), (0.0, 0.5)])
def test_focal_equals_torchvision(gamma, alpha):
    logits, targets = _batch(2)
    got = FocalLoss(gamma=gamma, alpha=alpha, reduction="none")(logits, targets)
    torch.testing.assert_close(got, sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none"))


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0), (0.0, 0.0, 0.0)])
def test_asl_equals_the_formula_computed_in_numpy(gamma_neg, gamma_pos, clip):
    logits, targets = _batch(3)
    x, y = logits.numpy(), targets.numpy()
    p = 1 / (1 + np.exp(-x))
    pm = np.maximum(p - clip, 0) if clip else p
    ref = -(y * (1 - p) ** gamma_pos * np.log(p) + (1 - y) * pm ** gamma_neg * np.log(1 - pm))
    got = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="none")(logits, targets)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    if gamma_neg == gamma_pos == clip == 0:  # ASL without its asymmetry is plain BCE
        torch.testing.assert_close(got, F.binary_cross_entropy_with_logits(logits, targets, reduction="none"))
    # The mean over elements is the authors' sum divided by N * L.
    mean = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    assert mean.item() == pytest.approx(ref.sum() / ref.size)


def test_hinge_uses_plus_minus_one_targets_and_margin():
    logits, targets = _batch(4)
    t = 2 * targets.numpy() - 1
    ref = np.maximum(0, 0.5 - t * logits.numpy())
    np.testing.assert_allclose(HingeLoss(margin=0.5, reduction="none")(logits, targets).numpy(), ref)
    # Its negative term is HingeEmbeddingLoss's -1 branch on -logits.
    neg = targets == 0
    torch.testing.assert_close(
        HingeLoss(margin=0.5, reduction="sum")(logits[neg][None], targets[neg][None]),
        F.hinge_embedding_loss(-logits[neg], -torch.ones_like(logits[neg]), margin=0.5, reduction="sum"))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_at_extreme_logits_and_masks_unknowns(name):
    x = torch.tensor([[100.0, -100.0, 100.0, -100.0, 3.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0, -1.0]])
    pw = torch.full((5,), 4.0)
    loss = LOSSES[name](pw)(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), name
    assert x.grad[0, 4] == 0  # the unknown target gives no gradient
    # mean over known elements only = the same loss on the known columns alone
    logits, targets = _batch(5)
    unknown = torch.rand(targets.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    masked = torch.where(unknown, torch.full_like(targets, -1), targets)
    per = LOSSES[name](reduction="none")(logits, targets)
    torch.testing.assert_close(LOSSES[name]()(logits, masked), per[~unknown].mean())
    weight = torch.rand(targets.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(LOSSES[name](reduction="sum")(logits, targets, weight=weight), (per * weight).sum())
