"""Step functions of training: optimiser, schedule, one epoch, and collecting predictions."""
from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["build_optimizer", "build_scheduler", "train_one_epoch", "collect_predictions",
           "autocast_for", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full fp32 on the CPU (CPU bf16 is slow and less accurate)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Everything the model predicts: logits, then any regression outputs (see ``outputs``)."""
    return model.outputs(images) if hasattr(model, "outputs") else model(images)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights; the backbone at ``lr * scale``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        is_backbone = name.startswith("backbone.")
        decay = param.ndim > 1
        groups.setdefault((is_backbone, decay), []).append(param)
    param_groups = [{"params": params, "lr": lr * (backbone_lr_scale if bb else 1.0),
                     "weight_decay": weight_decay if decay else 0.0}
                    for (bb, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup to the base learning rate, then cosine decay to 1 % of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(iterable, total: int, desc: str, quiet: bool):
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def train_one_epoch(model: nn.Module, loader, loss_fn: nn.Module, optimizer, scheduler,
                    device: torch.device, epoch: int, *, grad_clip: float | None = None,
                    channels_last: bool = False, freeze_backbone: bool = False,
                    freeze_norm_stats: bool = False, quiet: bool = False) -> dict:
    """One pass over ``loader``; returns mean loss, images/s and the last learning rate.

    With ``freeze_backbone`` the backbone stays in eval mode (its norm statistics fixed). With
    ``freeze_norm_stats`` only its batch-norm layers do: their running statistics stay those
    of pretraining while every weight trains. Switching a pretrained backbone from running to
    small-batch statistics when it is unfrozen shifts its features under the fitted head.
    """
    model.train()
    if freeze_backbone:
        model.backbone.eval()
    elif freeze_norm_stats:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    bar = _progress(loader, len(loader), f"epoch {epoch}", quiet)
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model_outputs(model, images)
        loss = loss_fn(logits.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, step {step}; lower train.lr, set "
                "train.grad_clip, or check the inputs of that batch")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(images)
        seen += len(images)
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}",
                        img_s=f"{rate:.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "images_per_s": seen / max(elapsed, 1e-9),
            "lr": scheduler.get_last_lr()[-1], "train_time_s": elapsed}


@torch.no_grad()
def collect_predictions(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                        *, channels_last: bool = False, quiet: bool = False, desc: str = "eval"):
    """Logits and targets over a loader, and the mean loss when ``loss_fn`` is given.

    Returns:
        logits (N, L) float32 on the CPU, targets (N, L), mean loss (or None).
    """
    model.eval()
    all_logits, all_targets, total_loss, seen = [], [], 0.0, 0
    for images, targets in _progress(loader, len(loader), desc, quiet):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device):
            logits = model_outputs(model, images).float()
        if loss_fn is not None:
            total_loss += loss_fn(logits, targets.to(device)).item() * len(images)
            seen += len(images)
        all_logits.append(logits.cpu())
        all_targets.append(targets)
    loss = total_loss / seen if loss_fn is not None and seen else None
    return torch.cat(all_logits), torch.cat(all_targets), loss
