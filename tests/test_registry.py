"""CONTRIBUTING.md's "Adding a loss or a head" example, run as written, and the argument checks."""
import json
import re
from pathlib import Path

import pytest
import torch

import mlabel
from mlabel.checks import load_checked
from mlabel.config import ConfigError, load_config
from mlabel.losses import LOSSES
from mlabel.models import HEADS

README = Path(__file__).resolve().parent.parent / "CONTRIBUTING.md"  # the example moved there from the README


@pytest.fixture
def example():
    """Executes the CONTRIBUTING.md block; the registries are restored afterwards."""
    text = README.read_text()
    section = text[text.index("## Adding a loss or a head"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    saved = dict(LOSSES), dict(HEADS)
    namespace = {}
    exec(compile(code, "README example", "exec"), namespace)
    yield namespace
    LOSSES.clear(), LOSSES.update(saved[0])
    HEADS.clear(), HEADS.update(saved[1])


def test_readme_example_registers_a_loss_and_a_head_that_train(example, tmp_path, scene_csv):
    loss = LOSSES["squared_hinge"](margin=0.5)
    logits, targets = torch.tensor([[0.2, -2.0]]), torch.tensor([[1.0, -1.0]])
    assert loss(logits, targets).item() == pytest.approx((0.5 - 0.2) ** 2)  # the unknown target is left out
    result = mlabel.fit("quickstart", [
        "model.backbone=test_resnet", "model.pretrained=false", "data.generate=null", f"data.root={scene_csv}",
        "data.val=val.csv", "data.test=null", "data.num_workers=0", "data.image_size=32", "data.batch_size=8",
        "train.epochs=1", "train.channels_last=false", "thresholds.cross_fit=0",
        "loss.name=squared_hinge", "loss.args.margin=0.5", "model.head=two_layer", "model.head_args.hidden=32",
        f"out_dir={tmp_path / 'run'}"], quiet=True)
    assert result.model.head[0].out_features == 32
    meta = json.loads((result.run_dir / "model" / "mlabel.json").read_text())
    assert meta["head"] == "two_layer" and meta["head_args"] == {"hidden": 32}
    assert mlabel.load(result.run_dir).head[2].out_features == len(result.model.labels)


@pytest.mark.parametrize("override, key, message", [
    ("loss.name=squared", "loss.name", "unknown loss 'squared'"),
    ("loss.args.gamma=2", "loss.name", "takes no argument ['gamma']"),
    ("model.head=mlp model.head_args.depth=3", "model.head", "takes no argument ['depth']"),
    ("model.head=big", "model.head", "unknown head 'big'"),
])
def test_unknown_parts_and_arguments_are_refused_at_config_time(override, key, message):
    with pytest.raises(ConfigError) as err:
        load_checked("quickstart", override.split())
    assert str(err.value).startswith(key) and message in str(err.value)


def test_flat_keys_still_configure_the_shipped_parts():
    from mlabel.config import head_kwargs
    from mlabel.losses import loss_kwargs
    cfg = load_config("quickstart", ["loss.name=focal", "loss.gamma=3", "model.head=csra", "model.csra_lambda=0.3"])
    assert loss_kwargs(cfg.loss) == {"gamma": 3.0, "alpha": 0.25}
    assert head_kwargs(cfg.model) == {"lam": 0.3, "temperature": 1.0}
    cfg = load_config("quickstart", ["loss.name=focal", "loss.gamma=3", "loss.args.gamma=1"])
    assert loss_kwargs(cfg.loss)["gamma"] == 1  # the argument dict wins over the flat key
