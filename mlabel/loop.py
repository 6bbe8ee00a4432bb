"""The epoch loop of a training run: its parts (optimizer, schedule, scaler, EMA), resume, the
DDP / compile wrapper, the best-weights rule, the per-epoch line, checkpoint and history.

:func:`fit_epochs` is what :mod:`mlabel.train` calls between building the data and model and
tuning the thresholds; a state dict (epoch, step, best weights, history) is all it carries.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import capture_rng, restore_rng, save_checkpoint
from .config import Config, ConfigError, config_to_dict
from .distributed import OutputsModule, World, mean_across
from .engine import (ModelEma, Stepper, batch_mixer, build_optimizer, build_scheduler, grad_scaler_for,
                     set_train_mode, train_one_epoch)
from .evaluation import EvalSettings, scorer
from .io import write_text
from .models import MultiLabelClassifier

__all__ = ["CHECKPOINT", "duration", "fit_epochs", "log"]

CHECKPOINT = "checkpoint.pt"


def log(quiet: bool, *parts) -> None:
    if not quiet:
        print(*parts, flush=True)


def _set_backbone_frozen(model: MultiLabelClassifier, frozen: bool) -> None:
    for param in model.backbone.parameters():
        param.requires_grad_(not frozen)


def _write_history(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


@dataclass
class _Parts(Stepper):
    """What the epoch loop steps besides the model: the step's parts and settings, and the
    optimizer steps an epoch takes, and the resume guard the checkpoints carry
    (:func:`mlabel.resume.resume_guard`)."""
    steps_per_epoch: int = 0
    guard: dict | None = None


def _training_parts(cfg: Config, model, train_loader, device) -> _Parts:
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.backbone_lr_scale, name=t.optimizer,
                                args=t.optimizer_args, layer_decay=t.layer_decay)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accumulate)
    scheduler = build_scheduler(optimizer, steps_per_epoch * cfg.train.epochs,
                                int(steps_per_epoch * cfg.train.warmup_epochs), cfg.train.schedule)
    ema = ModelEma(model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema else None
    return _Parts(optimizer, scheduler, grad_scaler_for(device, t.precision), ema, precision=t.precision,
                  channels_last=t.channels_last, accumulate=t.accumulate, grad_clip=t.grad_clip,
                  mix=batch_mixer(t.mixup_alpha, t.cutmix_alpha, t.mix_prob),
                  steps_per_epoch=steps_per_epoch)


def _resume(model, parts: _Parts, resumed: tuple[Path, dict] | None, quiet: bool) -> dict:
    """The training state: fresh, or everything the checkpoint read by :func:`mlabel.resume.load_resume` holds."""
    if resumed is None:
        return {"epoch": 0, "step": 0, "best_map": -1.0, "best_epoch": 0, "best_weights": "model",
                "best_state": None, "history": [], "stopped_early": False}
    path, saved = resumed
    model.load_state_dict(saved["model"])
    for name in ("optimizer", "scheduler", "scaler"):
        getattr(parts, name).load_state_dict(saved[name])
    if parts.ema is not None:
        parts.ema.load_state_dict(saved["ema"])
    restore_rng(saved["rng"])
    inside = saved["train_state"].get("in_epoch")
    log(quiet, f"resumed from {path} after epoch {saved['train_state']['epoch']}"
        + (f" and step {inside['step']} of epoch {inside['epoch']}" if inside else ""))
    return saved["train_state"]


def _wrap(cfg: Config, model, wrapped: dict, frozen: bool, device, world: World):
    """The module the epoch calls: DDP and ``torch.compile`` around the model, rebuilt when
    the frozen parameters change (DDP registers the trainable ones when it is built)."""
    if wrapped.get("frozen") != frozen:
        wrapped.pop("forward", None)  # release the old DDP (and its gradient hooks) first
        forward = OutputsModule(model)
        if world.distributed:
            forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped.update(frozen=frozen, forward=torch.compile(forward) if cfg.train.compile else forward)
    return wrapped["forward"]


PLATEAU_DROP = 0.005  # train.schedule=plateau: a val mAP this share under the best (or two epochs without a new best)


def _select_best(cfg: Config, model, parts: _Parts, state: dict, row: dict, epoch: int, validate,
                 quiet: bool) -> None:
    """Score the EMA too; keep the better weights when val mAP improves, else count patience
    and start a ``plateau`` schedule's decay once val mAP has stalled: fallen more than
    :data:`PLATEAU_DROP` of the best (a dip of a thousandth is noise, not a plateau), or no new
    best for two epochs."""
    candidates = [("model", row["val_mAP"], model)]
    if parts.ema is not None:
        row["val_mAP_ema"], _ = validate(parts.ema.module)
        candidates.append(("ema", row["val_mAP_ema"], parts.ema.module))
    source, best_here, module = max(candidates, key=lambda c: c[1])
    if best_here > state["best_map"]:
        state.update(best_map=best_here, best_epoch=epoch, best_weights=source,
                     best_state={k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
    else:
        factor = parts.scheduler.lr_lambdas[0]
        stalled = best_here < (1 - PLATEAU_DROP) * state["best_map"] or epoch - state["best_epoch"] >= 2
        if stalled and factor.decay_now(parts.scheduler.last_epoch):
            left = cfg.train.epochs - epoch
            log(quiet, f"val mAP {best_here:.4f} has stalled (best {state['best_map']:.4f}): the learning rate anneals over the {left} "
                       f"epoch{'s' if left != 1 else ''} left (train.schedule=plateau)")
        if cfg.train.early_stop_patience and epoch - state["best_epoch"] >= cfg.train.early_stop_patience:
            state["stopped_early"] = True


def _epoch_line(cfg: Config, parts: _Parts, state: dict, row: dict, epoch: int, frozen: bool) -> str:
    """``epoch 3/10  train_loss ..  val_mAP .. *  lr 1.2e-03  41 s  ETA 4m 47s  812 img/s``;
    ``*`` marks a new best val mAP (the weights kept)."""
    walls = [r["epoch_wall_s"] for r in state["history"] if r.get("epoch_wall_s") is not None]
    left = cfg.train.epochs - epoch
    eta = f"  ETA {duration(left * sum(walls) / len(walls))}" if walls and left else ""
    return (f"epoch {epoch}/{cfg.train.epochs}  train_loss {row['train_loss']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_mAP {row['val_mAP']:.4f}"
            + (f"  (EMA {row['val_mAP_ema']:.4f})" if parts.ema is not None else "")
            + (" *" if state["best_epoch"] == epoch else "  ")
            + f"  lr {row['lr']:.2e}  {duration(row['epoch_wall_s'])}{eta}"
            + f"  {row['images_per_s']:.0f} img/s{'  (backbone frozen)' if frozen else ''}"
            + (f"  -- no better val mAP for {cfg.train.early_stop_patience} epochs: stopping"
               if state["stopped_early"] else ""))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _as_if_running(loader) -> None:
    """A resumed run starts its loader as the interrupted run had it: a DataLoader with persistent
    workers draws its workers' base seed from the shared generator when its first iterator is
    made (epoch 1), not in later epochs, so a process resuming at a later epoch makes its iterator
    now, before the epoch's reseed; the epoch then orders its samples as the uninterrupted run."""
    if isinstance(loader, torch.utils.data.DataLoader) and loader.persistent_workers and loader.num_workers > 0:
        iter(loader)


