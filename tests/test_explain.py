"""Per-label heat maps (issue 32): the exact CAM of a linear head against a brute-force
computation, maps that move with the object, ViT tokens on their grid, the model unchanged by
explaining, and clear errors."""
import numpy as np
import pytest
import torch

import mlabel
from mlabel.explain import overlay
from mlabel.models import create_model

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("test_resnet", LABELS, False).eval()


def test_cam_equals_the_head_row_times_the_feature_map(resnet):
    images = torch.rand(2, 3, 64, 64)
    got = resnet.explain(images, labels=LABELS, method="cam")
    assert got.method == "cam"
    with torch.no_grad():  # brute force: each location's features times the label's weights
        fmap = resnet.backbone.forward_features(images)  # (N, C, h, w)
        logits = resnet(images)
        for i in range(2):
            for k in range(3):
                raw = np.zeros(fmap.shape[2:])
                for y in range(fmap.shape[2]):
                    for x in range(fmap.shape[3]):
                        raw[y, x] = float(resnet.head.weight[k] @ fmap[i, :, y, x])
                # the map decomposes the logit: its mean plus the bias is the logit
                assert raw.mean() + float(resnet.head.bias[k]) == pytest.approx(float(logits[i, k]), abs=1e-4)
                up = torch.nn.functional.interpolate(torch.tensor(raw)[None, None].float(), size=(64, 64),
                                                     mode="bilinear", align_corners=False)[0, 0].numpy()
                want = (up - up.min()) / (up.max() - up.min())
                np.testing.assert_allclose(got.maps[i][k], want, atol=1e-5)
    assert got.maps[0].shape == (3, 64, 64) and got.maps[0].dtype == np.float32
    assert all(0 <= m.min() and m.max() <= 1 for m in got.maps)
    np.testing.assert_allclose(got.probabilities[1], resnet.predict_proba(images)[1].numpy(), rtol=1e-6)


def _square(left: bool) -> torch.Tensor:
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 24:40, (4 if left else 44):(20 if left else 60)] = 1.0
    return image


def test_maps_move_with_the_object():
    """A linear head trained in a few steps to find a bright square: the map's peak follows it."""
    torch.manual_seed(0)
    model = create_model("test_resnet", ["square"], False)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for step in range(30):  # squares at random places are positive, empty images negative
        batch, target = [], []
        for _ in range(8):
            image = torch.rand(1, 3, 64, 64) * 0.1
            if np.random.default_rng(step * 8 + len(batch)).random() < 0.5:
                x, y = np.random.default_rng(step * 97 + len(batch)).integers(0, 48, 2)
                image[:, :, y:y + 16, x:x + 16] = 1.0
                target.append(1.0)
            else:
                target.append(0.0)
            batch.append(image)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.cat(batch))[:, 0], torch.tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for method in ("cam", "gradcam", "hirescam", "auto"):
        left = model.explain(_square(True), labels="square", method=method).maps[0][0]
        right = model.explain(_square(False), labels="square", method=method).maps[0][0]
        left_x = np.unravel_index(left.argmax(), left.shape)[1]
        right_x = np.unravel_index(right.argmax(), right.shape)[1]
        assert left_x < 32 <= right_x, (method, left_x, right_x)


