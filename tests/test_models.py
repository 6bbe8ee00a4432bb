import json

import pytest
import torch

import mlabel


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_logits_shape_per_label(backbone):
    model = mlabel.create_model(backbone, labels=["a", "b", "c"]).eval()
    size = model.preprocessing["image_size"]
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)
    assert model.task == "multilabel"


def test_binary_task_has_one_logit():
    model = mlabel.create_model("test_resnet", labels=["dog"]).eval()
    x = torch.randn(4, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (4, 1) and model.task == "binary"
    torch.testing.assert_close(model.predict_proba(x), torch.sigmoid(logits))


def test_forward_returns_raw_logits_and_predict_uses_per_label_thresholds():
    torch.manual_seed(0)
    model = mlabel.create_model("test_resnet", labels=["a", "b"]).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([8.0, -8.0]))  # logits far outside [0, 1]
    x = torch.randn(3, 3, 64, 64)
    logits = model(x)
    assert (logits[:, 0] > 1).all() and (logits[:, 1] < 0).all()
    probs = model.predict_proba(x)
    model.set_thresholds([0.999999, 0.0])
    torch.testing.assert_close(model.predict(x), probs >= torch.tensor([0.999999, 0.0]))


def test_save_load_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    model = mlabel.create_model("test_efficientnet", labels=["x", "y", "z"], image_size=48).eval()
    model.set_thresholds([0.2, 0.5, 0.9])
    x = torch.randn(5, 3, 48, 48)
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mlabel.json").read_text())
    assert meta["labels"] == ["x", "y", "z"] and meta["backbone"] == "test_efficientnet"
    assert meta["thresholds"] == pytest.approx([0.2, 0.5, 0.9])
    assert meta["preprocessing"]["image_size"] == 48 and len(meta["preprocessing"]["mean"]) == 3
    loaded = mlabel.load(tmp_path / "m")
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict(x), model.predict(x))
    assert loaded.labels == model.labels


def test_load_refuses_other_format_version(tmp_path):
    model = mlabel.create_model("test_resnet", labels=["a"])
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "mlabel.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "mlabel.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99"):
        mlabel.load(tmp_path)


def test_load_names_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="mlabel.json is missing"):
        mlabel.load(tmp_path)


def test_local_weights_file_loads_into_backbone(tmp_path):
    source = mlabel.create_model("test_resnet", labels=["a"])
    torch.save(source.backbone.state_dict(), tmp_path / "w.pth")
    model = mlabel.create_model("test_resnet", labels=["a", "b"], pretrained=str(tmp_path / "w.pth"))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_wrong_weights_file_is_an_error(tmp_path):
    torch.save(mlabel.create_model("test_efficientnet", labels=["a"]).backbone.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="do not fit"):
        mlabel.create_model("test_resnet", labels=["a"], pretrained=str(tmp_path / "w.pth"))


def test_labels_must_be_unique_and_non_empty():
    with pytest.raises(ValueError, match="unique"):
        mlabel.create_model("test_resnet", labels=["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        mlabel.create_model("test_resnet", labels=[])


def test_pretrained_true_builds_the_backbone_once(monkeypatch):
    """timm's hub model is the backbone itself (it was built a second time and copied over)."""
    import timm

    import mlabel.models
    calls = []
    real = timm.create_model

    def counting(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real(name, pretrained=False, **kwargs)  # no network in tests: same architecture

    monkeypatch.setattr(mlabel.models.timm, "create_model", counting)
    model = mlabel.create_model("test_resnet", ["a", "b"], pretrained=True)
    assert calls == [True]
    assert model.preprocessing == mlabel.models._resolve_preprocessing(model.backbone, None, "crop")


def test_model_spec_round_trips_and_names_missing_metadata(tmp_path):
    import json

    from mlabel.models import ModelSpec
    model = mlabel.create_model("test_resnet", ["a", "b"], head="mlp", head_args={"hidden": 8})
    model.set_calibration("platt", [2.0, 1.0], [0.0, 1.0])
    assert ModelSpec.from_meta(model.describe()) == model.spec
    rebuilt = model.spec.build()
    assert rebuilt.describe() == model.describe()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mlabel.json").read_text())
    del meta["backbone"]
    (tmp_path / "m" / "mlabel.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks \['backbone'\]"):
        mlabel.load(tmp_path / "m")
