"""Step functions of training: optimiser, schedule, one epoch, and collecting predictions."""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter() at once (a second DataLoader iterator)

from .errors import NonFiniteLossError
from .losses import task_loss
from .outputs import Outputs, Targets, as_targets, concat

__all__ = ["build_optimizer", "build_scheduler", "check_optimizer", "train_one_epoch", "collect_predictions", "autocast_for",
           "eval_precision", "grad_scaler_for", "mix_batch", "batch_mixer", "set_train_mode", "Stepper", "ModelEma",
           "NonFiniteLossError"]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def eval_precision(device: torch.device) -> str:
    """The precision of evaluation and prediction: bf16 autocast on CUDA, full fp32 on the CPU
    (CPU bf16 is slow and less accurate), whatever ``train.precision`` is."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_for(device: torch.device, precision: str = "auto"):
    """``bf16`` / ``fp16``: autocast to that type on any device; ``fp32``: none. ``auto`` (the
    default, for callers outside a run; mlabel itself always passes a resolved value):
    :func:`eval_precision`."""
    if precision == "auto":
        precision = eval_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler_for(device: torch.device, precision: str):
    """A loss scaler for fp16 (its small range underflows gradients); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class ModelEma:
    """timm's ``ModelEmaV3`` (a foreach lerp of parameters and buffers after each optimizer step)
    with the update count kept in the checkpoint. Its warm-up: the first update copies the
    weights, update k > 1 uses ``d = min(decay, 1 - k ** (-2/3))``, so early averages do not
    remember the random start; without warm-up ``d = decay`` from the second update on."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        from timm.utils import ModelEmaV3
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        for param in self._ema.module.parameters():
            param.requires_grad_(False)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self._ema.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self._ema.update(model, step=self.updates)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def mix_batch(images: torch.Tensor, targets: Targets, mixup_alpha: float, cutmix_alpha: float,
              prob: float = 1.0) -> tuple[torch.Tensor, Targets]:
    """Multi-hot mixup / cutmix: the batch is paired with its reverse and images and targets are
    mixed with the same lambda (for cutmix, the pasted area's share). A label target unknown (-1)
    in either image stays unknown; regression targets mix linearly (a missing one, NaN, stays
    missing). Draws from torch's global RNG (restored on resume)."""
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or torch.rand(()).item() >= prob or len(images) < 2:
        return images, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    other_images = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other_images[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + other_images * (1 - lam)
    labels, other = targets.labels, targets.labels.flip(0)
    mixed = torch.where((labels < 0) | (other < 0), torch.full_like(labels, -1.0), labels * lam + other * (1 - lam))
    regression = None if targets.regression is None else \
        targets.regression * lam + targets.regression.flip(0) * (1 - lam)
    return images, Targets(mixed, regression)


def model_outputs(model: nn.Module, images: torch.Tensor) -> Outputs:
    """Everything the model predicts, by name (a plain module's output is its logits)."""
    return model.outputs(images) if hasattr(model, "outputs") else Outputs(model(images))


def _param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float,
                  layer_decay: float | None) -> list[dict]:
    """Parameter groups with their own ``lr_scale``: no weight decay on biases and norm weights,
    the backbone at ``backbone_lr_scale`` and, with ``layer_decay``, each backbone layer group
    (timm's ``group_matcher``) shrunk by ``layer_decay`` per layer below the head."""
    backbone = getattr(model, "backbone", None)
    if layer_decay is not None and backbone is not None:
        from timm.optim import param_groups_layer_decay
        skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"],
                   "lr_scale": g["lr_scale"] * backbone_lr_scale}
                  for g in param_groups_layer_decay(backbone, weight_decay, skip, layer_decay=layer_decay)]
        rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p is not None]
        by_decay: dict[bool, list] = {}
        for param in rest:
            by_decay.setdefault(param.ndim > 1, []).append(param)
        return groups + [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": 1.0}
                         for decay, ps in by_decay.items()]
    grouped: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        grouped.setdefault((name.startswith("backbone."), param.ndim > 1), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": backbone_lr_scale if in_backbone else 1.0}
            for (in_backbone, decay), params in grouped.items()]


