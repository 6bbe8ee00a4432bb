"""Training checkpoints written atomically and read without executing code."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path, remove_stale_temps

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng", "config_differences"]


def capture_rng() -> dict:
    """Every random state a training step draws from: torch (CPU and, when initialised, every
    CUDA device: dropout and augmentation on the GPU), Python and NumPy."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(f"the checkpoint holds the random states of {len(state['cuda'])} CUDA devices, "
                             f"this machine has {torch.cuda.device_count()}: resume on the same devices")
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys that may change between an interrupted run and its resume: where it runs and what happens
# after training; every other key shapes the training and must match.
RESUMABLE_CHANGES = ("resume", "overwrite", "out_dir", "data.num_workers", "train.device", "log.", "thresholds.",
                     "calibration.")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every training-relevant key that differs."""
    found = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUMABLE_CHANGES):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += config_differences(old, new, name + ".")
        elif old != new:
            found.append(f"{name}: {old!r} -> {new!r}")
    return found


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to a temporary file and rename it over ``path``: a crash mid-write
    leaves the previous checkpoint intact."""
    remove_stale_temps(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """``weights_only`` loading: tensors and plain containers only, no code from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)
