"""The epoch loop of a training run: its parts (optimizer, schedule, scaler, EMA), resume, the
DDP / compile wrapper, the best-weights rule, the per-epoch line, checkpoint and history.

:func:`fit_epochs` is what :mod:`mlabel.train` calls between building the data and model and
tuning the thresholds: it runs an :class:`EpochLoop`, whose :class:`TrainState` (epoch, step,
best weights, history) is all it carries from epoch to epoch and into the checkpoints. The
training loader is any :class:`mlabel.data.loaders.TrainLoader`.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import capture_rng, restore_rng, save_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import OutputsModule, World, mean_across
from .engine import (ModelEma, Stepper, batch_mixer, build_optimizer, build_scheduler, grad_scaler_for,
                     set_train_mode, train_one_epoch)
from .evaluation import EvalSettings, scorer
from .io import write_text
from .models import MultiLabelClassifier
from .resolve import ResolvedConfig

__all__ = ["CHECKPOINT", "EpochLoop", "LoopSetup", "TrainState", "duration", "fit_epochs", "log"]

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


def _training_parts(t: TrainConfig, model, train_loader, device) -> _Parts:
    """The optimizer, schedule, scaler, EMA and step settings of the ``train`` section ``t``."""
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.backbone_lr_scale, name=t.optimizer,
                                args=t.optimizer_args, layer_decay=t.layer_decay)
    steps_per_epoch = math.ceil(len(train_loader) / t.accumulate)
    scheduler = build_scheduler(optimizer, steps_per_epoch * t.epochs, int(steps_per_epoch * t.warmup_epochs),
                                t.schedule)
    ema = ModelEma(model, t.ema_decay, t.ema_warmup) if t.ema else None
    return _Parts(optimizer, scheduler, grad_scaler_for(device, t.precision), ema, precision=t.precision,
                  channels_last=t.channels_last, accumulate=t.accumulate, grad_clip=t.grad_clip,
                  mix=batch_mixer(t.mixup_alpha, t.cutmix_alpha, t.mix_prob),
                  steps_per_epoch=steps_per_epoch)


@dataclass
class TrainState:
    """What the epoch loop carries from epoch to epoch; a checkpoint's ``train_state`` (as
    :meth:`as_dict`, so a checkpoint holds plain types).

    ``best_map``, ``best_epoch``, ``best_weights`` ("model" or "ema") and ``best_state`` (a
    CPU state dict): the weights with the best val mAP so far; ``history``: a row per epoch;
    ``in_epoch``: in a checkpoint written inside an epoch, where in it ({"epoch", "step",
    "loss", "seen"})."""
    epoch: int = 0
    step: int = 0
    best_map: float = -1.0
    best_epoch: int = 0
    best_weights: str = "model"
    best_state: dict | None = None
    history: list = field(default_factory=list)
    stopped_early: bool = False
    in_epoch: dict | None = None

    def as_dict(self) -> dict:
        """The checkpoint's ``train_state`` (``in_epoch`` only when inside an epoch)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["in_epoch"] is None:
            del out["in_epoch"]
        return out

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(**saved)


@dataclass
class LoopSetup:
    """Where and how the epoch loop runs: the ``device``, the run directory ``out_dir``, the
    DDP ``world``, ``quiet``, and for a resumed run the checkpoint :func:`mlabel.resume.load_resume`
    read (``resumed``: its path and contents), and the resume guard and the config tree
    (:func:`mlabel.resolve.saved_config`) the checkpoints carry."""
    device: torch.device
    out_dir: Path
    world: World = field(default_factory=World)
    quiet: bool = False
    resumed: tuple[Path, dict] | None = None
    guard: dict | None = None
    config: dict | None = None


def _resume(model, parts: _Parts, resumed: tuple[Path, dict] | None, quiet: bool) -> TrainState:
    """The training state: fresh, or everything the checkpoint read by :func:`mlabel.resume.load_resume` holds."""
    if resumed is None:
        return TrainState()
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
    return TrainState.from_dict(saved["train_state"])


PLATEAU_DROP = 0.005  # train.schedule=plateau: a val mAP this share under the best (or two epochs without a new best)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m {seconds:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