def skip_steps(loader, steps: int, batch_size: int) -> None:
    """Make the next pass of a training loader (reseeded for its epoch) leave out its first
    ``steps`` batches: the shard stream skips them, the file loaders' sampler their samples."""
    from .data.shards import ShardLoader
    if isinstance(loader, ShardLoader):
        loader.dataset.skip_steps = steps
        return
    sampler = getattr(loader, "sampler", None) or getattr(getattr(loader, "batches", None), "sampler", None)
    sampler.skip = steps * batch_size


def _save(cfg: Config, model, parts: _Parts, state: dict, out_dir: Path) -> None:
    save_checkpoint(out_dir / CHECKPOINT, {
        "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "ema": None if parts.ema is None else parts.ema.state_dict(), "rng": capture_rng(),
        "train_state": state, "config": config_to_dict(cfg), "guard": parts.guard})


def _step_checkpoints(cfg: Config, model, parts: _Parts, state: dict, epoch: int, out_dir: Path, world: World):
    """``train.checkpoint_every_steps``: the callback that checkpoints inside the epoch (None when off)."""
    every = cfg.train.checkpoint_every_steps * cfg.train.accumulate
    if not every:
        return None

    def checkpoint(record: dict) -> None:
        if record["step"] % every == 0 and world.main:
            _save(cfg, model, parts, {**state, "in_epoch": {"epoch": epoch, **record}}, out_dir)
    return checkpoint


