import pytest
import torch
import torch.nn.functional as F

import mlabel
from mlabel.losses import BCEWithLogits


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_equals_torch_with_pos_weight_and_weight(reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g) * 4
    targets = (torch.rand(16, 5, generator=g) > 0.7).float()
    pos_weight = torch.tensor([1.0, 2.5, 7.0, 0.5, 10.0])
    weight = torch.rand(16, 5, generator=g)
    ours = BCEWithLogits(pos_weight, reduction=reduction)(logits, targets, weight)
    ref = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, pos_weight=pos_weight,
                                             reduction=reduction)
    torch.testing.assert_close(ours, ref)


def test_bce_hand_computed_value():
    # one positive with pos_weight 3: 3 * -log(sigmoid(0)) = 3 log 2; one negative at logit 0: log 2
    loss = BCEWithLogits(torch.tensor([3.0]), reduction="sum")(torch.zeros(2, 1), torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(loss, torch.tensor(4 * torch.log(torch.tensor(2.0)).item()))


def test_unknown_targets_are_masked_and_mean_is_over_known():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    known = torch.tensor([[True, False], [True, True]])
    ref = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    torch.testing.assert_close(BCEWithLogits()(logits, targets), ref)


def test_bce_stays_finite_for_extreme_logits():
    logits = torch.tensor([[100.0, -100.0]])
    loss = BCEWithLogits()(logits, torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(100.0)


def test_auto_pos_weight_on_hand_made_table():
    targets = torch.tensor([
        [1, 0, 0, 1],
        [0, 0, 0, 1],
        [0, 1, 0, 1],
        [0, 0, 0, 1],
        [-1, 0, 0, 0],
    ], dtype=torch.float32)
    # label 0: 3 neg / 1 pos (one unknown ignored); label 1: 4/1; label 2: no positive -> bound;
    # label 3: 1 neg / 4 pos = 0.25
    with pytest.warns(UserWarning, match="no positive training example.*'c'"):
        weight = mlabel.pos_weight_from_targets(targets, max_weight=10.0, labels=["a", "b", "c", "d"])
    torch.testing.assert_close(weight, torch.tensor([3.0, 4.0, 10.0, 0.25]))


def test_auto_pos_weight_is_bounded_both_ways():
    targets = torch.zeros(1000, 2)
    targets[:1, 0] = 1      # 999 / 1
    targets[:999, 1] = 1    # 1 / 999
    weight = mlabel.pos_weight_from_targets(targets, max_weight=10.0)
    torch.testing.assert_close(weight, torch.tensor([10.0, 0.1]))
    assert torch.isfinite(weight).all()


def test_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        BCEWithLogits()(torch.zeros(2, 3), torch.zeros(2, 1))