class EpochLoop:
    """The epoch loop of one run; :meth:`run` trains every epoch left and returns the
    :class:`TrainState`. Keeps the weights (regular or EMA) with the best val mAP, and stops
    early after ``train.early_stop_patience`` epochs without a better one.

    The checkpoint written after every epoch holds model, EMA, optimizer, scheduler, grad
    scaler, RNG states, the train state and the config; a ``resumed`` setup restarts the
    interrupted epoch from it and finishes with the same result as an uninterrupted run.
    """

    def __init__(self, cfg: ResolvedConfig, model, loaders, loss_fn, setup: LoopSetup):
        self.cfg, self.model, self.loss_fn, self.setup = cfg, model, loss_fn, setup
        self.train_loader, eval_loaders = loaders
        self.parts = _training_parts(cfg.train, model, self.train_loader, setup.device)
        self.parts.guard = setup.guard
        self.state = _resume(model, self.parts, setup.resumed, setup.quiet)
        self.wrapped: dict = {}
        self.board = _tensorboard(setup.out_dir) if cfg.log.tensorboard and setup.world.main else None
        settings = EvalSettings.from_config(cfg)
        self.scorer = lambda module: scorer(module, eval_loaders["val"], setup.device, settings,  # noqa: E731
                                            world=setup.world, quiet=setup.quiet)

    def validate(self, module, loss=None) -> tuple[float, float | None]:
        """(val mAP, val loss): exact, or from histograms under ``thresholds.streaming``
        (:func:`mlabel.evaluation.scorer` decides)."""
        return self.scorer(module).ranking(loss)

    def run(self) -> TrainState:
        first = self.state.epoch + 1
        for epoch in range(first, self.cfg.train.epochs + 1):
            if self.state.stopped_early:
                break
            self.epoch(epoch, resumed=self.setup.resumed is not None and epoch == first)
        if self.board is not None:
            self.board.close()
        return self.state

    def epoch(self, epoch: int, resumed: bool = False) -> None:
        """Train, validate, keep the best weights, log and checkpoint one epoch (``resumed``: the
        first epoch of a resumed process)."""
        cfg, model, parts, world, quiet = self.cfg, self.model, self.parts, self.setup.world, self.setup.quiet
        started = time.perf_counter()
        frozen = epoch <= cfg.train.freeze_backbone_epochs
        _set_backbone_frozen(model, frozen)
        set_train_mode(model, frozen, cfg.train.freeze_norm_stats)
        parts.forward = self._wrap(frozen)
        if resumed and epoch > 1:
            self.train_loader.resume_start()
        self.train_loader.set_epoch(cfg.seed * 100_003 + epoch)
        partial, self.state.in_epoch = self.state.in_epoch, None
        if partial is not None:
            self.train_loader.skip_steps(partial["step"])
            log(quiet, f"epoch {epoch} continues after step {partial['step']} of {len(self.train_loader)}")
        parts.start, parts.on_step = partial, self._step_checkpoints(epoch)
        trained = train_one_epoch(model, self.train_loader, self.loss_fn, parts, self.setup.device, epoch, quiet=quiet)
        val_map, val_loss = self.validate(model, self.loss_fn)
        row = {"epoch": epoch, "train_loss": mean_across(trained["train_loss"], world), "val_loss": val_loss,
               "train_images": round(mean_across(trained["train_images"], world) * world.size),
               "val_mAP": val_map, "lr": trained["lr"], "images_per_s": trained["images_per_s"] * world.size,
               "epoch_time_s": trained["train_time_s"]}
        self._select_best(row, epoch)
        row["epoch_wall_s"] = time.perf_counter() - started  # training, validation and EMA validation
        self._end_epoch(row, epoch, frozen)

    def _wrap(self, frozen: bool):
        """The module the epoch calls: DDP and ``torch.compile`` around the model, rebuilt when
        the frozen parameters change (DDP registers the trainable ones when it is built)."""
        wrapped, device = self.wrapped, self.setup.device
        if wrapped.get("frozen") != frozen:
            wrapped.pop("forward", None)  # release the old DDP (and its gradient hooks) first
            forward = OutputsModule(self.model)
            if self.setup.world.distributed:
                forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
            wrapped.update(frozen=frozen, forward=torch.compile(forward) if self.cfg.train.compile else forward)
        return wrapped["forward"]

    def _select_best(self, row: dict, epoch: int) -> None:
        """Score the EMA too; keep the better weights when val mAP improves, else count patience
        and start a ``plateau`` schedule's decay once val mAP has stalled: fallen more than
        :data:`PLATEAU_DROP` of the best (a dip of a thousandth is noise, not a plateau), or no new
        best for two epochs."""
        parts, state, train = self.parts, self.state, self.cfg.train
        candidates = [("model", row["val_mAP"], self.model)]
        if parts.ema is not None:
            row["val_mAP_ema"], _ = self.validate(parts.ema.module)
            candidates.append(("ema", row["val_mAP_ema"], parts.ema.module))
        source, best_here, module = max(candidates, key=lambda c: c[1])
        if best_here > state.best_map:
            state.best_map, state.best_epoch, state.best_weights = best_here, epoch, source
            state.best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            return
        factor = parts.scheduler.lr_lambdas[0]
        stalled = best_here < (1 - PLATEAU_DROP) * state.best_map or epoch - state.best_epoch >= 2
        if stalled and factor.decay_now(parts.scheduler.last_epoch):
            left = train.epochs - epoch
            log(self.setup.quiet, f"val mAP {best_here:.4f} has stalled (best {state.best_map:.4f}): the learning rate "
                                  f"anneals over the {left} epoch{'s' if left != 1 else ''} left (train.schedule=plateau)")
        if train.early_stop_patience and epoch - state.best_epoch >= train.early_stop_patience:
            state.stopped_early = True

    def _epoch_line(self, row: dict, epoch: int, frozen: bool) -> str:
        """``epoch 3/10  train_loss ..  val_mAP .. *  lr 1.2e-03  41 s  ETA 4m 47s  812 img/s``;
        ``*`` marks a new best val mAP (the weights kept)."""
        train, state = self.cfg.train, self.state
        walls = [r["epoch_wall_s"] for r in state.history if r.get("epoch_wall_s") is not None]
        left = train.epochs - epoch
        eta = f"  ETA {duration(left * sum(walls) / len(walls))}" if walls and left else ""
        return (f"epoch {epoch}/{train.epochs}  train_loss {row['train_loss']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_mAP {row['val_mAP']:.4f}"
                + (f"  (EMA {row['val_mAP_ema']:.4f})" if self.parts.ema is not None else "")
                + (" *" if state.best_epoch == epoch else "  ")
                + f"  lr {row['lr']:.2e}  {duration(row['epoch_wall_s'])}{eta}"
                + f"  {row['images_per_s']:.0f} img/s{'  (backbone frozen)' if frozen else ''}"
                + (f"  -- no better val mAP for {train.early_stop_patience} epochs: stopping"
                   if state.stopped_early else ""))

    def _save(self, train_state: dict) -> None:
        parts = self.parts
        save_checkpoint(self.setup.out_dir / CHECKPOINT, {
            "model": self.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
            "ema": None if parts.ema is None else parts.ema.state_dict(), "rng": capture_rng(),
            "train_state": train_state, "config": self.setup.config, "guard": parts.guard})

    def _step_checkpoints(self, epoch: int):
        """``train.checkpoint_every_steps``: the callback that checkpoints inside the epoch (None when off)."""
        every = self.cfg.train.checkpoint_every_steps * self.cfg.train.accumulate
        if not every:
            return None

        def checkpoint(record: dict) -> None:
            if record["step"] % every == 0 and self.setup.world.main:
                self._save({**self.state.as_dict(), "in_epoch": {"epoch": epoch, **record}})
        return checkpoint

    def _end_epoch(self, row: dict, epoch: int, frozen: bool) -> None:
        """Record, log, checkpoint (one writer: every rank holds the same state) and TensorBoard."""
        state = self.state
        state.history.append(row)
        state.step += self.parts.steps_per_epoch
        state.epoch = epoch
        log(self.setup.quiet, self._epoch_line(row, epoch, frozen))
        if self.setup.world.main:
            self._save(state.as_dict())
            _write_history(self.setup.out_dir / "history.csv", state.history)
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    self.board.add_scalar(key, value, epoch)
            self.board.flush()


def fit_epochs(cfg: ResolvedConfig, model, loaders, loss_fn, setup: LoopSetup) -> TrainState:
    """Run the :class:`EpochLoop` of ``cfg`` over ``loaders`` (training loader, {"val": ...});
    returns the training state."""
    return EpochLoop(cfg, model, loaders, loss_fn, setup).run()


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out_dir / "tensorboard"))
