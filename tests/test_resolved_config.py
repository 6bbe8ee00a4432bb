"""Issue 28, item 3: a config resolved once. ``mlabel.config`` is a leaf (keys, types, ranges,
YAML; the checks against timm and the registries are :mod:`mlabel.checks`')."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"errors"}  # what mlabel.config may import from mlabel: modules that import nothing of it


def test_config_is_a_leaf_that_imports_neither_torch_nor_timm():
    code = ("import sys, mlabel.config as c; c.load_config('quickstart', ['train.epochs=2']); "
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_config_imports_only_leaf_modules_of_mlabel():
    tree = ast.parse((ROOT / "mlabel" / "config.py").read_text())
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    absolute = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
                if a.name.startswith("mlabel")]
    assert set(relative) <= LEAVES and absolute == [], (relative, absolute)


# --------------------------------------------------------------------------- resolve once, then freeze

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mlabel.config import Config, TrainConfig, all_keys, config_to_dict, load_config  # noqa: E402
from mlabel.data import build_splits  # noqa: E402
from mlabel.resolve import ASKED_KEYS, Machine, ResolvedConfig, resolve, saved_config  # noqa: E402

CPU = Machine(torch.device("cpu"), cores=2, hub=False)


def _quickstart(scene_csv, *extra) -> Config:
    return load_config("quickstart", [f"data.root={scene_csv}", "data.val=val.csv", "data.test=null",
                                      "data.generate=null", "model.backbone=test_resnet", "model.pretrained=auto",
                                      "data.resize=auto", "data.num_workers=auto", *extra])


def _dogcat(folder_dataset) -> Config:
    return load_config("dogcat", [f"data.root={folder_dataset}", "data.cache=auto", "data.augment=auto",
                                  "train.precision=auto", "train.schedule=auto"])


def _resolved(config: Config, scored=("val", "test")) -> ResolvedConfig:
    splits = build_splits(config.data, config.task, config.seed)
    return resolve(config, splits, CPU, scored=scored)


def _values(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _values(v)
    elif isinstance(value, list):
        for v in value:
            yield from _values(v)
    else:
        yield value


@pytest.mark.parametrize("recipe", ["quickstart", "dogcat"])
def test_a_resolved_config_holds_no_auto(recipe, scene_csv, folder_dataset):
    config = _quickstart(scene_csv) if recipe == "quickstart" else _dogcat(folder_dataset)
    assert "auto" in list(_values(config_to_dict(config)))  # the control: there was something to decide
    resolved = _resolved(config)
    tree = config_to_dict(resolved)
    for key in all_keys(resolved):
        value = tree
        for part in key.split("."):
            value = value[part]
        assert "auto" not in list(_values(value)), key
    assert config.train.device == "auto" and config.thresholds.policy == "auto"  # the config given is untouched


def test_what_each_auto_becomes(scene_csv, folder_dataset):
    multilabel = _resolved(_quickstart(scene_csv))
    assert (multilabel.task, multilabel.train.device, multilabel.data.resize) == ("multilabel", "cpu", "squish")
    assert multilabel.thresholds.policy == "lipton" and multilabel.thresholds.streaming is False
    assert multilabel.model.pretrained is False  # test_resnet has no offline weights
    assert multilabel.data.augment_on in ("device", "workers")
    assert _resolved(_quickstart(scene_csv, "task=auto")).task == "multilabel"
    assert {"train.device", "thresholds.policy", "thresholds.streaming"} <= multilabel.decided
    binary = _resolved(_dogcat(folder_dataset))
    assert (binary.task, binary.data.augment, binary.loss.pos_weight) == ("binary", "light", "ratio")
    assert "loss.pos_weight" in binary.decided
    assert binary.train.schedule == "cosine"  # offline weights named by the recipe
    assert binary.train.precision in ("bf16", "fp32")


def test_a_resolved_config_and_its_sections_are_frozen(scene_csv):
    resolved = _resolved(_quickstart(scene_csv))
    assert isinstance(resolved, Config) and isinstance(resolved.train, TrainConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.out_dir = "elsewhere"
    for f in dataclasses.fields(resolved):
        section = getattr(resolved, f.name)
        if dataclasses.is_dataclass(section):
            for key in dataclasses.fields(section):
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(section, key.name, getattr(section, key.name))
            with pytest.raises(dataclasses.FrozenInstanceError):
                delattr(section, dataclasses.fields(section)[0].name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.decided = frozenset()


def test_config_yaml_keeps_what_was_asked_where_each_run_decides_again(scene_csv):
    config = _quickstart(scene_csv)
    resolved = _resolved(config)
    saved, given = saved_config(config, resolved), config_to_dict(config)
    for key in ASKED_KEYS:
        section, _, name = key.rpartition(".")
        assert (saved[section] if section else saved)[name] == (given[section] if section else given)[name], key
    assert saved["data"]["resize"] == "squish" and saved["data"]["num_workers"] != "auto"  # decided and saved
    assert saved["model"]["pretrained"] is False
    changed = {f"{s}.{k}" for s, v in given.items() if isinstance(v, dict) for k in v if saved[s][k] != v[k]}
    assert changed <= {"data.resize", "data.augment", "data.box_crops", "data.cache", "data.num_workers",
                       "model.pretrained", "train.schedule", "train.precision"}, changed


def test_streaming_is_decided_by_the_splits_that_are_scored(scene_csv, monkeypatch):
    import mlabel.resolve as module
    config = _quickstart(scene_csv)
    monkeypatch.setattr(module, "STREAM_LIMIT", 24 * 6)  # val: 24 images x 6 labels, at the limit
    assert _resolved(config, scored=("val",)).thresholds.streaming is False
    assert _resolved(config, scored=("train",)).thresholds.streaming is True  # 48 images
    assert _resolved(_quickstart(scene_csv, "thresholds.streaming=false"), scored=("train",)).thresholds.streaming is False


def test_a_defaulted_policy_is_still_reported_as_auto(scene_csv):
    from mlabel.evaluation import EvalSettings
    settings = EvalSettings.from_config(_resolved(_quickstart(scene_csv)))
    assert (settings.thresholds.policy, settings.thresholds.defaulted) == ("lipton", True)
    chosen = EvalSettings.from_config(_resolved(_quickstart(scene_csv, "thresholds.policy=lipton")))
    assert chosen.thresholds.defaulted is False


def test_a_resolved_config_survives_pickling_and_copies(scene_csv):
    """Loader processes and checkpoints may carry it: a copy is equal, and frozen too."""
    import copy
    import pickle
    resolved = _resolved(_quickstart(scene_csv))
    for again in (pickle.loads(pickle.dumps(resolved)), copy.deepcopy(resolved)):
        assert again == resolved and again.decided == resolved.decided
        with pytest.raises(dataclasses.FrozenInstanceError):
            again.data.batch_size = 1
