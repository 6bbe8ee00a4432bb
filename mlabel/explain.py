"""Per-label heat maps: where the model looked when it scored a label.

Methods, picked per model by ``method="auto"``:

- ``cam``: the class activation map, exact for a linear head over a backbone that average-pools
  its last feature map: the label's logit is the mean over locations of ``w_l . x(loc)`` plus its
  bias, so ``w_l . x(loc)`` is that logit's share at each location. One forward pass, no
  gradients, every label at once. Refused (with the reason) where the pooling is not that mean
  (a ViT's class token, a norm after pooling): the map would not decompose the logit.
- ``csra``: the CSRA head's own per-location class scores (its attention is a softmax of them).
- ``gradcam`` / ``hirescam``: Grad-CAM (the feature map weighted by the spatial mean of the
  label's gradient) and HiResCAM (the gradient times the feature map, location by location),
  rectified, on the backbone's final feature map: the output of ``forward_features`` (a
  transformer's tokens reshaped to their grid, prefix tokens dropped). Written here, not taken
  from the ``grad-cam`` package: the gradient is taken with respect to that feature map only, so
  the backward pass stops there (the package's backward reaches every weight and the input:
  measured 5.5x a forward pass against 1.1x); the maps are the package's (tested).
- ``gradcam++``: from the maintained ``grad-cam`` package (``pip install 'mlabel[explain]'``) on
  the same feature map.
- ``auto``: ``csra`` for that head; for a transformer, ``gradcam``; for a CNN, ``hirescam`` at
  the deepest stage of stride 16 or less (timm's ``feature_info``), on the image upsampled so that
  stage's map has at least 6 cells a side. Not the exact ``cam``: a small input's last map is
  too coarse to say where (the quickstart's 64 px scenes give a 2 x 2 map whose maximum fell in
  the labelled shape for 1 % of true positives; this ``auto`` for 92 %, benchmarks/explain.py).

Maps are upsampled to the input resolution and scaled to [0, 1] per map. The model is put in
eval mode and its weights are not touched; no hook outlives the call.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Explanation", "explain", "input_view", "overlay", "write_explanations", "METHODS"]

METHODS = ("auto", "cam", "csra", "gradcam", "hirescam", "gradcam++")
_OWN_GRADIENTS = ("gradcam", "hirescam")
_MIN_CELLS = 6  # auto: the explained map has at least this many cells a side (see the module doc)


@dataclass
class Explanation:
    """Per image ``i``: ``labels[i]`` (the labels explained), ``maps[i]`` (K, H, W) float32 in
    [0, 1] at the input resolution, ``probabilities[i]`` (K,), and the method used."""
    labels: list[list[str]]
    maps: list[np.ndarray]
    probabilities: list[np.ndarray]
    method: str
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def map(self, image: int, label: str) -> np.ndarray:
        """The (H, W) map of ``label`` for image ``image``."""
        names = self.labels[image]
        if label not in names:
            raise KeyError(f"image {image} has no map for {label!r}; it has {names}")
        return self.maps[image][names.index(label)]


def overlay(image, heat: np.ndarray, alpha: float = 0.5):
    """A PIL image: ``image`` (PIL, or an (H, W, 3) uint8 array) under ``heat`` ((h, w) in [0, 1],
    resized to the image) in a blue-to-red colour map at opacity ``alpha``."""
    from PIL import Image
    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    base = base.convert("RGB")
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0, 1)
    resized = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(base.size, Image.BILINEAR)) / 255.0
    colour = np.stack([resized, 1 - np.abs(2 * resized - 1), 1 - resized], axis=-1)  # jet-like: blue, green, red
    mixed = (1 - alpha) * np.asarray(base, dtype=np.float32) / 255.0 + alpha * colour
    return Image.fromarray((np.clip(mixed, 0, 1) * 255).round().astype(np.uint8))


# --------------------------------------------------------------------------- maps on the feature grid

def _grid(model, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, C, h, w) from ``forward_features``' output: a CNN's map, or a transformer's patch
    tokens (prefix tokens dropped) laid out on their grid."""
    if features.ndim == 4:
        if str(getattr(model.backbone, "output_fmt", "NCHW")) == "NHWC":
            features = features.permute(0, 3, 1, 2)
        return features, tuple(features.shape[2:])
    tokens = features[:, getattr(model.backbone, "num_prefix_tokens", 0):]
    grid = getattr(getattr(model.backbone, "patch_embed", None), "grid_size", None)
    count = tokens.shape[1]
    if grid is None or grid[0] * grid[1] != count:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"backbone {model.backbone_name}: {count} tokens do not form a square grid; "
                             "explanations need its feature map: pass method='gradcam' with a layer= that has one")
        grid = (side, side)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid), tuple(grid)