def check_optimizer(name: str, args: dict) -> None:
    """Refuse (ValueError) an optimizer timm's factory does not know, or arguments it does not take."""
    from timm.optim import list_optimizers
    from timm.optim._optim_factory import get_optimizer_class
    known = list_optimizers()
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        raise ValueError(f"timm.optim has no optimizer {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; e.g. {', '.join(n for n in ('adamw', 'sgd', 'momentum', 'lamb', 'lars', 'lion', 'adan') if n in known)}")
    cls = get_optimizer_class(name, bind_defaults=False)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(args) - set(accepted) - {"self"})
        if unknown:
            raise ValueError(f"{name} takes no argument {unknown}; its arguments: "
                             f"{sorted(k for k in accepted if k not in ('self', 'params'))}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0, *,
                    name: str = "adamw", args: dict | None = None,
                    layer_decay: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` from timm's factory (``timm.optim.create_optimizer_v2``: AdamW,
    SGD with Nesterov momentum, LAMB, LARS, Lion, Adan, ...) over :func:`_param_groups`; each
    group's ``lr`` is ``lr`` times its scale (the schedule multiplies it)."""
    from timm.optim import create_optimizer_v2
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]}
              for g in _param_groups(model, weight_decay, backbone_lr_scale, layer_decay)]
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **(args or {}))


class ScheduleFactor:
    """The learning-rate factor of step ``step`` (a callable object, so that ``LambdaLR`` saves its
    state, ``decay_from`` included, in checkpoints).

    ``cosine``: linear warmup to the base learning rate, then cosine decay to 1 % of it.
    ``onecycle``: cosine rise from 4 % to the base rate over the warmup (at least 10 % of the
    steps), then cosine decay to 1e-4 of it (the one-cycle policy, momentum left alone).
    ``constant``: linear warmup, then the base rate to the end (a plain loop's schedule).
    ``plateau``: as ``constant`` until :meth:`decay_now` (called by the epoch loop once val mAP
    has stalled), then cosine to 1 % over the steps left: a model still learning keeps its rate,
    one that has stopped improving anneals.
    """

    def __init__(self, total_steps: int, warmup_steps: int, kind: str = "cosine"):
        if kind == "onecycle":
            warmup_steps = max(warmup_steps, int(0.1 * total_steps), 1)
        self.total_steps, self.warmup_steps, self.kind = total_steps, warmup_steps, kind
        self.decay_from = warmup_steps if kind == "cosine" else None

    def decay_now(self, step: int) -> bool:
        """Start a ``plateau`` schedule's decay at ``step``; whether it started here."""
        if self.kind != "plateau" or self.decay_from is not None or step >= self.total_steps:
            return False
        self.decay_from = step
        return True

    def __call__(self, step: int) -> float:
        if self.kind == "onecycle":
            if step < self.warmup_steps:
                return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * step / self.warmup_steps))
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_from is None:
            return 1.0
        progress = (step - self.decay_from) / max(1, self.total_steps - self.decay_from)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    kind: str = "cosine"):
    """``LambdaLR`` with a :class:`ScheduleFactor` of ``kind``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleFactor(total_steps, warmup_steps, kind))


class _Progress:
    """Iterate a loader's batches behind a progress bar that counts images (on a terminal)."""

    def __init__(self, loader, desc: str, quiet: bool):
        self.loader = loader
        try:  # the sampler's length: this rank's share under DDP
            total = len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
        except (TypeError, AttributeError):
            total = None
        self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True,
                        disable=quiet or not sys.stderr.isatty())

    def __iter__(self):
        try:
            for batch in self.loader:
                yield batch
                self.bar.update(len(batch[0]))
        finally:
            self.bar.close()

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)


@dataclass
class Stepper:
    """Everything an optimisation step uses besides the model and the batch.

    ``accumulate`` batches make one optimizer step (each loss divided by their number); the
    scheduler and the EMA advance once per optimizer step. ``mix`` (images, targets -> mixed) is
    the batch transform of mixup / cutmix (:func:`batch_mixer`); ``forward`` (images -> outputs)
    replaces the model's own, e.g. by its DDP or compiled wrapper. Set per epoch by the epoch
    loop: ``start`` ({"step", "loss", "seen"}: a resume inside the epoch, with a loader that
    skips those steps) continues the epoch's count; ``on_step`` is called after every optimizer
    step but the epoch's last with that record (to checkpoint inside long epochs).
    """
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object = None
    ema: ModelEma | None = None
    precision: str = "auto"
    channels_last: bool = False
    accumulate: int = 1
    grad_clip: float | None = None
    mix: Callable | None = None
    forward: Callable | None = None
    start: dict | None = None
    on_step: Callable[[dict], None] | None = None


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0):
    """The mixup / cutmix batch transform of :func:`mix_batch`, or None when both are off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return functools.partial(mix_batch, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob)


def train_one_epoch(model: nn.Module, loader, loss_fn: nn.Module, stepper: Stepper, device: torch.device,
                    epoch: int, *, quiet: bool = False) -> dict:
    """One pass over ``loader``; returns mean loss, images/s and the last learning rate.

    The model trains in the mode the caller set (:func:`set_train_mode` freezes the backbone or
    its norm statistics); a model left wholly in eval mode is switched to train mode. A resume
    inside the epoch (``stepper.start``) continues the epoch's count; ``stepper.on_step`` is
    called after the optimizer steps.
    """
    if not model.training:
        model.train()
    scaler = stepper.scaler or grad_scaler_for(device, "fp32")
    loss_fn = task_loss(loss_fn)
    start, on_step = stepper.start, stepper.on_step
    first = start["step"] if start else 0
    total_loss, seen = (start["loss"], start["seen"]) if start else (0.0, 0)
    done_before, start_time = seen, time.perf_counter()
    bar = _Progress(loader, f"epoch {epoch}", quiet)
    stepper.optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(bar, start=first):
        images = images.to(device, non_blocking=True)
        targets = as_targets(targets).to(device, non_blocking=True)
        if stepper.mix is not None:
            images, targets = stepper.mix(images, targets)
        if stepper.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, stepper.precision):
            outputs = stepper.forward(images) if stepper.forward is not None else model_outputs(model, images)
        loss = loss_fn(outputs.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, step {step}; lower train.lr, set "
                "train.grad_clip, or check the inputs of that batch. The last good checkpoint "
                "(end of the previous epoch) is kept: resume=true continues from it")
        scaler.scale(loss / stepper.accumulate).backward()
        stepped = (step + 1) % stepper.accumulate == 0 or step + 1 == len(loader)
        if stepped:
            _optimizer_step(model, stepper, scaler)
        total_loss += loss.item() * len(images)
        seen += len(images)
        rate = (seen - done_before) / (time.perf_counter() - start_time)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{stepper.scheduler.get_last_lr()[-1]:.2e}",
                        img_s=f"{rate:.0f}")
        if stepped and on_step is not None and step + 1 < len(loader):
            on_step({"step": step + 1, "loss": total_loss, "seen": seen})
    elapsed = time.perf_counter() - start_time
    return {"train_loss": total_loss / max(seen, 1), "images_per_s": (seen - done_before) / max(elapsed, 1e-9),
            "train_images": seen,
            "lr": stepper.scheduler.get_last_lr()[-1], "train_time_s": elapsed}


def set_train_mode(model: nn.Module, freeze_backbone: bool = False, freeze_norm_stats: bool = False) -> None:
    """Train mode, except a frozen backbone (eval) or its batch-norm layers (running statistics).

    With ``freeze_norm_stats`` the running statistics stay those of pretraining while every weight
    trains: switching a pretrained backbone from running to small-batch statistics when it is
    unfrozen shifts its features under the fitted head."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()
    elif freeze_norm_stats:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _optimizer_step(model: nn.Module, stepper: Stepper, scaler) -> None:
    """One optimizer step of the accumulated gradients (unscaled and clipped first when asked);
    the scheduler and the EMA advance with it."""
    if stepper.grad_clip:
        scaler.unscale_(stepper.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), stepper.grad_clip)
    scaler.step(stepper.optimizer)
    scaler.update()
    stepper.optimizer.zero_grad(set_to_none=True)
    stepper.scheduler.step()
    if stepper.ema is not None:
        stepper.ema.update(model)


@torch.no_grad()
def collect_predictions(model: nn.Module, loader, device: torch.device, loss_fn: nn.Module | None = None,
                        *, channels_last: bool = False, progress: str | None = "eval",
                        consume: Callable | None = None):
    """Outputs and targets over a loader, and the mean loss when ``loss_fn`` is given.
    ``progress``: the progress bar's title (None: no bar). ``consume(outputs, targets)`` takes
    each batch instead (streaming evaluation: nothing is kept; the outputs and targets returned
    are then None).

    Returns:
        :class:`~mlabel.outputs.Outputs` (float32, on the CPU), :class:`~mlabel.outputs.Targets`,
        mean loss (or None).
    """
    model.eval()
    loss_fn = None if loss_fn is None else task_loss(loss_fn)
    all_outputs, all_targets, total_loss, seen = [], [], 0.0, 0
    for images, targets in _Progress(loader, progress or "", progress is None):
        images, targets = images.to(device, non_blocking=True), as_targets(targets)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, eval_precision(device)):
            outputs = model_outputs(model, images).float()
        if loss_fn is not None:
            total_loss += loss_fn(outputs, targets.to(device)).item() * len(images)
            seen += len(images)
        if consume is not None:
            consume(outputs, targets)
            continue
        all_outputs.append(outputs.to("cpu"))
        all_targets.append(targets)
    loss = total_loss / seen if loss_fn is not None and seen else None
    if consume is not None:
        return None, None, loss
    return concat(all_outputs), concat(all_targets), loss
