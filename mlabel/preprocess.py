"""Image decoding and the evaluation preprocessing, with NumPy, Pillow and OpenCV only.

The same function prepares images for training-time evaluation, ``model.predict``,
``python -m mlabel.predict`` and the ONNX path (which runs without torch), so every route sees
identical pixels.
"""
from __future__ import annotations

import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "read_rgb", "to_rgb_array", "preprocess_image", "resize_square", "cache_side",
           "normalisation"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
                 "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to (H, W, 3) uint8: EXIF orientation applied; 16/32-bit integer and float
    images scaled by their range (:func:`_scale_to_bytes`; ``convert("RGB")`` would clip them to
    white); alpha dropped; palette, grayscale and CMYK converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        gray = _scale_to_bytes(np.asarray(image), image.mode)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def _scale_to_bytes(values: np.ndarray, mode: str) -> np.ndarray:
    """A one-channel 16/32-bit integer or float image -> uint8, black to white over its range:
    ``I;16`` over [0, 65535] (its type's range); otherwise over the smallest of [0, 1] (floats
    only: the float image convention), [0, 255] and [0, 65535] that holds every value, and
    beyond those (negative values, or above 65535) over the image's own [min, max]. NaN is black."""
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        bottom, top = 0.0, 65535.0
    elif low >= 0 and high <= 65535:
        levels = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
        bottom, top = 0.0, next(level for level in levels if high <= level)
    else:
        bottom, top = low, max(high, low + 1e-12)  # a constant image is black, not a division by zero
    scaled = (np.nan_to_num(values, nan=bottom) - bottom) / (top - bottom) * 255.0 + 0.5
    return np.clip(scaled, 0, 255).astype(np.uint8)


def read_rgb(path, draft: int | None = None) -> np.ndarray:
    """Decode an image file (a path, or a binary file object) to (H, W, 3) uint8 RGB (see
    :func:`_to_rgb`).

    Truncated or corrupt files and decompression bombs (more than ``Image.MAX_IMAGE_PIXELS``
    pixels) raise :class:`DataError`. ``draft`` lets JPEGs decode at a reduced size (checks).
    """
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"refused {path}: not a regular file (a folder, FIFO or device would block or fail)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_shape(path, *image.size)
                if draft:
                    image.draft("RGB", (draft, draft))
                image.load()
                return _to_rgb(image)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"refused image {path}: {err}. A real photo this large is better resized first.") from None
    except FileNotFoundError:
        raise DataError(f"image {path} not found. Check data.root and the file name.") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace or remove the file.") from None


MAX_ASPECT = 100  # panoramas reach ~10:1; beyond 100:1 an image is a strip, not a photo


def _check_shape(path, width: int, height: int) -> None:
    """Refuse, from the header alone, an image too thin to resize: a 20,000,000 x 1 PNG is 19 KB
    but scaling its short side up to the input size would allocate tens of gigabytes."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise DataError(f"refused image {path}: {width} x {height} px is beyond the {MAX_ASPECT}:1 aspect "
                        "ratio mlabel reads; crop or pad it first, or remove it")


def to_rgb_array(item) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path, a PIL image or an RGB array."""
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {item.shape} {item.dtype}")
        _check_shape("array", item.shape[1], item.shape[0])
        return item
    if isinstance(item, Image.Image):
        _check_shape("PIL image", *item.size)
        return np.asarray(ImageOps.exif_transpose(item).convert("RGB"))
    return read_rgb(str(item))


def cache_side(preprocessing: dict) -> int:
    """Side of the square a decoded image is reduced to before the final crop (and in the cache)."""
    size = int(preprocessing["image_size"])
    if preprocessing.get("resize", "crop") == "squish":
        return size
    return max(size, int(round(size / float(preprocessing.get("crop_pct", 1.0)))))


def resize_square(image: np.ndarray, preprocessing: dict) -> np.ndarray:
    """``squish``: resize to size x size. ``crop``: shorter side to ``size / crop_pct``, then the
    centre square. This is what :mod:`mlabel.data.cache` stores."""
    side = cache_side(preprocessing)
    interp = INTERPOLATION.get(preprocessing.get("interpolation", "bilinear"), cv2.INTER_LINEAR)
    h, w = image.shape[:2]
    if preprocessing.get("resize", "crop") == "squish":
        return image if (h, w) == (side, side) else cv2.resize(image, (side, side), interpolation=interp)
    if max(h, w) > 4 * min(h, w):  # a long strip: keep only its centre square's neighbourhood, so the
        short = min(h, w)          # resized image stays within 4 x 1 squares whatever the input shape
        top, left = max(0, (h - 4 * short) // 2), max(0, (w - 4 * short) // 2)
        image = image[top:top + 4 * short, left:left + 4 * short]
        h, w = image.shape[:2]
    scale = side / min(h, w)
    nh, nw = max(side, int(round(h * scale))), max(side, int(round(w * scale)))
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (nh - side) // 2, (nw - side) // 2
    return image[top:top + side, left:left + side]


def resize_for_eval(image: np.ndarray, preprocessing: dict) -> np.ndarray:
    """timm's evaluation transform: ``squish`` resizes to size x size; ``crop`` takes the centre
    size x size of the :func:`resize_square` square (shorter side at ``size / crop_pct``).
    Applied to a cached square it gives the same pixels as applied to the original image."""
    size = int(preprocessing["image_size"])
    square = resize_square(image, preprocessing)
    offset = (square.shape[0] - size) // 2
    return square[offset:offset + size, offset:offset + size]


def preprocess_image(item, preprocessing: dict) -> np.ndarray:
    """A path / PIL image / RGB array -> normalised float32 (3, size, size)."""
    image = resize_for_eval(to_rgb_array(item), preprocessing)
    mean, scale = normalisation(preprocessing)
    return np.ascontiguousarray(((image.astype(np.float32) - mean) * scale).transpose(2, 0, 1))


def normalisation(preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean * 255, 1 / (std * 255)): pixels normalise as ``(x - mean) * scale``, the
    same float32 operations wherever it is done (here, and batched in mlabel.data.batched)."""
    mean = np.asarray(preprocessing["mean"], dtype=np.float32) * np.float32(255)
    scale = np.float32(1) / (np.asarray(preprocessing["std"], dtype=np.float32) * np.float32(255))
    return mean, scale
