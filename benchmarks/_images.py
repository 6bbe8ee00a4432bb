"""Generated JPEGs for the benchmarks (random noise: decoding cost does not depend on content)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_jpegs(folder, count: int, height: int, width: int, rng: np.random.Generator,
                quality: int = 90) -> list[str]:
    """``count`` files ``img00000.jpg``, ... in ``folder``, drawn from ``rng`` in order."""
    paths = []
    for i in range(count):
        path = Path(folder) / f"img{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=quality)
        paths.append(str(path))
    return paths