def _exact_pooling(model, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor | None:
    """The head's input when it is the mean of the feature map (so ``w . x(loc)`` decomposes the
    logit), else None."""
    if type(model.head).__name__ != "LinearHead":
        return None
    pooled = model.backbone.forward_head(features, pre_logits=True)
    mean = grid.mean((2, 3))
    return pooled if pooled.shape == mean.shape and torch.allclose(pooled, mean, atol=1e-5, rtol=1e-4) else None


def _cam(model, images: torch.Tensor) -> torch.Tensor:
    """(N, L, h, w): each label's share of its logit at each location (linear head, mean pooling)."""
    return _maps_and_probs(model, images, "cam")[1]


def _maps_and_probs(model, images: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, L), maps (N, L, h, w)) of ``cam`` or ``csra`` from one forward pass."""
    features = model.backbone.forward_features(images)
    grid, _ = _grid(model, features)
    if method == "csra":
        head = model.head
        logits = head(grid.flatten(2))
        maps = torch.einsum("nchw,lc->nlhw", grid, head.weight) / head.weight.norm(dim=1)[None, :, None, None]
        return model.probabilities(logits), maps
    pooled = _exact_pooling(model, features, grid)
    if pooled is None:
        raise ValueError(f"method 'cam' is exact only for the linear head over a backbone that averages its "
                         f"feature map; {model.backbone_name} with head {model.head_name} does not: use "
                         "method='gradcam' (or 'auto')")
    return model.probabilities(model.head(pooled)), torch.einsum("nchw,lc->nlhw", grid, model.head.weight)


@dataclass(frozen=True)
class Site:
    """Where a gradient method reads the network: the output of the backbone's ``module`` (None:
    the final feature map, ``forward_features``' output) for the image resized to ``size``."""
    module: str | None
    size: tuple[int, int]


def _site(model, images: torch.Tensor, method: str, tokens: bool) -> Site:
    """Where the gradient methods read the network.

    A transformer (``tokens``): the last block's input, whatever the method (its class token is
    pooled after the last block has mixed the patches into it: at the final tokens a patch's
    gradient is zero). A CNN: the final feature map for the named methods; for ``auto``, the
    deepest stage of stride <= 16 (a 64 px image's last map has 2 x 2 cells: too coarse to say
    where) on the image upsampled until that map has ``_MIN_CELLS`` a side."""
    size = tuple(images.shape[2:])
    stages = [f for f in getattr(model.backbone, "feature_info", None) or [] if isinstance(f, dict)]
    if tokens:
        return Site(stages[-2]["module"] if len(stages) > 1 else None, size)
    fine = [f for f in stages if f["reduction"] <= 16]
    if method != "auto" or not fine or stages[-1]["reduction"] <= 16:
        return Site(None, size)
    scale = max(1.0, _MIN_CELLS * fine[-1]["reduction"] / min(size))
    return Site(fine[-1]["module"], tuple(int(round(side * scale)) for side in size))


class _Forward(nn.Module):
    """The model's logits with ``forward_features``' output passing through ``features`` (an
    identity): the layer the gradient methods attach to, the same for every timm backbone."""

    def __init__(self, model):
        super().__init__()
        self.model, self.features = model, nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        features = self.features(model.backbone.forward_features(images))
        if getattr(model.head, "feature_map", False):
            grid, _ = _grid(model, features)
            return model.head(grid.flatten(2))
        return model.head(model.backbone.forward_head(features, pre_logits=True))


