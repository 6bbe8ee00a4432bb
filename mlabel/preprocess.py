"""Image decoding and the evaluation preprocessing, with NumPy, Pillow and OpenCV only.

The same function prepares images for training-time evaluation, ``model.predict``,
``python -m mlabel.predict`` and the ONNX path (which runs without torch), so every route sees
identical pixels.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_rgb", "to_rgb_array", "preprocess_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


def read_rgb(path: str) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, honouring EXIF orientation."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the file.") from None


def to_rgb_array(item) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an RGB array."""
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {item.shape} {item.dtype}")
        return item
    if isinstance(item, Image.Image):
        return np.asarray(ImageOps.exif_transpose(item).convert("RGB"))
    return read_rgb(str(item))


def resize_for_eval(image: np.ndarray, preprocessing: dict) -> np.ndarray:
    """``squish``: resize to size x size. ``crop``: shorter side to ``size / crop_pct``, then
    the centre size x size (timm's evaluation transform)."""
    size = int(preprocessing["image_size"])
    interp = INTERPOLATION.get(preprocessing.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    if preprocessing.get("resize", "crop") == "squish":
        return cv2.resize(image, (size, size), interpolation=interp)
    short = int(round(size / float(preprocessing.get("crop_pct", 1.0))))
    h, w = image.shape[:2]
    scale = short / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


def preprocess_image(item, preprocessing: dict) -> np.ndarray:
    """A path / PIL image / RGB array -> normalised float32 (3, size, size)."""
    image = resize_for_eval(to_rgb_array(item), preprocessing)
    mean = np.asarray(preprocessing["mean"], dtype=np.float32) * 255.0
    std = np.asarray(preprocessing["std"], dtype=np.float32) * 255.0
    return np.ascontiguousarray(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1))
