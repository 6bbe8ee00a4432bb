"""Batched tensor augmentation (data.augment_on=device): parameters, each op against an
independent reference, and the loader against the per-image one."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from mlabel.data import ImageDataset, build_transform, make_loader
from mlabel.data.dataset import LoaderSettings
from mlabel.data.batched import (PRESETS, BatchImages, DeviceBatches, TensorAugment, adjust_hue,
                                 decode_to_squares, random_crop_boxes, uniforms)
from mlabel.data.cache import DecodedCache
from mlabel.data.tables import LabelTable
from mlabel.errors import DataError
from mlabel.preprocess import preprocess_image, read_rgb, resize_square
from mlabel.train import main as train_main

PRE = {"image_size": 56, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # squares of 64


def _squares(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images (B, 3, S, S) uint8 in channels_last layout, like the cache's."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    big = np.stack([cv2.resize(s, (side, side), interpolation=cv2.INTER_CUBIC) for s in small])
    return torch.from_numpy(big).permute(0, 3, 1, 2)


def test_uniforms_depend_on_the_seed_alone():
    seeds = np.array([11, 5, 2**40 + 3, 0], dtype=np.uint64)
    u = uniforms(seeds, 80)
    np.testing.assert_array_equal(u[1], uniforms(np.array([5], np.uint64), 80)[0])
    assert u.min() >= 0 and u.max() < 1 and len(np.unique(u)) == u.size
    many = uniforms(np.arange(20_000, dtype=np.uint64), 80)
    assert abs(many.mean() - 0.5) < 0.002 and abs(many.var() - 1 / 12) < 0.001
    assert abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03  # streams of one seed independent


def test_random_crop_boxes_follow_scale_ratio_and_torchvision():
    u = uniforms(np.arange(5000, dtype=np.uint64), 40)
    boxes = random_crop_boxes(u, 64, 64, (0.35, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area = h * w / 64**2
    assert area.min() > 0.3 and area.max() <= 1.0
    assert (w / h).min() > 3 / 4 - 0.05 and (w / h).max() < 4 / 3 + 0.05
    # the same distribution as torchvision's RandomResizedCrop (independent implementation)
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.zeros(3, 64, 64), [0.35, 1.0], [3 / 4, 4 / 3])
                          for _ in range(5000)])
    assert abs(area.mean() - (reference[:, 2] * reference[:, 3] / 64**2).mean()) < 0.01
    assert abs(np.log(w / h).std() - np.log(reference[:, 3] / reference[:, 2]).std()) < 0.01
    # no try fits: the centre crop
    assert (random_crop_boxes(u[:3], 64, 64, (1.5, 2.0)) == [0, 0, 64, 64]).all()


@pytest.mark.parametrize("preset", ["light", "flips"])
def test_cpu_crop_matches_the_roi_align_path(preset):
    augment = TensorAugment(PRE, preset)
    squares = _squares(24)
    params = augment.draw(range(100, 124))
    cpu = augment.geometric(squares, params)  # uint8 on the CPU: OpenCV per sample
    batched = augment.geometric(squares.float(), params)  # float: roi_align + batched flips (the GPU path)
    assert cpu.dtype == torch.uint8 and cpu.shape == (24, 3, 56, 56)
    assert cpu.is_contiguous(memory_format=torch.channels_last)
    diff = (cpu.float() - batched)[:, :, 1:-1, 1:-1].abs()
    assert diff.max() <= 2 and diff.mean() < 0.3
    assert bool(params["hflip"].any()) and (preset == "light" or bool((params["turns"] > 0).any()))


def test_none_preset_gives_the_evaluation_pixels():
    augment = TensorAugment(PRE, "none")
    squares = _squares(5)
    out = augment(squares, range(5))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(5):
        expected = preprocess_image(squares[i].permute(1, 2, 0).numpy(), PRE)
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_jitter_matches_torchvision():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(0, 255, (6, 3, 12, 12)).astype(np.float32))
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.04], [0.7, 1.25, 0.75, -0.05], [1.0, 1.0, 1.0, 0.0],
                            [1.3, 1.3, 0.7, 0.02], [0.75, 0.7, 1.0, -0.01], [1.1, 1.0, 0.0, 0.03]])
    ours = TensorAugment._jitter(x.clone(), factors) / 255
    for i, (b, c, s, h) in enumerate(factors.tolist()):
        ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i] / 255, b), c), s), h)
        torch.testing.assert_close(ours[i], ref, atol=2e-5, rtol=0)
    shift = torch.tensor([0.5, -0.25])
    torch.testing.assert_close(adjust_hue(x[:2] / 255, shift)[1], TF.adjust_hue(x[1] / 255, -0.25), atol=2e-5, rtol=0)


def test_strong_extras_against_opencv():
    augment = TensorAugment(PRE, "strong")
    x = _squares(3, 56).float().contiguous(memory_format=torch.channels_last)
    params = augment.draw([1, 2, 3])
    params.update(affine=torch.tensor([True, False, False]), theta=torch.eye(2, 3).expand(3, 2, 3).clone(),
                  blur_size=torch.tensor([0, 5, 3]), blur_sigma=torch.tensor([1.0, 1.7, 0.8]),
                  noise=torch.zeros(3), holes=torch.zeros(3, 4, 4, dtype=torch.int64))
    params["holes"][2, 0] = torch.tensor([10, 20, 5, 7])
    out = augment._strong(x.clone(), params)
    torch.testing.assert_close(out[0], x[0], atol=1e-3, rtol=0)  # identity affine
    for i, size, sigma in ((1, 5, 1.7), (2, 3, 0.8)):
        image = x[i].permute(1, 2, 0).numpy()
        ref = cv2.GaussianBlur(image, (size, size), sigma, borderType=cv2.BORDER_REFLECT_101)
        if i == 2:
            ref[10:15, 20:27] = 0
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=1e-3)
    params.update(affine=torch.zeros(3, dtype=torch.bool), blur_size=torch.zeros(3, dtype=torch.int64),
                  noise=torch.tensor([0.0, 60.0, 0.0]))
    noisy, again = augment._strong(x.clone(), params), augment._strong(x.clone(), params)
    torch.testing.assert_close(noisy, again)  # noise from the sample's seed
    assert 40 < float((noisy[1] - x[1]).std()) < 70 and torch.equal(noisy[0], x[0])


@pytest.mark.parametrize("preset", PRESETS)
def test_each_sample_depends_on_its_own_seed(preset):
    augment = TensorAugment(PRE, preset)
    squares, seeds = _squares(6), [7, 8, 9, 10, 11, 12]
    out = augment(squares, seeds)
    order = [3, 0, 5, 1, 4, 2]
    shuffled = augment(squares[order], [seeds[k] for k in order])
    torch.testing.assert_close(shuffled, out[order], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()
    if preset != "none":
        assert not torch.equal(out, augment(squares, [s + 100 for s in seeds]))


def test_presets_only():
    with pytest.raises(DataError, match="augment_on=workers"):
        TensorAugment(PRE, [{"name": "HorizontalFlip"}])


@pytest.fixture
def photo_table(tmp_path) -> LabelTable:
    rng = np.random.default_rng(3)
    paths = []
    for i in range(21):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (80 + 4 * i, 60 + 3 * (i % 5)), interpolation=cv2.INTER_CUBIC)
        path = tmp_path / (f"{i}.png" if i % 7 == 3 else f"{i}.jpg")
        Image.fromarray(image).save(path, quality=95)
        paths.append(str(path))
    return LabelTable(paths, rng.integers(0, 2, (21, 2)).astype(np.float32), ["a", "b"], str(tmp_path))


@pytest.mark.parametrize("cached", [True, False])
def test_batches_equal_the_per_image_loader_without_augmentation(photo_table, tmp_path, cached):
    cache = DecodedCache(photo_table, PRE, tmp_path / "cache", quiet=True) if cached else None
    per_image = make_loader(ImageDataset(photo_table, build_transform(PRE, True, "none"), cache), 4, train=True,
                            settings=LoaderSettings(seed=5))
    batched = DeviceBatches(BatchImages(photo_table, PRE, TensorAugment(PRE, "none"), cache, crop=True), 4,
                            device=torch.device("cpu"), train=True,
                            settings=LoaderSettings(seed=5, num_workers=2))
    assert len(batched) == len(per_image) == 5
    for epoch in range(2):
        per_image.generator.manual_seed(epoch)
        batched.generator.manual_seed(epoch)
        for (a, ta), (b, tb) in zip(per_image, batched, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(ta, tb, atol=0, rtol=0)


def test_jpeg_bytes_decoded_on_the_device(photo_table, tmp_path):
    """The GPU path (nvJPEG when CUDA) run with the CPU as the device: JPEGs arrive as bytes,
    PNGs decoded in the thread, and the squares agree with Pillow + OpenCV."""
    rotated = np.asarray(Image.open(photo_table.paths[0]).convert("RGB")).transpose(1, 0, 2)[:, ::-1]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: viewers rotate it 90 degrees clockwise back
    Image.fromarray(np.ascontiguousarray(rotated[::-1].transpose(1, 0, 2))).save(tmp_path / "exif.jpg", exif=exif,
                                                                                 quality=95)
    paths = photo_table.paths[:3] + [str(tmp_path / "exif.jpg")]
    reference = [resize_square(read_rgb(p), PRE) for p in paths]
    encoded = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]
    squares = decode_to_squares(encoded, PRE, torch.device("cpu")).permute(0, 2, 3, 1).numpy()
    for got, want in zip(squares, reference):
        assert got.shape == want.shape == (64, 64, 3)
        assert np.abs(got.astype(float) - want).mean() < 3
    images = BatchImages(photo_table, PRE, TensorAugment(PRE, "none"), encoded=True)
    batch = images.load([(i, i) for i in range(8)])
    assert sorted(batch["decoded"]) == [3] and len(batch["encoded"]) == 7
    loader = DeviceBatches(images, 8, device=torch.device("cpu"), train=False, settings=LoaderSettings(num_workers=1))
    plain = make_loader(ImageDataset(photo_table, build_transform(PRE, False)), 8, train=False)
    for (a, _), (b, _) in zip(loader, plain, strict=True):
        assert (a - b).abs().mean() < 0.05  # normalised units: about 3 grey levels


@pytest.mark.parametrize("preset,cached", [("flips", True), ("strong", False)])
def test_training_with_augmentation_on_the_device(tmp_path, scene_csv, preset, cached):
    out = tmp_path / "run"
    argv = ["quickstart", f"out_dir={out}", "model.backbone=test_resnet", "model.pretrained=false",
            "data.generate=null", "data.image_size=32", "data.batch_size=8", "data.num_workers=2",
            f"data.root={scene_csv}", "data.val=val.csv", "data.test=null", "thresholds.cross_fit=0",
            "train.epochs=1", f"data.augment={preset}", "data.augment_on=device", f"data.cache={cached}",
            f"data.cache_dir={tmp_path / 'cache'}", "--quiet"]
    assert train_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val"]["mAP"] <= 1


def test_a_list_of_albumentations_on_the_device_is_refused(tmp_path, scene_csv, capsys):
    argv = ["quickstart", f"out_dir={tmp_path / 'run'}", "model.backbone=test_resnet", "model.pretrained=false",
            "data.generate=null", "data.image_size=32", f"data.root={scene_csv}", "data.val=val.csv",
            "data.test=null", "data.augment_on=device", "data.augment=[{name: HorizontalFlip}]", "--quiet"]
    assert train_main(argv) != 0
    assert "augment_on=workers" in capsys.readouterr().err


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_batches_match_the_cpu_ones(photo_table, tmp_path, preset):
    """The same seeds on the GPU: roi_align crops and batched flips against OpenCV on the CPU,
    jitter and normalisation on the GPU against the CPU."""
    augment = TensorAugment(PRE, preset)
    squares, seeds = _squares(16), list(range(16))
    params = augment.draw(seeds)
    cpu = augment.photometric(augment.geometric(squares, params), params)
    gpu = augment.photometric(augment.geometric(squares.cuda(), params), params)
    assert gpu.device.type == "cuda" and gpu.is_contiguous(memory_format=torch.channels_last)
    diff = (gpu.cpu() - cpu)[:, :, 1:-1, 1:-1].abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1  # normalised units: about 2 grey levels
    # JPEG bytes decoded by nvJPEG give the squares Pillow + OpenCV give, within JPEG/resize rounding
    encoded = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in photo_table.paths
               if p.endswith(".jpg")]
    on_gpu = decode_to_squares(encoded, PRE, torch.device("cuda")).cpu()
    on_cpu = decode_to_squares(encoded, PRE, torch.device("cpu"))
    assert (on_gpu.float() - on_cpu.float()).abs().mean() < 2
    cache = DecodedCache(photo_table, PRE, tmp_path / "cache", quiet=True)
    for images in (BatchImages(photo_table, PRE, augment, cache, pin=True),
                   BatchImages(photo_table, PRE, augment, encoded=True, pin=True)):
        loader = DeviceBatches(images, 8, device=torch.device("cuda"), train=True, settings=LoaderSettings(num_workers=2))
        shapes = [(x.shape, x.device.type, t.device.type) for x, t in loader]
        assert shapes == [((8, 3, 56, 56), "cuda", "cuda")] * 2


def test_resume_on_the_batched_path_repeats_the_run(tmp_path, scene_csv, monkeypatch):
    """Interrupted after epoch 1 and resumed: the same batches (seeded per epoch, per sample)
    and so the same result as the uninterrupted run, with augmentation on."""
    from mlabel import loop as train_module  # the epoch loop calls train_one_epoch

    def argv(out, *extra):
        return ["quickstart", f"out_dir={out}", "model.backbone=test_resnet", "model.pretrained=false",
                "data.generate=null", "data.image_size=32", "data.batch_size=8", "data.num_workers=2",
                f"data.root={scene_csv}", "data.val=val.csv", "data.test=null", "thresholds.cross_fit=0",
                "train.epochs=3", "data.augment=flips", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}",
                "--quiet", *extra]

    assert train_main(argv(tmp_path / "straight")) == 0
    real = train_module.train_one_epoch

    def stop_at_epoch_2(*args, **kwargs):
        if args[5] == 2:  # (model, loader, loss_fn, stepper, device, epoch)
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", stop_at_epoch_2)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_main(argv(tmp_path / "resumed", "--debug"))  # --debug: the error itself, not exit 2
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert train_main(argv(tmp_path / "resumed", "resume=true")) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    for key in ("mAP", "macro_f1", "micro_f1", "macro_auroc"):
        assert a["val"][key] == b["val"][key], key
    history = [(tmp_path / d / "history.csv").read_text().splitlines() for d in ("straight", "resumed")]
    assert len(history[0]) == 4  # header and 3 epochs: epoch, train_loss, val_loss, val_mAP equal
    assert [row.split(",")[:4] for row in history[0]] == [row.split(",")[:4] for row in history[1]]


def test_random_streams_are_named_disjoint_and_stable():
    """Each random choice owns its columns of the counter-based uniforms: no two overlap, a
    name cannot be allocated twice, and a sample's numbers depend on its seed alone."""
    from mlabel.data.batched import STREAMS, Streams
    taken = sorted((s.start, s.stop) for s in STREAMS.slices.values())
    assert taken[0][0] == 0 and all(a[1] == b[0] for a, b in zip(taken, taken[1:]))
    assert taken[-1][1] == STREAMS.width
    with pytest.raises(ValueError, match="allocated twice"):
        Streams([("a", 1), ("a", 2)])
    seeds = np.array([3, 99, 12345], np.uint64)
    drawn, u = STREAMS.draw(seeds), uniforms(seeds, STREAMS.width)
    for name, s in STREAMS.slices.items():
        np.testing.assert_array_equal(drawn[name], u[:, s] if s.stop - s.start > 1 else u[:, s.start])
    np.testing.assert_array_equal(STREAMS.draw(seeds[1:2])["crop"][0], drawn["crop"][1])