def _weighted(model, activation: torch.Tensor, grad: torch.Tensor, method: str) -> torch.Tensor:
    """(N, h, w) rectified map from a layer's output and the label's gradient there (tokens laid
    out on their grid): Grad-CAM weighs each channel by its mean gradient, HiResCAM each location."""
    activation, grad = _grid(model, activation)[0], _grid(model, grad)[0]
    if method == "gradcam":
        return (grad.mean((2, 3), keepdim=True) * activation).sum(1).clamp_min(0)
    return (grad * activation).sum(1).clamp_min(0)


def _layer(forward: _Forward, site: Site) -> nn.Module:
    return forward.features if site.module is None else forward.model.backbone.get_submodule(site.module)


def _record(model, images: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, L), the explained layer's output) from one forward pass on the images resized
    to ``site.size``. Only the layers after the explained one record a graph: the pass runs
    without autograd up to that layer, whose output restarts it (a leaf). No hook outlives it."""
    forward = _Forward(model)
    layer = _layer(forward, site)
    if site.size != tuple(images.shape[2:]):
        images = F.interpolate(images, size=site.size, mode="bilinear", align_corners=False)
    captured = []

    def restart(module, args, output):
        torch.set_grad_enabled(True)  # undone when the no_grad block below exits
        captured.append(output.detach().requires_grad_())
        return captured[-1]

    handle = layer.register_forward_hook(restart)
    try:
        with torch.no_grad():
            logits = forward(images)
    finally:
        handle.remove()
    return logits, captured[-1]


def _own_gradient_maps(model, recorded: tuple, wanted: list[list[int]], method: str) -> list[torch.Tensor]:
    """Per image, (K, h, w) maps of its wanted labels from ``recorded`` (see :func:`_record`): one
    backward pass per rank of label, the k-th wanted label of every image at once (in eval mode
    the images do not interact, so the sum's gradient at image i is its own label's). The backward
    pass stops at the layer explained: no weight or input gradient is computed."""
    logits, activation = recorded
    maps: list[list[torch.Tensor]] = [[] for _ in wanted]
    ranks = max((len(labels) for labels in wanted), default=0)
    for k in range(ranks):
        rows = [i for i, labels in enumerate(wanted) if len(labels) > k]
        chosen = logits[rows, [wanted[i][k] for i in rows]].sum()
        grad, = torch.autograd.grad(chosen, activation, retain_graph=k + 1 < ranks)
        for i, heat in zip(rows, _weighted(model, activation[rows].detach(), grad[rows], method)):
            maps[i].append(heat)
    return [torch.stack(m) if m else torch.zeros(0, 1, 1) for m in maps]


def _package_gradient_maps(model, images: torch.Tensor, wanted: list[list[int]], site: Site) -> list[torch.Tensor]:
    """Per image, (K, h, w) Grad-CAM++ maps of its wanted labels from the ``grad-cam`` package."""
    try:
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ImportError("method 'gradcam++' needs the grad-cam package: pip install 'mlabel[explain]'",
                          name="grad-cam") from None
    forward = _Forward(model)

    def reshape(tensor):  # (N, T, C) tokens -> (N, C, h, w)
        return _grid(model, tensor)[0] if tensor.ndim == 3 else tensor

    found: dict[tuple[int, int], np.ndarray] = {}
    with GradCAMPlusPlus(model=forward, target_layers=[_layer(forward, site)], reshape_transform=reshape) as cam:
        for label in sorted({j for labels in wanted for j in labels}):  # one batch per label
            rows = [i for i, labels in enumerate(wanted) if label in labels]
            maps = cam(input_tensor=images[rows], targets=[ClassifierOutputTarget(label)] * len(rows))
            found.update({(i, label): m for i, m in zip(rows, maps)})
    return [torch.from_numpy(np.stack([found[i, j] for j in labels])) if labels else torch.zeros(0, *images.shape[2:])
            for i, labels in enumerate(wanted)]


def _scaled(maps: list[torch.Tensor], size: tuple[int, int]) -> list[np.ndarray]:
    """Per image, (K, h, w) -> (K, H, W) float32, each map scaled to [0, 1] (a flat map is all
    zeros). Maps of one grid are resized in one call, not image by image."""
    counts = [len(m) for m in maps]
    shapes = {tuple(m.shape[1:]) for m in maps if len(m)}
    if not shapes:
        return [np.zeros((0, *size), np.float32) for _ in maps]
    if len(shapes) > 1:  # grids of different sizes (not from one call): one image at a time
        return [_scaled([m], size)[0] for m in maps]
    every = torch.cat([m for m in maps if len(m)]).float()
    if tuple(every.shape[1:]) != tuple(size):
        every = F.interpolate(every[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    low = every.flatten(1).min(1).values[:, None, None]
    span = every.flatten(1).max(1).values[:, None, None] - low
    every = torch.where(span > 0, (every - low) / span.clamp_min(1e-12), torch.zeros_like(every)).numpy()
    return list(np.split(every.astype(np.float32, copy=False), np.cumsum(counts)[:-1]))


def _choose(model, method: str, tokens: bool) -> str:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ValueError(f"unknown explanation method {method!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; one of {list(METHODS)}")
    if method == "csra" and model.head_name != "csra":
        raise ValueError(f"method 'csra' needs the csra head; this model's head is {model.head_name}")
    if method != "auto":
        return method
    if model.head_name == "csra":
        return "csra"
    return "gradcam" if tokens else "hirescam"


def _wanted(model, probs: torch.Tensor, labels) -> list[list[int]]:
    """Per image, the label indices to explain: the named ones, or those predicted positive."""
    if labels is None:
        keep = probs >= model.thresholds.to(probs.device)
        return [torch.nonzero(row).flatten().tolist() for row in keep]
    names = [labels] if isinstance(labels, str) else list(labels)
    unknown = [n for n in names if n not in model.labels]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), model.labels, n=1)
        raise ValueError(f"label {unknown[0]!r} is not one of the model's labels" +
                         (f" (did you mean {close[0]!r}?)" if close else "") + f"; it has {model.labels}")
    index = [model.labels.index(n) for n in names]
    return [list(index) for _ in range(len(probs))]


def explain(model, images: torch.Tensor, labels=None, method: str = "auto") -> Explanation:
    """Heat maps of ``model`` for ``images`` (N, 3, H, W), preprocessed as for :meth:`predict_proba`.

    Args:
        labels: label names to explain for every image (a name or a list); None: for each image,
            the labels it is predicted positive for at the saved thresholds.
        method: ``auto`` (``csra`` for that head, ``gradcam`` for a transformer, else ``hirescam``
            at a finer stage: see the module doc), ``cam``, ``csra``, ``gradcam``, ``hirescam``
            or ``gradcam++``.

    Returns:
        An :class:`Explanation`; its ``extra`` names the layer a gradient method read and the
        input size it ran at (``auto`` may upsample the image; the probabilities are the model's
        at its own size).
    """
    was_training = model.training
    grads = [(p, p.grad) for p in model.parameters()]  # the package's backward passes leave none behind
    if was_training:  # (train(False) walks every module: skipped when there is nothing to change)
        model.eval()
    try:
        chosen, probs, wanted, maps, extra = _explained(model, images, labels, method)
        probs = probs.cpu()
        return Explanation(labels=[[model.labels[j] for j in idx] for idx in wanted],
                           maps=_scaled([m.detach().cpu() for m in maps], tuple(images.shape[2:])),
                           probabilities=[probs[i, idx].numpy() for i, idx in enumerate(wanted)],
                           method=chosen, extra=extra)
    finally:
        if was_training:
            model.train()
        for param, grad in grads:
            param.grad = grad


def _explained(model, images: torch.Tensor, labels, method: str) -> tuple[str, torch.Tensor, list, list, dict]:
    """(the method used, probabilities (N, L), per image its wanted label indices and their
    (K, h, w) maps, extra: the layer read and the input size)."""
    with torch.no_grad():
        if method in ("cam", "csra") or (method == "auto" and model.head_name == "csra"):
            chosen = _choose(model, method, tokens=False)
            probs, full = _maps_and_probs(model, images, chosen)  # one pass: every label's map
            wanted = _wanted(model, probs, labels)
            return chosen, probs, wanted, [full[i, idx] for i, idx in enumerate(wanted)], {}
        tokens = model.backbone.forward_features(images[:1]).ndim == 3
    chosen = _choose(model, method, tokens)
    site = _site(model, images, method, tokens)
    extra = {"layer": site.module or "forward_features", "input_size": list(site.size)}
    recorded = _record(model, images, site) if chosen in _OWN_GRADIENTS else None
    if recorded is not None and site.size == tuple(images.shape[2:]):  # the model's own pass
        probs = model.probabilities(recorded[0].detach())
    else:
        with torch.no_grad():
            probs = model.predict_proba(images)
    wanted = _wanted(model, probs, labels)
    if recorded is None:
        return chosen, probs, wanted, _package_gradient_maps(model, images, wanted, site), extra
    return chosen, probs, wanted, _own_gradient_maps(model, recorded, wanted, chosen), extra


def _unique_names(texts: list[str], limit: int) -> list[str]:
    """A file-name-safe name per text, unique among them (``-2``, ``-3`` ... on a clash)."""
    seen: dict[str, int] = {}
    names = []
    for text in texts:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].strip(".") or "x"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def input_view(image: torch.Tensor, preprocessing: dict) -> np.ndarray:
    """The pixels the model saw, (H, W, 3) uint8: its input tensor without the normalisation."""
    mean = torch.tensor(preprocessing["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(3, 1, 1)
    return ((image.cpu().float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def write_explanations(model, paths: list[str], labels: list[list[str]], out, method: str = "auto",
                       device=None, batch_size: int = 8) -> int:
    """``out/IMAGE__LABEL.png`` (the map over the pixels the model saw) for each image and each of
    its ``labels``, and ``out/maps.npz`` (``paths``, ``labels``, ``image``: the image of each map,
    ``maps`` (K, H, W) float32, ``probabilities``; no pickles). Every file is written whole or not
    at all (a temporary file renamed). Returns the number of overlays."""
    import io as _io
    from pathlib import Path

    from .io import atomic_path
    from .preprocess import preprocess_image
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    stems = _unique_names([Path(p).stem for p in paths], 100)
    files = dict(zip(model.labels, _unique_names(model.labels, 60)))
    count = 0
    kept = {"labels": [], "image": [], "maps": [], "probabilities": []}
    for start in range(0, len(paths), batch_size):
        chunk = range(start, min(start + batch_size, len(paths)))
        images = torch.from_numpy(np.stack([preprocess_image(paths[i], model.preprocessing) for i in chunk])).to(device)
        for k, i in enumerate(chunk):
            if not labels[i]:
                continue
            got = explain(model, images[k:k + 1], labels=labels[i], method=method)
            view = input_view(images[k], model.preprocessing)
            for j, name in enumerate(got.labels[0]):
                with atomic_path(out / f"{stems[i]}__{files[name]}.png") as tmp:
                    overlay(view, got.maps[0][j]).save(tmp, format="PNG")
                kept["labels"].append(name)
                kept["image"].append(i)
                kept["maps"].append(got.maps[0][j])
                kept["probabilities"].append(float(got.probabilities[0][j]))
                count += 1
    size = tuple(model.preprocessing["image_size"] for _ in range(2))
    buffer = _io.BytesIO()
    np.savez_compressed(buffer, paths=np.array(paths, dtype=str), labels=np.array(kept["labels"], dtype=str),
                        image=np.array(kept["image"], dtype=np.int64),
                        maps=np.stack(kept["maps"]) if kept["maps"] else np.zeros((0, *size), np.float32),
                        probabilities=np.array(kept["probabilities"], dtype=np.float32))
    with atomic_path(out / "maps.npz") as tmp:
        tmp.write_bytes(buffer.getvalue())
    return count
