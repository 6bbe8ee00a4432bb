"""The Hugging Face Hub without a network (issue 30, item 1): ``mlabel push --dry-run`` writes
the folder a push uploads (compared file by file); ``mlabel pull`` and ``mlabel.load("hf://...")``
read a cache laid out as huggingface_hub lays it out (blobs, snapshots, refs) with
HF_HUB_OFFLINE=1; bad input is one error line and nothing written."""
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

import mlabel
from mlabel.cli import main as cli_main

REPO = "alice/scenes-test"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No connection may be made; the Hub's cache is a folder of the test's."""
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError(f"network reached: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _dry_run(run: Path, out: Path, *extra) -> int:
    return cli_main(["push", str(run), REPO, "--dry-run", str(out), *extra])


def test_dry_run_writes_the_model_and_its_card(tiny_run, tmp_path, capsys):
    out = tmp_path / "upload"
    assert _dry_run(tiny_run, out, "--with-report") == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "mlabel.json", "model.safetensors",
                                                     "report.html", "timm_model.safetensors"]
    for name in ("mlabel.json", "model.safetensors"):  # the model files as they are, byte for byte
        assert (out / name).read_bytes() == (tiny_run / "model" / name).read_bytes()
    assert (out / "report.html").read_bytes() == (tiny_run / "report" / "report.html").read_bytes()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    meta = json.loads((tiny_run / "model" / "mlabel.json").read_text())
    assert front["library_name"] == "mlabel" and front["pipeline_tag"] == "image-classification"
    assert front["base_model"] == "timm/test_resnet"
    got = {m["name"]: m["value"] for r in front["model-index"][0]["results"] for m in r["metrics"]}
    assert got == {"val mAP": metrics["val"]["mAP"], "val macro F1": metrics["val"]["macro_f1"],
                   "test mAP": metrics["test"]["mAP"], "test macro F1": metrics["test"]["macro_f1"]}
    for name, threshold in zip(meta["labels"], meta["thresholds"]):  # one row a label, its threshold
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
        assert row.split("|")[2].strip() == f"{threshold:.4f}"
        assert row.split("|")[4].strip() == f"{metrics['test']['per_label'][name]['ap']:.4f}"
    assert f'mlabel.load("hf://{REPO}")' in card
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in card  # a linear head: timm users too
    config = json.loads((out / "config.json").read_text())  # as mlabel export --format timm writes it
    assert config["label_names"] == meta["labels"] and config["num_classes"] == len(meta["labels"])
    assert config["pretrained_cfg"]["hf_hub_filename"] == "timm_model.safetensors"
    assert config["mlabel"]["thresholds"] == meta["thresholds"]


def test_timm_loads_a_pushed_model_from_the_hub_cache(tiny_run, tmp_path):
    """``timm.create_model("hf-hub:OWNER/NAME")`` on the pushed folder (from a cache laid out as
    huggingface_hub lays it out, offline) gives mlabel's logits: timm follows config.json to its
    weights beside mlabel's own model.safetensors."""
    import timm
    from huggingface_hub import constants
    staged = tmp_path / "upload"
    assert _dry_run(tiny_run, staged) == 0
    _as_hub_cache(staged, Path(constants.HF_HUB_CACHE), REPO)
    net = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    model = mlabel.load(tiny_run)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = float((net(images) - model(images)).abs().max())
    print(f"timm hf-hub vs mlabel: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5 and list(net.pretrained_cfg["label_names"]) == model.labels


def test_a_head_timm_cannot_express_is_pushed_without_timm_files(tmp_path):
    model_dir = tmp_path / "csra"
    mlabel.create_model("test_resnet", ["a", "b"], image_size=32, head="csra").save_pretrained(model_dir)
    out = tmp_path / "upload"
    assert _dry_run(model_dir, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "mlabel.json", "model.safetensors"]
    assert "hf-hub:" not in (out / "README.md").read_text()


def _as_hub_cache(folder: Path, cache: Path, repo: str, commit: str = "a" * 40) -> None:
    """``folder``'s files as huggingface_hub caches a snapshot: blobs named by their digest,
    the snapshot's files links to them, refs/main holding the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for path in folder.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, root / "blobs" / digest)
        (snap / path.name).symlink_to(f"../../blobs/{digest}")
    (root / "refs" / "main").write_text(commit)


def test_pull_and_hf_load_from_the_cache_offline(tiny_run, tmp_path):
    from huggingface_hub import constants
    staged = tmp_path / "upload"
    assert _dry_run(tiny_run, staged) == 0
    _as_hub_cache(staged, Path(constants.HF_HUB_CACHE), REPO)
    model = mlabel.load(f"hf://{REPO}")
    local = mlabel.load(tiny_run)
    assert model.labels == local.labels and torch.equal(model.thresholds, local.thresholds)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(images), local(images))
    out = tmp_path / "pulled"
    assert cli_main(["pull", REPO, "--out", str(out)]) == 0
    for name in ("mlabel.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tiny_run / "model" / name).read_bytes()


def test_a_pulled_model_that_fails_validation_writes_nothing(tiny_run, tmp_path, capsys):
    from huggingface_hub import constants
    staged = tmp_path / "upload"
    assert _dry_run(tiny_run, staged) == 0
    data = bytearray((staged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: the checksum in mlabel.json no longer holds
    (staged / "model.safetensors").write_bytes(bytes(data))
    _as_hub_cache(staged, Path(constants.HF_HUB_CACHE), REPO)
    out = tmp_path / "pulled"
    capsys.readouterr()
    assert cli_main(["pull", REPO, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv,fragment", [
    (["push", "{run}", "not-a-repo-id", "--dry-run", "{tmp}/x"], "is not a Hub repository id: give OWNER/NAME"),
    (["push", "{run}", "a/b--c", "--dry-run", "{tmp}/x"], "is not a Hub repository id"),
    (["pull", "bob/missing", "--out", "{tmp}/x"], "hf://bob/missing: could not be read"),
    (["push", "{tmp}", REPO, "--dry-run", "{tmp}/x"], "is neither a model directory"),
])
def test_bad_hub_input_is_one_error_line(tiny_run, tmp_path, capsys, argv, fragment):
    argv = [a.format(run=tiny_run, tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_a_model_that_fails_validation_is_refused_before_staging(tiny_run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    meta = json.loads((broken / "model" / "mlabel.json").read_text())
    meta["labels"] = meta["labels"][:-1]  # metadata that does not fit the weights
    (broken / "model" / "mlabel.json").write_text(json.dumps(meta))
    assert _dry_run(broken, tmp_path / "upload") == 2
    assert not (tmp_path / "upload").exists()


def test_without_huggingface_hub_the_extra_is_named(tiny_run, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    capsys.readouterr()
    assert cli_main(["push", str(tiny_run), REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pip install 'mlabel[hub]'" in err, err
