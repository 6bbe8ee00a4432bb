"""Image decoding and the evaluation preprocessing, with NumPy, Pillow and OpenCV only.

The same function prepares images for training-time evaluation, ``model.predict``,
``python -m mlabel.predict`` and the ONNX path (which runs without torch), so every route sees
identical pixels.
"""
from __future__ import annotations

import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_rgb", "to_rgb_array", "preprocess_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to (H, W, 3) uint8: EXIF orientation applied; 16/32-bit integer and float
    images scaled by their range (``convert("RGB")`` would clip them to white); alpha dropped;
    palette, grayscale and CMYK converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def read_rgb(path: str, draft: int | None = None) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB (see :func:`_to_rgb`).

    Truncated or corrupt files and decompression bombs (more than ``Image.MAX_IMAGE_PIXELS``
    pixels) raise :class:`DataError`. ``draft`` lets JPEGs decode at a reduced size (checks).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft:
                    image.draft("RGB", (draft, draft))
                image.load()
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"refused image {path}: {err}. A real photo this large is better resized first.") from None
    except FileNotFoundError:
        raise DataError(f"image {path} not found. Check data.root and the file name.") from None
    except (OSError, ValueError, SyntaxError) as err:
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
