"""JPEG bytes to uint8 squares on the training device (nvJPEG on CUDA), for the batched path."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import cache_side, read_rgb

__all__ = ["decode_to_squares"]


def decode_to_squares(encoded: list, preprocessing: dict, device: torch.device) -> torch.Tensor:
    """JPEG bytes (1-D uint8 tensors) -> (B, 3, S, S) uint8 squares on ``device``: decoded there
    (nvJPEG on CUDA) with EXIF orientation, then the shorter side resized to S (bilinear,
    antialiased) and the centre square kept. A file the device decoder refuses is decoded
    with Pillow instead."""
    from torchvision.io import ImageReadMode, decode_jpeg
    side = cache_side(preprocessing)
    squish = preprocessing.get("resize", "crop") == "squish"
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        images = [_decode_one(data, device) for data in encoded]
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        if squish:
            nh, nw = side, side
        else:
            scale = side / min(h, w)
            nh, nw = max(side, int(round(h * scale))), max(side, int(round(w * scale)))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                  antialias=True)[0].round_().clamp_(0, 255)
        top, left = (nh - side) // 2, (nw - side) // 2
        out[i] = image[:, top:top + side, left:left + side]
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # Pillow, with read_rgb's checks and conversions
        import io
        image = np.array(read_rgb(io.BytesIO(data.numpy().tobytes())))  # a writable copy
        return torch.from_numpy(image).permute(2, 0, 1).to(device)
