import pytest
import torch

import mlabel
from mlabel.engine import NonFiniteLossError, Stepper, build_scheduler, set_train_mode, train_one_epoch
from mlabel.losses import BCEWithLogits


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), (torch.rand(4, 2, generator=g) > 0.5).float())
            for _ in range(n)]


def _bn_stats(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}


@pytest.mark.parametrize("freeze_norm_stats", [False, True])
def test_freeze_norm_stats_keeps_running_statistics_but_trains_weights(freeze_norm_stats):
    torch.manual_seed(0)
    model = mlabel.create_model("test_resnet", ["a", "b"])
    before_stats = _bn_stats(model)
    before_conv = model.backbone.conv1[0].weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, 3, 1)
    set_train_mode(model, freeze_norm_stats=freeze_norm_stats)
    train_one_epoch(model, _batches(), BCEWithLogits(), Stepper(opt, sched), torch.device("cpu"), 1, quiet=True)
    after = _bn_stats(model)
    unchanged = all(torch.equal(before_stats[k], after[k]) for k in before_stats)
    assert unchanged == freeze_norm_stats
    assert not torch.equal(before_conv, model.backbone.conv1[0].weight)


def test_non_finite_loss_names_epoch_and_step():
    model = mlabel.create_model("test_resnet", ["a", "b"])
    batches = _batches()
    batches[1] = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="epoch 7, step 1"):
        train_one_epoch(model, batches, BCEWithLogits(), Stepper(opt, build_scheduler(opt, 3, 1)),
                        torch.device("cpu"), 7, quiet=True)


def test_warmup_then_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))