def test_vit_tokens_on_their_grid_and_auto_picks_gradcam():
    torch.manual_seed(0)
    vit = create_model("test_vit", LABELS, False, image_size=64).eval()
    images = torch.rand(1, 3, 64, 64)
    got = vit.explain(images, labels=["b"], method="auto")
    assert got.method == "gradcam"  # the class token pools a ViT: cam would not decompose its logit
    # the last block's input: the class token is pooled after that block mixed the patches into it
    assert got.extra == {"layer": "blocks.4", "input_size": [64, 64]}
    assert got.maps[0].shape == (1, 64, 64)
    hires = vit.explain(images, labels=LABELS, method="hirescam").maps[0]
    net = vit.backbone
    with torch.no_grad():
        tokens = net.blocks[:-1](net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images)))))
    tokens.requires_grad_()
    logits = vit.head(net.forward_head(net.norm(net.blocks[-1](tokens)), pre_logits=True))[0]
    shown = 0
    for k in range(3):  # brute force: the patch tokens (class token dropped) on their 4 x 4 grid
        grad, = torch.autograd.grad(logits[k], tokens, retain_graph=True)
        raw = (grad * tokens)[0, 1:].sum(1).clamp_min(0).reshape(4, 4).detach()
        up = torch.nn.functional.interpolate(raw[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        if up.max() > up.min():
            shown += 1
            np.testing.assert_allclose(hires[k], ((up - up.min()) / (up.max() - up.min())).numpy(), atol=1e-5)
        else:  # nothing speaks for the label anywhere: a flat map is all zeros
            assert not hires[k].any()
    assert shown


def test_csra_uses_its_own_class_scores():
    torch.manual_seed(0)
    model = create_model("test_resnet", LABELS, False, head="csra").eval()
    images = torch.rand(1, 3, 64, 64)
    got = model.explain(images, labels=["c"])
    assert got.method == "csra"
    with torch.no_grad():
        grid = model.backbone.forward_features(images)
        score = torch.einsum("nchw,c->nhw", grid, model.head.weight[2]) / model.head.weight[2].norm()
    assert np.unravel_index(got.maps[0][0].argmax(), (64, 64)) is not None
    low = torch.nn.functional.interpolate(score[None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(got.maps[0][0], ((low - low.min()) / (low.max() - low.min())).numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["cam", "gradcam", "hirescam", "auto", "gradcam++"])
def test_explaining_changes_nothing(resnet, method):
    images = torch.rand(2, 3, 64, 64)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    probs = resnet.predict_proba(images)
    resnet.train()  # its mode is given back
    resnet.explain(images, labels=["a", "c"], method=method)
    assert resnet.training
    resnet.eval()
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())
    assert torch.equal(resnet.predict_proba(images), probs)
    assert all(p.grad is None for p in resnet.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in resnet.modules())


def test_default_labels_are_those_predicted_positive(resnet):
    images = torch.rand(3, 3, 64, 64)
    resnet.set_thresholds(torch.tensor([0.0, 1.1, 0.0]))  # a and c always, b never
    try:
        got = resnet.explain(images)
    finally:
        resnet.set_thresholds(torch.full((3,), 0.5))
    assert got.labels == [["a", "c"]] * 3


def test_bad_requests(resnet):
    with pytest.raises(ValueError, match=r"label 'bb' is not one of the model's labels \(did you mean 'b'\?\)"):
        resnet.explain(torch.rand(1, 3, 64, 64), labels=["bb"])
    with pytest.raises(ValueError, match=r"unknown explanation method 'gradcamm' \(did you mean 'gradcam'\?\)"):
        resnet.explain(torch.rand(1, 3, 64, 64), method="gradcamm")


def test_overlay_is_an_image_of_the_input_size():
    image = np.full((40, 50, 3), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[0, 0] = 1
    out = overlay(image, heat, alpha=0.5)
    assert out.size == (50, 40)
    pixels = np.asarray(out).astype(int)
    assert pixels[0, 0, 0] > pixels[-1, -1, 0] and pixels[-1, -1, 2] > pixels[0, 0, 2]  # hot: red, cold: blue


# --------------------------------------------------------------------------- mlabel predict --explain

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("explain")
    model = create_model("test_resnet", ["circle", "a b", "a_b"], False, image_size=32)
    model.set_thresholds(torch.tensor([0.0, 0.0, 1.0]))  # circle and "a b" always, a_b never
    model.save_pretrained(folder / "model")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        from PIL import Image
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"not an image")
    return folder


def test_predict_explain_writes_overlays_and_maps(saved, tmp_path):
    from mlabel.predict import main as predict_main
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    plain = tmp_path / "plain.csv"
    assert predict_main([str(saved / "model"), str(saved / "images"), "--out", str(plain), "--quiet"]) == 0
    assert predict_main([str(saved / "model"), str(saved / "images"), "--out", str(out), "--explain", str(maps),
                         "--quiet"]) == 0
    assert out.read_bytes() == plain.read_bytes()  # the CSV is unchanged by --explain
    written = sorted(p.name for p in maps.iterdir())
    assert written == ["maps.npz", "one__a_b.png", "one__circle.png", "two__a_b.png", "two__circle.png"]
    with np.load(maps / "maps.npz", allow_pickle=False) as stored:  # no pickles inside
        assert list(stored["labels"]) == ["circle", "a b", "circle", "a b"]
        assert stored["maps"].shape == (4, 32, 32) and stored["maps"].dtype == np.float32
        paths = list(stored["paths"])
        image = stored["image"]
        model = mlabel.load(saved / "model").to(memory_format=torch.channels_last)  # as predict runs it
        from mlabel.preprocess import preprocess_image
        first = torch.from_numpy(preprocess_image(paths[image[0]], model.preprocessing))[None]
        np.testing.assert_allclose(stored["maps"][0], model.explain(first, labels=["circle"]).maps[0][0], atol=1e-6)


def test_predict_explain_labels_and_bad_requests(saved, tmp_path, capsys):
    from mlabel.predict import main as predict_main
    base = [str(saved / "model"), str(saved / "images"), "--out", str(tmp_path / "p.csv"), "--quiet"]
    assert predict_main([*base, "--explain", str(tmp_path / "m"), "--explain-labels", "a_b"]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["maps.npz", "one__a_b-2.png", "two__a_b-2.png"]
    capsys.readouterr()
    for extra, fragment in ((["--explain", str(tmp_path / "x"), "--explain-labels", "circel"], "did you mean 'circle'"),
                            (["--explain", str(saved / "model")], "lies in the model directory"),
                            (["--explain-labels", "circle"], "--explain-labels needs --explain")):
        assert predict_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and fragment in err, err
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- the report's galleries

def test_report_tiles_carry_the_heat_map_of_their_label(tiny_run, tmp_path):
    import json
    import re
    import shutil

    from mlabel.report import main as report_main
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert report_main([str(run), "--quiet"]) == 0
    page = (run / "report" / "report.html").read_text()
    thumbs = json.loads(re.search(r'<script type="application/json" id="thumbs">(.*?)</script>', page, re.S).group(1))
    cams = re.findall(r'<img class="cam" data-thumb="(\d+)" alt="heat map of ([^"]+)">', page)
    plain = re.findall(r'<img class="plain" data-thumb="(\d+)"', page)
    assert cams and len(cams) == len(plain)  # every readable tile has its map
    assert all(thumbs[int(i)].startswith("data:image/jpeg;base64,") for i, _ in cams)
    assert "show heat maps" in page and "#galleries.show-maps .tile img.cam{display:block}" in page
    # a per-label tile's map is of its label: the section's label names each map in it
    galleries = page[page.index('<div id="galleries">'):]
    section = galleries[galleries.index("<p>Per label"):]
    first_label = re.search(r"<h3>([^:]+):", section).group(1)
    first_map = re.search(r'alt="heat map of ([^"]+)"', section).group(1)
    assert first_map == first_label
    kb = sum(len(thumbs[int(i)]) for i, _ in cams) / 1024
    print(f"{len(cams)} heat maps, {kb:.0f} KB of the page's {len(page) / 1024:.0f} KB")


@pytest.mark.parametrize("method", ["gradcam", "auto"])
def test_gradient_maps_in_a_batch_equal_one_image_at_a_time(resnet, method):
    """One backward pass serves the k-th label of every image: each image's map is the one it
    gets alone, also when the images want different labels."""
    images = torch.rand(3, 3, 64, 64)
    together = resnet.explain(images, labels=["a", "c"], method=method)
    for i in range(3):
        alone = resnet.explain(images[i:i + 1], labels=["a", "c"], method=method)
        np.testing.assert_allclose(together.maps[i], alone.maps[0], atol=1e-5)
    resnet.set_thresholds(torch.tensor([0.0, 1.1, 1.1]))  # image by image: "a" only ...
    try:
        mixed = resnet.explain(images, method=method)
    finally:
        resnet.set_thresholds(torch.full((3,), 0.5))
    assert mixed.labels == [["a"]] * 3
    np.testing.assert_allclose(mixed.maps[1][0], together.maps[1][0], atol=1e-5)


@pytest.mark.parametrize("name", ["gradcam", "hirescam"])
def test_gradient_maps_equal_the_grad_cam_packages(resnet, name):
    """mlabel's Grad-CAM and HiResCAM (the backward pass stops at the feature map) against the
    grad-cam package's on the same layer."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM, HiResCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mlabel.explain import _Forward
    images = torch.rand(2, 3, 64, 64)
    got = resnet.explain(images, labels=["b"], method=name)
    forward = _Forward(resnet)
    with {"gradcam": GradCAM, "hirescam": HiResCAM}[name](model=forward, target_layers=[forward.features]) as cam:
        want = cam(input_tensor=images, targets=[ClassifierOutputTarget(1)] * 2)
    assert got.extra == {"layer": "forward_features", "input_size": [64, 64]}
    np.testing.assert_allclose(np.stack([m[0] for m in got.maps]), want, atol=1e-5)


def test_auto_is_hirescam_at_the_stride_16_stage_on_an_upsampled_input(resnet):
    """test_resnet's last map of a 64 px image is 2 x 2; auto reads layer3 (stride 16) of the image
    upsampled to 96 px (6 x 6 cells): brute force, layer by layer, gives the same map."""
    images = torch.rand(2, 3, 64, 64)
    got = resnet.explain(images, labels=["c"])
    assert got.method == "hirescam" and got.extra == {"layer": "layer3", "input_size": [96, 96]}
    np.testing.assert_allclose(np.stack([p[0] for p in got.probabilities]), resnet.predict_proba(images)[:, 2].numpy(),
                               rtol=1e-6)  # the probabilities are the model's own, at 64 px
    net = resnet.backbone
    big = torch.nn.functional.interpolate(images, size=(96, 96), mode="bilinear", align_corners=False)
    with torch.no_grad():
        stem = net.maxpool(net.act1(net.bn1(net.conv1(big))))
        early = net.layer3(net.layer2(net.layer1(stem))).requires_grad_()
    logit = resnet.head(net.global_pool(net.layer4(early)))[:, 2]
    grad, = torch.autograd.grad(logit.sum(), early)
    raw = (grad * early).sum(1).clamp_min(0).detach()  # (2, 6, 6): HiResCAM
    assert raw.shape == (2, 6, 6)
    up = torch.nn.functional.interpolate(raw[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    low, high = up.flatten(1).min(1).values[:, None, None], up.flatten(1).max(1).values[:, None, None]
    np.testing.assert_allclose(np.stack([m[0] for m in got.maps]), ((up - low) / (high - low)).numpy(), atol=1e-5)


@pytest.mark.parametrize("backbone, layer, size", [("test_efficientnet", "blocks.3", 96),
                                                   ("test_convnext", "stages.2", 96)])
def test_auto_finds_the_stride_16_stage_of_other_cnns(backbone, layer, size):
    torch.manual_seed(0)
    model = create_model(backbone, LABELS, False, image_size=64).eval()
    got = model.explain(torch.rand(1, 3, 64, 64), labels=["a"])
    assert got.method == "hirescam" and got.extra == {"layer": layer, "input_size": [size, size]}
    assert got.maps[0].shape == (1, 64, 64) and got.maps[0].max() == pytest.approx(1.0)
    large = model.explain(torch.rand(1, 3, 128, 128), labels=["a"])  # 8 x 8 cells already: no upsampling
    assert large.extra == {"layer": layer, "input_size": [128, 128]}
