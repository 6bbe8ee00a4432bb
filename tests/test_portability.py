"""Every OS (issue 30, item 5): the train / predict / load paths run with the POSIX-only calls
made unavailable, as on macOS or Windows (monkeypatched away), and give the same results."""
import os

import numpy as np
import pytest

from mlabel.data.cache import DecodedCache
from mlabel.data.tables import read_csv_table
from mlabel.preprocess import preprocess_image

PRE = {"image_size": 32, "resize": "crop", "crop_pct": 0.875, "interpolation": "bilinear",
       "mean": [0.5] * 3, "std": [0.25] * 3}


def test_decoded_cache_without_posix_fallocate(scene_csv, tmp_path, monkeypatch):
    """macOS and Windows have no os.posix_fallocate: the cache is sized after the free-space
    check instead, and holds the same pixels as one built with it."""
    table = read_csv_table(scene_csv / "val.csv", scene_csv)
    with_it = DecodedCache(table, PRE, tmp_path / "linux", quiet=True)
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    without = DecodedCache(table, PRE, tmp_path / "other", quiet=True)
    assert without.built
    np.testing.assert_array_equal(np.asarray(without.images), np.asarray(with_it.images))
    for i in (0, len(table) - 1):
        np.testing.assert_array_equal(preprocess_image(np.asarray(without.images[i]), PRE),
                                      preprocess_image(table.paths[i], PRE))
