"""The augmentation presets as numbers, one table for both training paths: albumentations in the
loader workers (:func:`mlabel.data.dataset.build_transform`) and batched tensor operations on
the device (:class:`mlabel.data.augment.TensorAugment`). Changing a preset here changes both."""
from __future__ import annotations

__all__ = ["PRESETS", "CROP_SCALE", "CROP_RATIO", "JITTER", "JITTER_P", "AFFINE", "BLUR_OR_NOISE_P",
           "BLUR_SIZES", "BLUR_SIGMA", "NOISE_STD", "DROPOUT"]

# area share of the random resized crop (a squish model resizes the whole image instead)
CROP_SCALE = {"light": (0.6, 1.0), "flips": (0.6, 1.0), "medium": (0.35, 1.0), "strong": (0.35, 1.0)}
PRESETS = ("none", *CROP_SCALE)
CROP_RATIO = (3 / 4, 4 / 3)                  # aspect ratio range of the crop (log-uniform)
JITTER = (0.3, 0.3, 0.3, 0.05)               # medium, strong: brightness, contrast, saturation, hue
JITTER_P = 0.8
AFFINE = {"scale": (0.9, 1.1), "translate": (-0.05, 0.05), "rotate": (-10, 10), "p": 0.5}   # strong
BLUR_OR_NOISE_P = 0.3                        # strong: OneOf(GaussianBlur, GaussNoise)
BLUR_SIZES = (3, 5)
BLUR_SIGMA = (0.5, 3.0)
NOISE_STD = (0.2, 0.44)                      # albumentations' GaussNoise default, in [0, 1] units
DROPOUT = {"holes": (1, 4), "size": (0.05, 0.15), "p": 0.3}   # strong: CoarseDropout, 0-filled
