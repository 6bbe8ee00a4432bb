"""The report's figures (matplotlib, written as PNGs beside ``report.html`` and inlined in it)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["text.parse_math"] = False  # label names are text: "$x$" must not be read as TeX
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from ..io import atomic_path  # noqa: E402
from ..metrics import label_curves  # noqa: E402
from ..cutoffs import objective_values  # noqa: E402

MAX_LABELS_PLOTTED = 16


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _grid(n: int):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _label_curves(probs: np.ndarray, targets: np.ndarray):
    """Per label: thresholds, precision, recall, F1 at every distinct score."""
    for t, tp, fp, n_pos, n_neg in label_curves(probs, targets):
        # The very curve the threshold tuner maximises.
        f1 = objective_values("f1", tp[None].copy(), fp[None], np.array([[n_pos]]), np.array([[n_neg]]))[0]
        yield t, tp / np.maximum(tp + fp, 1), tp / max(n_pos, 1), f1


def plot_training(history: list[dict], folder: Path) -> str:
    epochs = [int(r["epoch"]) for r in history]
    maps = [r["val_mAP"] for r in history]
    kept = [max(r["val_mAP"], r.get("val_mAP_ema") or -1.0) for r in history]  # the EMA may win an epoch
    best = epochs[int(np.argmax(kept))] if kept else None
    fig, (left, right, rate) = plt.subplots(1, 3, figsize=(13, 3.5), layout="constrained")
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    left.set_xlabel("epoch"), left.set_ylabel("loss"), left.legend(), left.grid(alpha=0.3)
    right.plot(epochs, maps, "o-", color="C2")
    if best is not None:
        right.axvline(best, color="C3", ls="--", lw=1, label=f"best epoch {best}")
        right.legend()
    right.set_xlabel("epoch"), right.set_ylabel("val mAP"), right.grid(alpha=0.3)
    right.set_title("validation mAP (the best epoch's weights are kept)")
    rate.plot(epochs, [r.get("lr") for r in history], "o-", color="C4")
    rate.set_xlabel("epoch"), rate.set_ylabel("learning rate at the epoch's end"), rate.grid(alpha=0.3)
    for ax in (left, right, rate):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, folder / "training_curves.png")


def plot_pr_and_f1(probs, targets, labels, thresholds, folder: Path) -> tuple[str, str]:
    shown = labels[:MAX_LABELS_PLOTTED]
    pr_fig, pr_axes = _grid(len(shown))
    f1_fig, f1_axes = _grid(len(shown))
    for j, (name, (t, precision, recall, f1), pr_ax, f1_ax) in enumerate(
            zip(shown, _label_curves(probs, targets), pr_axes, f1_axes)):
        chosen = int(np.searchsorted(-t, -thresholds[j], side="right")) - 1
        pr_ax.plot(recall, precision, lw=1.5)
        if chosen >= 0:
            pr_ax.plot(recall[chosen], precision[chosen], "o", color="C3", label="tuned threshold")
        pr_ax.set(title=name, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        pr_ax.grid(alpha=0.3)
        f1_ax.plot(t, f1, lw=1.5)
        f1_ax.axvline(thresholds[j], color="C3", ls="-", label=f"tuned {thresholds[j]:.2f}")
        f1_ax.axvline(0.5, color="grey", ls="--", label="0.5")
        f1_ax.set(title=name, xlabel="threshold", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02))
        f1_ax.legend(fontsize=7, loc="lower center"), f1_ax.grid(alpha=0.3)
    pr_fig.suptitle("precision-recall on val (dot: tuned threshold)")
    f1_fig.suptitle("F1 against threshold on val (the model's probabilities, calibrated when enabled)")
    return _save(pr_fig, folder / "pr_curves.png"), _save(f1_fig, folder / "f1_vs_threshold.png")


def plot_frequency(counts: dict, labels: list[str], folder: Path) -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(labels) + 2), 3.5))
    width = 0.8 / len(counts)
    x = np.arange(len(labels))
    for k, (split, c) in enumerate(counts.items()):
        share = [c[name]["positive"] / max(c["images"], 1) for name in labels]
        ax.bar(x + k * width, share, width, label=f"{split} ({c['images']} images)")
    ax.set_xticks(x + width * (len(counts) - 1) / 2, labels, rotation=45, ha="right")
    ax.set_ylabel("share of images positive"), ax.legend(), ax.grid(axis="y", alpha=0.3)
    ax.set_title("label frequency per split")
    return _save(fig, folder / "label_frequency.png")


def _reliability(probs: np.ndarray, targets: np.ndarray, bins: int):
    known = targets >= 0
    p, t = probs[known], targets[known]
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_p = np.bincount(which, p, bins) / np.maximum(count, 1)
    mean_t = np.bincount(which, t, bins) / np.maximum(count, 1)
    return count, mean_p, mean_t


def plot_calibration(probs, targets, folder: Path, metrics: dict, labels: list[str],
                      raw_probs=None, bins: int = 10) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained",
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    left.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    curves = [("sigmoid of logits", raw_probs, "C1"), ("calibrated" if raw_probs is not None else "model", probs, "C0")]
    for name, values, color in curves:
        if values is None:
            continue
        count, mean_p, mean_t = _reliability(values, targets, bins)
        left.plot(mean_p[count > 0], mean_t[count > 0], "o-", color=color, label=name)
    left.set(xlabel="predicted probability (all labels pooled)", ylabel="observed positive rate",
             title="reliability on val", xlim=(0, 1), ylim=(0, 1))
    left.legend(fontsize=8), left.grid(alpha=0.3)
    split = "test" if "test" in metrics else "val"
    per = metrics[split]["per_label"]
    shown = labels[:MAX_LABELS_PLOTTED * 2]
    x = np.arange(len(shown))
    after = [per[n]["ece"] or 0.0 for n in shown]
    if "ece_uncalibrated" in per[shown[0]]:
        before = [per[n]["ece_uncalibrated"] or 0.0 for n in shown]
        right.bar(x - 0.2, before, 0.4, color="C1", label="sigmoid of logits")
        right.bar(x + 0.2, after, 0.4, color="C0", label="calibrated")
    else:
        right.bar(x, after, 0.6, color="C0", label="model")
    right.set_xticks(x, shown, rotation=45, ha="right")
    right.set(ylabel="expected calibration error", title=f"per-label ECE on {split} (lower is better)")
    right.legend(fontsize=8), right.grid(axis="y", alpha=0.3)
    return _save(fig, folder / "calibration.png")


MAX_LABELS_STRUCTURE = 20


def cooccurrence(present: np.ndarray) -> np.ndarray:
    """(L, L): images in which both labels are present; the diagonal counts each label."""
    present = present.astype(np.int64)
    return present.T @ present


def plot_structure(targets: np.ndarray, decisions: np.ndarray, labels: list[str], split: str, folder: Path) -> str:
    """Label structure on ``split``: co-occurrence of the true labels and of the predicted ones
    (images holding both, with the numbers; the diagonal counts each label), and labels per image,
    true against predicted. Past ``MAX_LABELS_STRUCTURE`` labels, the most frequent ones."""
    true = targets == 1
    order = np.argsort(-true.sum(0), kind="stable")[:MAX_LABELS_STRUCTURE]
    shown = [labels[j] for j in order]
    size = max(4.0, 0.45 * len(shown) + 2)
    fig, axes = plt.subplots(1, 3, figsize=(2 * size + 4, size), layout="constrained",
                             gridspec_kw={"width_ratios": [size, size, 4]})
    for ax, (name, present) in zip(axes, (("true labels", true), ("predicted labels", decisions))):
        both = cooccurrence(present[:, order])
        ax.imshow(both, cmap="Blues")
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right")
        ax.set_yticks(range(len(shown)), shown)
        if len(shown) <= 12:
            top = both.max() or 1
            for (i, j), value in np.ndenumerate(both):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * top else "black")
        ax.set_title(f"co-occurrence of {name} ({split})")
    per_image_true, per_image_pred = true.sum(1), decisions.sum(1)
    edges = np.arange(max(per_image_true.max(initial=0), per_image_pred.max(initial=0)) + 2) - 0.5
    axes[2].hist([per_image_true, per_image_pred], bins=edges, label=["true", "predicted"])
    axes[2].set(xlabel="labels per image", ylabel="images", title=f"labels per image ({split})")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(), axes[2].grid(axis="y", alpha=0.3)
    if len(shown) < len(labels):
        fig.suptitle(f"the {len(shown)} most frequent of {len(labels)} labels")
    return _save(fig, folder / "label_structure.png")
