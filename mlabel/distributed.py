"""DDP under ``torchrun``: process group, sharding arithmetic and gathering of outputs.

``torchrun --nproc_per_node=N -m mlabel.train RECIPE`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
a plain ``python -m mlabel.train`` is a world of one and none of this does anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "resolve_device", "init_world", "gather_rows", "close_world", "mean_across", "OutputsModule"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                         "use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def init_world(device_name: str) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun (NCCL with CUDA, gloo on the CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(world.local_rank)
        return world, torch.device("cuda", world.local_rank)
    return world, torch.device("cpu")


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every rank (itself when not distributed)."""
    if not world.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_rows(rows: torch.Tensor, total: int, world: World) -> torch.Tensor:
    """Reassemble a split from every rank's shard. Rank r holds positions r, r + W, r + 2W, ...
    of the split padded to a multiple of W (see :class:`mlabel.data.dataset.SeededSampler`)."""
    if not world.distributed:
        return rows
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    shards = [torch.empty_like(rows, device=device) for _ in range(world.size)]
    dist.all_gather(shards, rows.to(device).contiguous())
    out = torch.empty((len(rows) * world.size, *rows.shape[1:]), dtype=rows.dtype)
    for r, shard in enumerate(shards):
        out[r::world.size] = shard.cpu()
    return out[:total]


def mean_across(value: float, world: World) -> float:
    """The mean of a per-rank figure over all ranks (every rank has as many samples)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / world.size


class OutputsModule(nn.Module):
    """What DDP wraps: forward returns the model's :class:`~mlabel.outputs.Outputs`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return self.model.outputs(images)
