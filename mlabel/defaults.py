"""The ``auto`` values of a config, decided from the data and the machine before training, and
said: every choice prints one ``defaults:`` line with its reason, and the saved ``config.yaml``
holds the decided values, so a rerun trains the same way.

- ``data.resize``: ``squish`` for multi-label data (the whole image is kept, so no labelled object
  is cut away by a centre crop), ``crop`` for a binary task (one subject, usually centred).
- ``data.cache``: on when the decoded uint8 squares of every split fit in :data:`CACHE_BUDGET`
  (and an eighth of the memory, and twice over on the cache's disk): small data sets are decoded
  once instead of every epoch.
- ``data.num_workers``: the cores this process may use, less one for training, at most 4; none
  with the cache on two cores or fewer (measured: 162 images/s in the training process against
  146-155 with a loader thread beside it; docs/RESULTS.md).
- ``data.augment``: ``light`` (random resized crop and flip) for a binary task; ``none`` for
  multi-label data, whose ``light`` preset is only a horizontal flip once the image is squished:
  a mirrored digit, letter or left/right label is another label (measured: -0.03 mAP on digits,
  +0.04 on the quickstart's shapes; docs/RESULTS.md). Set ``light`` or ``flips`` for content
  without a handedness.
- ``data.box_crops``: on when the annotations give boxes (voc, coco): a random crop of a training
  image then keeps every labelled box (and reads the image from its file, not the cache).
- ``model.pretrained``: the offline weights installed for the backbone (``mlabel models`` lists
  them), else from scratch. ``auto`` never downloads; ``true`` asks timm's hub.
- ``train.schedule``: ``cosine`` from pretrained weights; ``plateau`` from scratch (the base rate
  while val mAP still improves, then cosine): from scratch in a short budget some data sets are
  still under-fitted at the end, and a rate decayed on a fixed plan costs them (docs/RESULTS.md).
- ``train.precision``: ``bf16`` autocast for training on CUDA and on CPUs with native bf16
  (AVX512-BF16, AMX: about twice the fp32 speed), else ``fp32``; evaluation stays fp32 on CPUs.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["resolve_defaults", "usable_cores", "loader_workers", "CACHE_BUDGET"]

CACHE_BUDGET = 2 * 2**30  # bytes of decoded squares that data.cache=auto keeps


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(value, cached: bool = False, cores: int | None = None) -> int:
    """``data.num_workers`` as a number: ``auto`` is the usable ``cores`` (None: this process's)
    less one, at most 4, and none when the images come from the cache on two cores or fewer."""
    if value != "auto":
        return int(value)
    cores = usable_cores() if cores is None else cores
    return 0 if cached and cores <= 2 else max(0, min(4, cores - 1))


def _cache_fits(data, images: int) -> tuple[bool, str]:
    """Whether the decoded squares of ``images`` images fit the budget, memory and disk, and why."""
    from .data.cache import default_cache_dir
    side = data.image_size if data.resize == "squish" else math.ceil(data.image_size / 0.875)  # timm's usual crop
    size = images * side * side * 3
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else size * 8
    folder = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    limit = min(CACHE_BUDGET, memory / 8)
    where = f"{images:,} images decode to {size / 2**20:,.0f} MB of uint8 squares"
    if size > limit:
        return False, f"{where}, over the {limit / 2**30:.1f} GiB kept in memory: decoded every epoch"
    if free < 2 * size:
        return False, f"{where}, and {folder} has {free / 2**20:,.0f} MB free: decoded every epoch"
    return True, f"{where}, within {limit / 2**30:.1f} GiB: decoded once, not every epoch"


def resolve_defaults(cfg, task: str, log: Callable[[str], None], images: int = 0, boxes: bool = False,
                     device=None, cores: int | None = None) -> None:
    """Replace every ``auto`` of ``cfg`` that the data (``task``, ``images`` in all splits,
    whether the training annotations give ``boxes``) or the machine (``device``, usable ``cores``;
    None: this process's) decides, in place: :func:`mlabel.resolve.resolve` calls it on its
    private draft of the config."""
    data, model = cfg.data, cfg.model
    if data.resize == "auto":
        data.resize = "squish" if task == "multilabel" else "crop"
        reason = "multi-label: keep the whole image, so no labelled object is cropped away" \
            if task == "multilabel" else "binary: one subject, centre-cropped as pretrained models saw it"
        log(f"defaults: data.resize={data.resize} ({reason})")
    if data.augment == "auto":
        data.augment = "light" if task == "binary" else "none"
        log(f"defaults: data.augment={data.augment} (" + (
            "binary: random resized crops and flips" if task == "binary" else
            "multi-label: no mirror images, which can change what a label means; "
            "data.augment=light or flips for content without a handedness") + ")")
    if data.box_crops == "auto":
        data.box_crops = boxes
        log(f"defaults: data.box_crops={str(boxes).lower()} (" + (
            "the annotations give boxes: random crops keep every labelled box" if boxes else
            "the annotations give no boxes") + ")")
    if data.cache == "auto" and data.format == "wds":
        data.cache = False
        log("defaults: data.cache=false (wds shards are streamed and decoded in the loader workers)")
    if data.cache == "auto":
        data.cache, reason = _cache_fits(data, images)
        log(f"defaults: data.cache={str(data.cache).lower()} ({reason})")
    if data.num_workers == "auto":
        cores = usable_cores() if cores is None else cores
        data.num_workers = loader_workers("auto", bool(data.cache), cores)
        reason = "the images come from the cache: loaded in the training process" if data.cache and \
            data.num_workers == 0 else "one left for training"
        log(f"defaults: data.num_workers={data.num_workers} ({cores} usable cores, {reason})")
    if model.pretrained == "auto":
        from .weights import resolve_auto_pretrained
        model.pretrained, why = resolve_auto_pretrained(model.backbone)
        log(f"defaults: model.pretrained={str(model.pretrained).lower()} ({why})")
    _resolve_training(cfg.train, bool(model.pretrained), device, log)


def _resolve_training(train, pretrained: bool, device, log: Callable[[str], None]) -> None:
    if getattr(train, "schedule", None) == "auto":
        train.schedule = "cosine" if pretrained else "plateau"
        log(f"defaults: train.schedule={train.schedule} (" + (
            "pretrained weights: decay from the start" if pretrained else
            "from scratch: the base rate while val mAP improves, then cosine") + ")")
    if getattr(train, "precision", None) == "auto" and device is not None:
        from .engine import native_bf16
        train.precision = "bf16" if native_bf16(device) else "fp32"
        reason = {"cuda": "CUDA", "cpu": "this CPU computes bf16 natively"}.get(device.type, device.type) \
            if train.precision == "bf16" else f"no native bf16 on {device.type}"
        log(f"defaults: train.precision={train.precision} ({reason}; evaluation in "
            f"{'bf16' if device.type == 'cuda' else 'fp32'})")
