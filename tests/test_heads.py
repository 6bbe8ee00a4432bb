"""Classification heads against hand-written references, and their save/load round trip."""
import numpy as np
import pytest
import torch

import mlabel
from mlabel.models import CSRAHead


@pytest.mark.parametrize("lam,temperature", [(0.1, 1.0), (0.5, 3.0), (0.3, 99.0)])
def test_csra_equals_its_definition_computed_in_numpy(lam, temperature):
    torch.manual_seed(0)
    head = CSRAHead(8, 3, lam=lam, temperature=temperature).double()
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    fmap = torch.randn(2, 8, 12, dtype=torch.float64)
    got = head(fmap).detach().numpy()
    w, b, x = head.weight.detach().numpy(), head.bias.detach().numpy(), fmap.numpy()
    for n in range(2):
        for l in range(3):
            s = w[l] @ x[n] / np.linalg.norm(w[l])  # score at each of the 12 locations
            if temperature >= 99:
                att = s.max()
            else:
                a = np.exp(temperature * s - (temperature * s).max())
                att = (a / a.sum() * s).sum()
            assert got[n, l] == pytest.approx(s.mean() + lam * att + b[l], abs=1e-12)


def test_csra_without_attention_is_a_normalised_linear_layer_on_average_pooling():
    head = CSRAHead(8, 3, lam=0.0).double()
    fmap = torch.randn(4, 8, 9, dtype=torch.float64)
    w = head.weight / head.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(fmap), fmap.mean(2) @ w.T + head.bias)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
@pytest.mark.parametrize("head,args", [("mlp", {"hidden": 16, "dropout": 0.1}), ("csra", {"lam": 0.2, "temperature": 2.0})])
def test_heads_save_and_load_with_their_arguments(tmp_path, backbone, head, args):
    model = mlabel.create_model(backbone, ["a", "b"], head=head, head_args=args).eval()
    size = model.preprocessing["image_size"]
    images = torch.randn(2, 3, size, size)
    model.save_pretrained(tmp_path / "m")
    again = mlabel.load(tmp_path / "m")
    assert again.head_name == head and again.head_args == args
    torch.testing.assert_close(again(images), model(images))


def test_csra_reads_channels_last_feature_maps_of_nhwc_backbones():
    """Swin-like backbones return (N, H, W, C) feature maps (timm's output_fmt "NHWC"): the CSRA
    head must see channels, not rows, as features. Reference: timm's own average pooling."""
    import timm
    model = mlabel.MultiLabelClassifier("test_resnet", ["a", "b"], head="csra")
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_dim=16,
                             depths=(1, 1), num_heads=(1, 2), img_size=56, window_size=7)
    assert str(swin.output_fmt) == "NHWC"
    model.backbone = swin
    model.eval()
    x = torch.randn(2, 3, 56, 56)
    feature_map = model._feature_map(x)
    assert feature_map.shape == (2, swin.num_features, 49)
    with torch.no_grad():
        pooled = swin.forward_head(swin.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feature_map.mean(2), pooled)
