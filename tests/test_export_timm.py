"""``mlabel export --format timm`` (issue 30, item 2): a folder plain timm loads with
``timm.create_model("local-dir:DIR", pretrained=True)`` that gives mlabel's logits, whose
``pretrained_cfg`` makes ``resolve_data_config`` + ``create_transform`` prepare an image as mlabel
does, and a refusal for the heads timm cannot express."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mlabel
from mlabel.cli import main as cli_main
from mlabel.preprocess import preprocess_image

LOGIT_GOAL = 1e-5


def _export(model_dir, out) -> int:
    return cli_main(["export", str(model_dir), "--format", "timm", "--out", str(out)])


def test_timm_loads_the_folder_and_gives_mlabels_logits(tiny_run, scene_csv, tmp_path, capsys):
    out = tmp_path / "timm"
    assert _export(tiny_run, out) == 0
    assert "max |logit diff|" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = mlabel.load(tiny_run)
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert net.num_classes == model.num_labels
    assert list(net.pretrained_cfg["label_names"]) == model.labels
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    photos = model.preprocess(sorted((scene_csv / "images").glob("val*.png"))[:4])  # real inputs too
    with torch.no_grad():
        diff = max(float((net(x) - model(x)).abs().max()) for x in (images, photos))
    print(f"timm local-dir vs mlabel: max |logit diff| {diff:.2e} over 8 images")
    assert diff <= LOGIT_GOAL
    config = json.loads((out / "config.json").read_text())
    meta = json.loads((tiny_run / "model" / "mlabel.json").read_text())
    assert config["mlabel"]["thresholds"] == meta["thresholds"]  # the decision travels with the network
    assert config["mlabel"]["calibration"] == meta["calibration"]
    assert config["architecture"] == "test_resnet" and config["num_classes"] == model.num_labels


def _timm_transform(folder):
    net = timm.create_model(f"local-dir:{folder}", pretrained=True)
    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))


@pytest.mark.parametrize("resize,exact,upscaled", [
    # no resampling: the geometry (size, crop, squash / centre) and the normalisation alone
    ("squish", [(32, 32)], [(20, 24), (16, 16), (17, 23)]),
    ("crop", [(34, 34), (34, 50), (50, 34)], [(16, 16), (17, 17)]),
])
def test_timms_preprocessing_is_mlabels(tmp_path, resize, exact, upscaled):
    """timm's own pipeline from the exported ``pretrained_cfg`` gives mlabel's tensor: to float
    rounding where no pixel is resampled, within one grey level where both upsample (Pillow's
    bilinear for timm, OpenCV's for mlabel, rounding apart)."""
    model = mlabel.create_model("test_resnet", ["a", "b"], image_size=32, resize=resize)
    # ImageNet's mean and std (unequal per channel); mlabel's side round(32 / 0.95) = 34 where timm floors
    model.preprocessing.update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.95)
    model.save_pretrained(tmp_path / "model")
    assert _export(tmp_path / "model", tmp_path / "timm") == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())["pretrained_cfg"]
    assert config["crop_mode"] == ("squash" if resize == "squish" else "center")
    assert config["interpolation"] == model.preprocessing["interpolation"]
    transform = _timm_transform(tmp_path / "timm")
    rng = np.random.default_rng(0)
    level = 1 / 255 / min(model.preprocessing["std"])  # one grey level after normalisation
    for shapes, bound in ((exact, 1e-6), (upscaled, level + 1e-6)):
        for shape in shapes:
            pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            ours = preprocess_image(pixels, model.preprocessing)
            theirs = transform(Image.fromarray(pixels)).numpy()
            assert ours.shape == theirs.shape == (3, 32, 32)
            diff = float(np.abs(ours - theirs).max())
            print(f"{resize} {shape}: max |difference| {diff:.2e} (bound {bound:.2e})")
            assert diff <= bound, (resize, shape, diff)


@pytest.mark.parametrize("head", ["csra", "mlp"])
def test_a_head_timm_cannot_express_is_refused(tmp_path, capsys, head):
    mlabel.create_model("test_resnet", ["a", "b"], image_size=32, head=head).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert _export(tmp_path / "model", tmp_path / "timm") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert f"the {head} head has no equivalent in timm" in err and "--format onnx" in err
    assert not (tmp_path / "timm").exists()


def test_a_folder_out_that_holds_files_is_refused(tiny_run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert _export(tiny_run, out) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
