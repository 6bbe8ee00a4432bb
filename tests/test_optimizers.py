"""Optimizers from timm's factory (issue 28, item 6): the default is the AdamW mlabel always
used, step for step; any name timm.optim knows is accepted, checked at config time; layer decay
scales the backbone's layer groups."""
import pytest
import torch

from mlabel.checks import load_checked
from mlabel.config import ConfigError
from mlabel.engine import build_optimizer
from mlabel.models import create_model


def _reference_adamw(model, lr, weight_decay, scale):
    """The optimizer mlabel built by hand before: AdamW, no decay on biases and norms."""
    groups = {}
    for name, param in model.named_parameters():
        groups.setdefault((name.startswith("backbone."), param.ndim > 1), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": lr * (scale if bb else 1.0), "weight_decay": weight_decay if d else 0.0}
                              for (bb, d), ps in groups.items()], lr=lr)


def _steps(model, optimizer, n=3):
    torch.manual_seed(0)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_default_is_the_hand_built_adamw_step_for_step():
    torch.manual_seed(1)
    a = create_model("test_resnet", ["x", "y"], False)
    b = create_model("test_resnet", ["x", "y"], False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()  # batch-norm statistics out of the comparison
    got = _steps(a, build_optimizer(a, 1e-2, 0.05, 0.5))
    want = _steps(b, _reference_adamw(b, 1e-2, 0.05, 0.5))
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("name,cls", [("sgd", "SGD"), ("lamb", "Lamb"), ("lion", "Lion"), ("adan", "Adan"),
                                      ("lars", "Lars")])
def test_timm_optimizers_by_name(name, cls):
    model = create_model("test_resnet", ["x"], False)
    optimizer = build_optimizer(model, 1e-3, 0.01, name=name)
    assert type(optimizer).__name__ == cls
    if name == "sgd":  # timm's "sgd" is SGD with Nesterov momentum
        assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.9


def test_layer_decay_shrinks_the_backbone_from_the_head_down():
    model = create_model("test_vit", ["x", "y"], False)
    optimizer = build_optimizer(model, 1e-3, 0.05, name="adamw", layer_decay=0.5)
    head_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lrs[i] for i in head_ids} == {1e-3}
    layers = sorted({round(lr, 12) for lr in lrs.values()})
    # timm's layer groups of the backbone, each half the one above it
    assert len(layers) >= 3 and all(b == pytest.approx(2 * a) for a, b in zip(layers, layers[1:]))
    first = next(p for n, p in model.named_parameters() if "patch_embed" in n)
    assert lrs[id(first)] == layers[0]


@pytest.mark.parametrize("override,fragment", [
    ("train.optimizer=adamm", r"train.optimizer: timm.optim has no optimizer 'adamm' \(did you mean"),
    ("train.optimizer_args.betaz=1", r"train.optimizer: adamw takes no argument \['betaz'\]"),
    ("train.layer_decay=1.5", r"train.layer_decay must lie in \(0, 1\]"),
])
def test_bad_optimizer_settings_fail_at_config_time(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_checked("quickstart", [override])


def test_a_run_with_lamb_and_layer_decay(tmp_path, scene_csv):
    from mlabel.train import main as train_main
    out = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={out}", f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
                       "data.generate=null", "model.backbone=test_resnet", "model.pretrained=false", "data.image_size=32",
                       "data.num_workers=0", "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1",
                       "train.optimizer=lamb", "train.layer_decay=0.8", "train.optimizer_args.trust_clip=true",
                       "--quiet"]) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(saved["optimizer"]["param_groups"]) > 4  # the layer groups
