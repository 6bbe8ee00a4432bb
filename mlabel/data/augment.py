"""The batched augmentation itself (:class:`TensorAugment`): geometric on uint8, photometric on
float32, every parameter drawn from the sample's seed (:mod:`mlabel.data.streams`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..preprocess import cache_side, normalisation
from . import presets as P
from .presets import PRESETS
from .streams import STREAMS, random_crop_boxes

__all__ = ["TensorAugment", "adjust_hue", "GRAY"]

GRAY = (0.2989, 0.587, 0.114)            # luma weights of torchvision's rgb_to_grayscale


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) images in [0, 1] by ``shift`` (B,) turns, in HSV.

    Value (max) and saturation (via max - min) are unchanged by the rotation, so each channel is
    ``max - (max - min) * ramp(hue + shift)``, the HSV-to-RGB ramp without forming S and V."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sector = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    sector = (sector + 6 * shift.view(-1, 1, 1)) % 6  # hue in sixths of a turn
    k = torch.stack([(5 + sector) % 6, (3 + sector) % 6, (1 + sector) % 6], 1)
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return high[:, None] - delta[:, None] * ramp


def _gaussian_kernels(size: int, sigma: torch.Tensor) -> torch.Tensor:
    grid = torch.arange(size, dtype=torch.float32, device=sigma.device) - (size - 1) / 2
    kernel = torch.exp(-grid[None] ** 2 / (2 * sigma[:, None] ** 2))
    return kernel / kernel.sum(1, keepdim=True)


class TensorAugment:
    """A preset of :func:`~mlabel.data.dataset.build_transform` as batched tensor operations.

    ``draw(seeds)`` gives each sample's parameters (CPU tensors), ``geometric(squares, params)``
    crops (B, 3, S, S) uint8 squares to (B, 3, size, size), and ``photometric(images, params)``
    returns normalised float32 in channels_last layout.
    """

    def __init__(self, preprocessing: dict, augment: str = "light"):
        if not isinstance(augment, str) or augment not in PRESETS:
            raise DataError(f"data.augment_on=device runs the presets {list(PRESETS)}, not {augment!r}; "
                            "a list of albumentations transforms runs in the loader workers "
                            "(set data.augment_on=workers)")
        self.augment = augment
        self.size = int(preprocessing["image_size"])
        self.side = cache_side(preprocessing)
        self.squish = preprocessing.get("resize", "crop") == "squish"
        mean, scale = normalisation(preprocessing)  # the float32 constants of preprocess_image
        self.mean, self.scale = torch.from_numpy(mean), torch.from_numpy(scale)

    # -- parameters -----------------------------------------------------------------------
    def draw(self, seeds) -> dict:
        """Each sample's parameters from its seed alone (counter-based uniforms, vectorised over
        the batch): the same sample and seed give the same augmentation in any batch."""
        seeds = np.asarray(list(seeds), dtype=np.uint64)
        n, side, size = len(seeds), self.side, self.size
        u = STREAMS.draw(seeds)
        offset = (side - size) // 2
        box = np.tile(np.array([offset, offset, size, size], np.int64), (n, 1))
        hflip, vflip = np.zeros(n, bool), np.zeros(n, bool)
        turns = np.zeros(n, np.int64)
        jitter = np.tile(np.array([1.0, 1.0, 1.0, 0.0], np.float32), (n, 1))
        if self.augment != "none":
            box = np.tile(np.array([0, 0, side, side], np.int64), (n, 1)) if self.squish else \
                random_crop_boxes(u["crop"], side, side, P.CROP_SCALE[self.augment])
            hflip = u["hflip"] < 0.5
        if self.augment == "flips":
            vflip, turns = u["vflip"] < 0.5, np.minimum((u["turns"] * 4).astype(np.int64), 3)
        if self.augment in ("medium", "strong"):
            on = u["jitter_on"] < P.JITTER_P
            b, c, s, h = P.JITTER
            low, high = np.array([1 - b, 1 - c, 1 - s, -h], np.float32), np.array([1 + b, 1 + c, 1 + s, h], np.float32)
            jitter[on] = (low + (high - low) * u["jitter"])[on]
        params = {"box": box, "hflip": hflip, "vflip": vflip, "turns": turns, "jitter": jitter}
        if self.augment == "strong":
            params.update(self._draw_strong(u, seeds))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}

    def _draw_strong(self, u: dict, seeds: np.ndarray) -> dict:
        n, size = len(seeds), self.size
        affine = u["affine_on"] < P.AFFINE["p"]
        (s0, s1), (r0, r1), (t0, t1) = P.AFFINE["scale"], P.AFFINE["rotate"], P.AFFINE["translate"]
        scale, angle = s0 + (s1 - s0) * u["affine_scale"], np.radians(r0 + (r1 - r0) * u["affine_angle"])
        shift = (t0 + (t1 - t0) * u["affine_shift"]) * 2  # fractions of the side, in [-1, 1] units
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # inverse of scale * rotation
        inverse = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)  # (n, 2, 2)
        theta = np.concatenate([inverse, -inverse @ shift[:, :, None]], 2).astype(np.float32)
        theta[~affine] = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
        one_of, blur = u["blur_or_noise"] < P.BLUR_OR_NOISE_P, u["blur"] < 0.5  # OneOf(GaussianBlur | GaussNoise)
        small, large = P.BLUR_SIZES
        blur_size = np.where(one_of & blur, np.where(u["blur_size"] < 0.5, small, large), 0).astype(np.int64)
        (g0, g1), (n0, n1) = P.BLUR_SIGMA, P.NOISE_STD
        blur_sigma = (g0 + (g1 - g0) * u["blur_sigma"]).astype(np.float32)
        noise = np.where(one_of & ~blur, (n0 + (n1 - n0) * u["noise"]) * 255.0, 0.0).astype(np.float32)
        (fewest, most), (d0, d1) = P.DROPOUT["holes"], P.DROPOUT["size"]
        holes = np.zeros((n, most, 4), np.int64)  # CoarseDropout, 0-filled
        spread = most - fewest + 1
        count = np.where(u["holes_on"] < P.DROPOUT["p"],
                         fewest + np.minimum((u["holes_count"] * spread).astype(np.int64), spread - 1), 0)
        for k in range(most):
            cols = u["holes"][:, 4 * k:4 * k + 4]
            h, w = (np.round((d0 + (d1 - d0) * cols[:, j]) * size).astype(np.int64) for j in (0, 1))
            top = (cols[:, 2] * (size - h + 1)).astype(np.int64)
            left = (cols[:, 3] * (size - w + 1)).astype(np.int64)
            holes[:, k] = np.where((k < count)[:, None], np.stack([top, left, h, w], 1), 0)
        return {"affine": affine, "theta": theta, "noise": noise, "blur_size": blur_size, "blur_sigma": blur_sigma,
                "holes": holes, "seed": seeds.astype(np.int64)}

    # -- uint8 stage ----------------------------------------------------------------------
    def geometric(self, squares: torch.Tensor, params: dict, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) uint8 squares -> (B, 3, size, size), channels_last: crop and resize
        (bilinear, half-pixel centres), flips and turns. On the CPU each sample is one OpenCV
        resize into the output (as albumentations does it), flips in place; elsewhere one
        ``roi_align`` call crops and resizes the whole batch (float32) and the flips and
        turns are batched."""
        if squares.device.type == "cpu" and squares.dtype == torch.uint8:
            return self._geometric_cpu(squares, params, out)
        size, box = self.size, params["box"]
        if bool((box[:, 2:] == size).all()) and bool((box[:, :2] == box[0, :2]).all()):
            top, left = int(box[0, 0]), int(box[0, 1])
            out = squares[:, :, top:top + size, left:left + size].float()
        else:
            from torchvision.ops import roi_align
            b = box.to(squares.device, torch.float32)
            rois = torch.stack([torch.arange(len(b), device=b.device, dtype=torch.float32),
                                b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
            out = roi_align(squares.float(), rois, (size, size), 1.0, 1, aligned=True)
        out = out.contiguous(memory_format=torch.channels_last)
        for mask, dim in ((params["hflip"], -1), (params["vflip"], -2)):
            index = mask.nonzero()[:, 0].to(out.device)
            if len(index):
                out[index] = out[index].flip(dim)
        for k in (1, 2, 3):
            index = (params["turns"] == k).nonzero()[:, 0].to(out.device)
            if len(index):
                out[index] = torch.rot90(out[index], k, (2, 3))
        return out

    def _geometric_cpu(self, squares: torch.Tensor, params: dict, result: torch.Tensor | None) -> torch.Tensor:
        """``result``: an optional (B, size, size, 3) uint8 tensor to write into."""
        return self.crop_rows(squares.permute(0, 2, 3, 1).contiguous().numpy(), range(len(squares)), params, result)

    def crop_rows(self, source: np.ndarray, rows, params: dict, result: torch.Tensor | None = None) -> torch.Tensor:
        """The CPU geometric stage reading sample i from ``source[rows[i]]``, an (N, S, S, 3)
        uint8 array such as the cache's memory map: each crop is resized straight from it into
        ``result`` (B, size, size, 3) uint8, flipped in place."""
        import cv2
        size = self.size
        if result is None:
            result = torch.empty((len(rows), size, size, 3), dtype=torch.uint8)
        out = result.numpy()
        flips = zip(params["hflip"].tolist(), params["vflip"].tolist(), params["turns"].tolist())
        for i, (row, (top, left, h, w), (hflip, vflip, turns)) in enumerate(zip(rows, params["box"].tolist(), flips)):
            crop = source[row, top:top + h, left:left + w]
            if (h, w) == (size, size):
                out[i] = crop
            else:
                cv2.resize(crop, (size, size), dst=out[i], interpolation=cv2.INTER_LINEAR)
            if hflip or vflip:
                cv2.flip(out[i], 1 if not vflip else (0 if not hflip else -1), dst=out[i])
            if turns:
                out[i] = np.rot90(out[i].copy(), turns)
        return result.permute(0, 3, 1, 2)

    # -- float stage ----------------------------------------------------------------------
    def photometric(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """(B, 3, size, size) uint8 (or float 0..255) -> normalised float32, channels_last."""
        x = images.contiguous(memory_format=torch.channels_last)
        if self.augment not in ("medium", "strong"):
            return self._normalise(x)  # uint8 straight to normalised float32
        x, device = x.float(), x.device
        jitter = params["jitter"].to(device)
        selected = (jitter != torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)).any(1).nonzero()[:, 0]
        if len(selected):
            x[selected] = self._jitter(x[selected], jitter[selected])
        if self.augment == "strong":
            x = self._strong(x, params)
        return self._normalise(x)

    @staticmethod
    def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation (blends as in torchvision) and hue, on 0..255."""
        b, c, s, h = (factors[:, k].view(-1, 1, 1, 1) for k in range(4))
        gray_weights = torch.tensor(GRAY, device=x.device).view(1, 3, 1, 1)
        x = (x * b).clamp_(0, 255)
        mean = (x * gray_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (c * x + (1 - c) * mean).clamp_(0, 255)
        gray = (x * gray_weights).sum(1, keepdim=True)
        x = (s * x + (1 - s) * gray).clamp_(0, 255)
        return adjust_hue(x / 255.0, factors[:, 3]) * 255.0

    def _strong(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        device = x.device
        index = params["affine"].nonzero()[:, 0].to(device)
        if len(index):
            grid = F.affine_grid(params["theta"].to(device)[index], [len(index), 3, *x.shape[2:]], align_corners=False)
            x[index] = F.grid_sample(x[index], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for size in (3, 5):
            index = (params["blur_size"] == size).nonzero()[:, 0].to(device)
            if len(index):
                kernel = _gaussian_kernels(size, params["blur_sigma"].to(device)[index])  # (n, size)
                part = x[index].reshape(1, -1, *x.shape[2:])  # every (sample, channel) is a group
                rows, pad = kernel.repeat_interleave(3, 0), size // 2  # separable: along x, then y
                part = F.conv2d(F.pad(part, (pad, pad, 0, 0), mode="reflect"), rows[:, None, None, :], groups=len(rows))
                part = F.conv2d(F.pad(part, (0, 0, pad, pad), mode="reflect"), rows[:, None, :, None], groups=len(rows))
                x[index] = part.reshape(len(index), 3, *x.shape[2:])
        index = (params["noise"] > 0).nonzero()[:, 0]
        if len(index):  # from each sample's seed, drawn on the CPU: the same noise on any device
            noise = torch.stack([torch.randn(3, *x.shape[2:], generator=torch.Generator().manual_seed(int(s)))
                                 for s in params["seed"][index].tolist()]).to(device)
            std = params["noise"][index].to(device).view(-1, 1, 1, 1)
            index = index.to(device)
            x[index] = (x[index] + noise * std).clamp_(0, 255)
        holes = params["holes"].to(device)
        if bool((holes[..., 2] > 0).any()):
            rows = torch.arange(x.shape[2], device=device).view(1, 1, -1, 1)
            cols = torch.arange(x.shape[3], device=device).view(1, 1, 1, -1)
            top, left, h, w = (holes[..., k].view(*holes.shape[:2], 1, 1) for k in range(4))
            inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            x = x.masked_fill(inside.any(1, keepdim=True), 0.0)
        return x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) * scale as float32, from uint8 or float; channels_last input is viewed as
        (B, H, W * 3) rows so the per-channel constants, tiled along a row, broadcast fast (a
        (1, 3, 1, 1) broadcast over a stride-1 channel dimension is several times slower)."""
        mean, scale = self.mean.to(x.device), self.scale.to(x.device)
        if x.is_contiguous(memory_format=torch.channels_last):
            n, _, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).view(n, h, w * 3)
            out = rows.float().sub_(mean.repeat(w)).mul_(scale.repeat(w))  # (torch.sub(uint8, float) is slower)
            return out.view(n, h, w, 3).permute(0, 3, 1, 2)
        return x.float().sub_(mean.view(1, 3, 1, 1)).mul_(scale.view(1, 3, 1, 1))

    def __call__(self, squares: torch.Tensor, seeds) -> torch.Tensor:
        params = self.draw(seeds)
        return self.photometric(self.geometric(squares, params), params)