def _end_epoch(cfg: Config, model, parts: _Parts, state: dict, row: dict, epoch: int, frozen: bool,
               out_dir: Path, quiet: bool, world: World, board) -> None:
    """Record, log, checkpoint (one writer: every rank holds the same state) and TensorBoard."""
    state["history"].append(row)
    state["step"] += parts.steps_per_epoch
    state["epoch"] = epoch
    log(quiet, _epoch_line(cfg, parts, state, row, epoch, frozen))
    if world.main:
        _save(cfg, model, parts, state, out_dir)
        _write_history(out_dir / "history.csv", state["history"])
    if board is not None:
        for key, value in row.items():
            if key != "epoch" and value is not None:
                board.add_scalar(key, value, epoch)
        board.flush()


def _validator(cfg: Config, loader, device, world: World, quiet: bool):
    """``validate(module, loss_fn=None) -> (val mAP, val loss)``: exact, or from histograms under
    ``thresholds.streaming`` (:func:`mlabel.evaluation.scorer` decides)."""
    settings = EvalSettings.from_config(cfg)

    def validate(module, loss=None) -> tuple[float, float | None]:
        return scorer(module, loader, device, settings, world=world, quiet=quiet).ranking(loss)
    return validate


def fit_epochs(cfg: Config, model, loaders, loss_fn, device, out_dir: Path, quiet: bool, world: World = World(),
               resumed: tuple[Path, dict] | None = None, guard: dict | None = None) -> dict:
    """The epoch loop; keeps the weights (regular or EMA) with the best val mAP, and stops early
    after ``train.early_stop_patience`` epochs without a better one. Returns the training state.

    The checkpoint written after every epoch holds model, EMA, optimizer, scheduler, grad scaler,
    RNG states, epoch, optimizer step, the best weights so far and the config; ``resumed`` (what
    :func:`mlabel.resume.load_resume` read when ``resume=true``) restarts the interrupted epoch from it and
    finishes with the same result as an uninterrupted run.
    """
    train_loader, eval_loaders = loaders
    parts = _training_parts(cfg, model, train_loader, device)
    parts.guard = guard
    state = _resume(model, parts, resumed, quiet)
    wrapped: dict = {}
    board = _tensorboard(out_dir) if cfg.log.tensorboard and world.main else None
    validate = _validator(cfg, eval_loaders["val"], device, world, quiet)

    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["stopped_early"]:
            break
        started = time.perf_counter()
        frozen = epoch <= cfg.train.freeze_backbone_epochs
        _set_backbone_frozen(model, frozen)
        set_train_mode(model, frozen, cfg.train.freeze_norm_stats)
        parts.forward = _wrap(cfg, model, wrapped, frozen, device, world)
        if resumed is not None and epoch > 1:  # once, before the first epoch this process trains
            _as_if_running(train_loader)
        resumed = None
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        partial = state.pop("in_epoch", None)
        if partial is not None:
            skip_steps(train_loader, partial["step"], cfg.data.batch_size)
            log(quiet, f"epoch {epoch} continues after step {partial['step']} of {len(train_loader)}")
        trained = train_one_epoch(model, train_loader, loss_fn, parts, device, epoch, quiet=quiet, start=partial,
                                  on_step=_step_checkpoints(cfg, model, parts, state, epoch, out_dir, world))
        val_map, val_loss = validate(model, loss_fn)
        row = {"epoch": epoch, "train_loss": mean_across(trained["train_loss"], world), "val_loss": val_loss,
               "train_images": round(mean_across(trained["train_images"], world) * world.size),
               "val_mAP": val_map, "lr": trained["lr"], "images_per_s": trained["images_per_s"] * world.size,
               "epoch_time_s": trained["train_time_s"]}
        _select_best(cfg, model, parts, state, row, epoch, validate, quiet)
        row["epoch_wall_s"] = time.perf_counter() - started  # training, validation and EMA validation
        _end_epoch(cfg, model, parts, state, row, epoch, frozen, out_dir, quiet, world, board)
    if board is not None:
        board.close()
    return state


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out_dir / "tensorboard"))
