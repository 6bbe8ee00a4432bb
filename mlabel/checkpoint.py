"""Training checkpoints written atomically and read without executing code."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng"]


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to a temporary file and rename it over ``path``: a crash mid-write
    leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """``weights_only`` loading: tensors and plain containers only, no code from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)
