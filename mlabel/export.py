"""``python -m mlabel.export MODEL_DIR --format onnx|torchscript [--out FILE]`` and
``--format timm|tagger --out DIR``.

The onnx and torchscript graph takes normalised images ``(batch, 3, size, size)`` (batch is dynamic) and
returns ``probs`` (sigmoid, calibrated when the model is) and ``mask`` (``probs >= thresholds``),
plus ``regression`` (values in the targets' units) for a multi-task model.
The model's ``mlabel.json`` (labels, thresholds, calibration, preprocessing) travels inside the
file: ONNX ``metadata_props["mlabel"]``, TorchScript ``extra_files["mlabel.json"]``. A parity check
against the PyTorch model runs right after export and prints the largest difference.

``--format timm`` writes the folder plain timm loads (``timm.create_model("local-dir:DIR",
pretrained=True)``): timm's own ``config.json`` (label names, the evaluation preprocessing as timm's
data config, and ``mlabel.json`` under ``"mlabel"``) and the network's ``model.safetensors``; it
returns the raw logits. ``--format tagger`` writes a WD14-style tagger folder: ``model.onnx``
(NHWC BGR pixels 0..255 in, calibrated probabilities out), ``selected_tags.csv`` and the per-tag
``thresholds.csv`` (see :func:`export_tagger`).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import ArgumentParser, guarded
from .errors import UserError
from .io import atomic_path, check_output, refuse_inside
from .models import MultiLabelClassifier, load, locate_model
from .preprocess import cache_side, normalisation

__all__ = ["export_model", "export_timm", "export_tagger", "check_parity", "check_timm_parity",
           "check_tagger_parity", "timm_data_config", "timm_refusal", "main", "METADATA_KEY"]

METADATA_KEY = "mlabel"
PARITY_GOAL = 1e-4


class _Exported(nn.Module):
    """Images -> the model's decision (calibrated probabilities and the thresholded mask), and the
    regression values of a multi-task model, inside the graph."""

    def __init__(self, model: MultiLabelClassifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        out = self.model.outputs(images)
        probs, mask = self.model.decision(out.logits)
        if out.regression is None:
            return probs, mask
        return probs, mask, self.model.regression_values(out.regression)


def _example(model: MultiLabelClassifier, batch: int, seed: int = 0) -> torch.Tensor:
    size = int(model.preprocessing["image_size"])
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_model(model: MultiLabelClassifier, out: str | Path, fmt: str = "onnx") -> Path:
    """Write ``model`` as ONNX or TorchScript to ``out`` (atomically) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Exported(model.cpu().eval()).eval()
    meta = json.dumps(model.describe())
    example = _example(model, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; failures still raise
        if fmt == "onnx":
            _save_onnx(wrapper, example, out, "images",
                       ["probs", "mask"] + (["regression"] if model.regression_names else []), meta)
        elif fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example)
            with atomic_path(out) as tmp:
                torch.jit.save(traced, str(tmp), _extra_files={"mlabel.json": meta})
        else:
            raise ValueError(f"unknown export format {fmt!r}; available: ['onnx', 'torchscript']")
    return out


def _save_onnx(module: nn.Module, example: torch.Tensor, out: Path, input_name: str, output_names: list[str],
               meta: str) -> None:
    """``module`` as ONNX at ``out`` (atomically), batch dimension dynamic, ``meta`` in its
    ``metadata_props["mlabel"]``."""
    import onnx
    program = torch.onnx.export(
        module, (example,), dynamo=True, input_names=[input_name], output_names=output_names,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def check_parity(model: MultiLabelClassifier, path: Path, fmt: str, batch: int = 3) -> tuple[float, bool]:
    """Largest |prob difference| between the export and ``model`` on a batch of a size the
    export never saw (the batch size is dynamic), and whether the masks agree."""
    images = _example(model, batch, seed=1)
    expected = model.cpu().eval().predict_proba(images)
    expected_mask = expected >= model.thresholds
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs, mask = session.run(["probs", "mask"], {"images": images.numpy()})
    else:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            probs, mask = (t.numpy() for t in torch.jit.load(str(path))(images)[:2])
    diff = float(np.abs(probs - expected.numpy()).max())
    # A probability within float noise of its threshold may flip; all others must agree.
    near = np.abs(expected.numpy() - model.thresholds.numpy()) < 1e-5
    agree = bool(((mask == expected_mask.numpy()) | near).all())
    return diff, agree


# --------------------------------------------------------------------------- folders

@contextlib.contextmanager
def _new_folder(out: Path):
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds; ``out``
    must be new or empty, and is untouched when the block fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        mask = os.umask(0o022)
        os.umask(mask)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and some writers make 0700 / 0600: give open()'s modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it became ``out``


# --------------------------------------------------------------------------- plain timm

TIMM_WEIGHTS = "model.safetensors"  # what timm's local-dir loader looks for first


def timm_refusal(model: MultiLabelClassifier) -> str | None:
    """Why timm's network cannot be this model, or None."""
    if model.head_name != "linear":
        return (f"the {model.head_name} head has no equivalent in timm, whose classifier is one linear layer on "
                "the pooled features: export --format onnx or torchscript, or train with model.head=linear")
    if model.regression_names:
        return (f"timm's network has one classifier; the regression outputs {model.regression_names} would be "
                "lost: export --format onnx or torchscript")
    return None


def timm_data_config(preprocessing: dict) -> dict:
    """mlabel's evaluation preprocessing as timm's data config (``resolve_data_config`` keys):
    ``squish`` is timm's ``squash`` at crop 1; ``crop`` is ``center`` with the crop fraction at
    which timm's ``floor(size / crop_pct)`` is mlabel's resized side."""
    size = int(preprocessing["image_size"])
    squash = preprocessing.get("resize", "crop") == "squish"
    side = cache_side(preprocessing)  # rounded by mlabel; timm floors, so aim just below size / side
    crop_pct = 1.0 if squash else size / side
    while math.floor(size / crop_pct) < side:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {"input_size": (3, size, size), "interpolation": str(preprocessing.get("interpolation", "bilinear")),
            "mean": tuple(float(v) for v in preprocessing["mean"]),
            "std": tuple(float(v) for v in preprocessing["std"]),
            "crop_pct": crop_pct, "crop_mode": "squash" if squash else "center"}


def timm_network(model: MultiLabelClassifier) -> nn.Module:
    """``model`` as one plain timm network: its backbone's weights, and the linear head in timm's
    own classifier (``num_classes`` = the labels). Refused (ValueError) for a head timm lacks."""
    import timm
    problem = timm_refusal(model)
    if problem:
        raise ValueError(f"--format timm: {problem}")
    net = timm.create_model(model.backbone_name, pretrained=False, num_classes=model.num_labels)
    classifier = net.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"--format timm: {model.backbone_name}'s timm classifier is {type(classifier).__name__}, "
                         "not one linear layer: export --format onnx or torchscript")
    where = next(name for name, module in net.named_modules() if module is classifier)
    state = {**model.backbone.state_dict(), f"{where}.weight": model.head.weight.detach(),
             f"{where}.bias": model.head.bias.detach()}
    try:
        net.load_state_dict(state)  # strict: every tensor has exactly one place
    except RuntimeError as err:
        raise ValueError(f"--format timm: timm's {model.backbone_name} with {model.num_labels} classes does not take "
                         f"this model's weights ({str(err).splitlines()[0]}): export --format onnx or torchscript") from None
    return net.eval()


def export_timm(model: MultiLabelClassifier, out: str | Path, weights_name: str = TIMM_WEIGHTS) -> Path:
    """Write the folder plain timm loads: timm's ``config.json`` (architecture, ``num_classes``,
    ``label_names``, :func:`timm_data_config` in ``pretrained_cfg``, and the model's
    ``mlabel.json`` under ``"mlabel"``: thresholds and calibration) and the weights. ``out`` must
    be new or empty; it is written whole or not at all. ``weights_name`` other than
    ``model.safetensors`` (a Hub repository that holds mlabel's own weights under that name) is
    named in ``pretrained_cfg["hf_hub_filename"]``, which timm's ``hf-hub:`` loader follows."""
    from timm.models import save_for_hf
    net = timm_network(model.cpu().eval())
    overrides = {"tag": "mlabel", **({} if weights_name == TIMM_WEIGHTS else {"hf_hub_filename": weights_name})}
    with _new_folder(Path(out)) as tmp:
        save_for_hf(net, str(tmp), model_config={"label_names": list(model.labels), "mlabel": model.describe(),
                                                 "pretrained_cfg": overrides},
                    safe_serialization=True, data_config=timm_data_config(model.preprocessing))
        config = json.loads((tmp / "config.json").read_text())
        config["pretrained_cfg"].pop("license", None)  # the backbone's source licence says nothing of this model
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if weights_name != TIMM_WEIGHTS:
            (tmp / TIMM_WEIGHTS).rename(tmp / weights_name)
    return Path(out)


def check_timm_parity(model: MultiLabelClassifier, folder: Path, batch: int = 3) -> float:
    """Largest |logit difference| between ``timm.create_model("local-dir:FOLDER")`` and ``model``."""
    import timm
    net = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    images = _example(model, batch, seed=1)
    with torch.no_grad():
        return float((net(images) - model.cpu().eval()(images)).abs().max())


# --------------------------------------------------------------------------- WD14-style tagger folder

TAGS_FILE, THRESHOLDS_FILE, TAGGER_MODEL = "selected_tags.csv", "thresholds.csv", "model.onnx"
GENERAL = 0  # the tag category the WD14 readers treat as general tags (9: rating, 4: character)


class _Tagger(nn.Module):
    """What the WD14-style readers feed -> what they read: (N, side, side, 3) float32 pixels in
    BGR order, 0..255 (padded to a square and resized by the reader) -> calibrated probabilities
    (N, L). ``side`` is the square mlabel resizes to before its centre crop (the input size for
    ``squish``), and the crop happens in the graph; normalisation is mlabel's own float32
    ``(x - mean) * scale``. So a square image at ``side`` gives ``model.predict_proba``'s values."""

    def __init__(self, model: MultiLabelClassifier):
        super().__init__()
        self.model = model
        self.side, size = cache_side(model.preprocessing), int(model.preprocessing["image_size"])
        self.crop = slice((self.side - size) // 2, (self.side - size) // 2 + size)  # as resize_for_eval
        mean, scale = normalisation(model.preprocessing)
        self.register_buffer("mean", torch.from_numpy(mean).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.from_numpy(scale).reshape(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        rgb = pixels[:, self.crop, self.crop][..., [2, 1, 0]].permute(0, 3, 1, 2)
        return self.model.probabilities(self.model((rgb - self.mean) * self.scale))


def _train_positives(run_dir: Path | None, labels: list[str]) -> list[int]:
    """Each label's training positives from the run's ``run.json`` (the CSV's ``count``), 0 unknown."""
    try:
        counts = json.loads((run_dir / "run.json").read_text())["label_counts"]["train"] if run_dir else {}
    except (OSError, ValueError, KeyError, TypeError):
        counts = {}
    return [int(c["positive"]) if isinstance(c := counts.get(name), dict) and isinstance(c.get("positive"), int)
            else 0 for name in labels]


def export_tagger(model: MultiLabelClassifier, out: str | Path, run_dir: Path | None = None) -> Path:
    """Write a WD14-style tagger folder, as the public readers (the SmilingWolf wd-tagger Space and
    the tools that copy it) read one: ``model.onnx`` whose first input is (batch, side, side, 3)
    BGR pixels 0..255 (batch dynamic; ``side`` the square before mlabel's centre crop, which the
    graph does) and first output the probabilities; ``selected_tags.csv``
    (``tag_id,name,category,count``; every label a general tag, category 0, ``count`` its training
    positives when the run says); and ``thresholds.csv`` (``tag_id,name,threshold``: a tag is
    present when its probability is at or above its threshold). The readers take one threshold
    for all general tags; the per-tag ones are a file of their own so that the tags file keeps
    exactly the columns they check, and a reader that knows nothing of them is unaffected."""
    model = model.cpu().eval()
    tagger = _Tagger(model).eval()
    shape = (2, tagger.side, tagger.side, 3)
    example = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float()
    counts = _train_positives(run_dir, model.labels)
    with _new_folder(Path(out)) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter; failures still raise
        _save_onnx(tagger, example, tmp / TAGGER_MODEL, "input", ["probs"], json.dumps(model.describe()))
        with (tmp / TAGS_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["tag_id", "name", "category", "count"])
            writer.writerows([i, name, GENERAL, count] for i, (name, count) in enumerate(zip(model.labels, counts)))
        with (tmp / THRESHOLDS_FILE).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["tag_id", "name", "threshold"])
            # repr of the float32 threshold as a double: read back, it compares exactly as mlabel's does
            thresholds = model.thresholds.tolist()
            writer.writerows([i, name, repr(float(t))] for i, (name, t) in enumerate(zip(model.labels, thresholds)))
    return Path(out)


def check_tagger_parity(model: MultiLabelClassifier, folder: Path, batch: int = 3) -> tuple[float, bool]:
    """Largest |prob difference| between the folder's ``model.onnx`` fed as the readers feed it and
    ``model.predict_proba`` on the same RGB pixels, and whether the decisions agree."""
    import onnxruntime as ort
    side = cache_side(model.preprocessing)
    rgb = np.random.default_rng(1).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(Path(folder) / TAGGER_MODEL), providers=["CPUExecutionProvider"])
    probs = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(rgb[..., ::-1], dtype=np.float32)})[0]
    expected = model.cpu().eval().predict_proba(list(rgb)).numpy()
    thresholds = model.thresholds.numpy()
    near = np.abs(expected - thresholds) < 1e-5
    agree = bool((((probs >= thresholds) == (expected >= thresholds)) | near).all())
    return float(np.abs(probs - expected).max()), agree


# --------------------------------------------------------------------------- command

FOLDER_FORMATS = ("timm", "tagger")


@guarded
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="mlabel export",
                                     description="Export a saved model with its labels, thresholds and preprocessing.")
    parser.add_argument("model_dir", help="a model directory or a run directory")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript", *FOLDER_FORMATS],
                        help="onnx / torchscript: one file; timm: a folder timm.create_model('local-dir:DIR') loads; "
                             "tagger: a WD14-style folder (model.onnx, selected_tags.csv, thresholds.csv)")
    parser.add_argument("--out", help="output file (default: MODEL_DIR/model.onnx or model.torchscript.pt); "
                                      "for timm and tagger a new folder (required)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickle-based weights file")
    args = parser.parse_args(argv)
    model_dir, run_dir = locate_model(args.model_dir)
    if args.format in FOLDER_FORMATS:
        if not args.out:
            raise UserError(f"--format {args.format} writes a folder: give it with --out DIR")
        _refuse_data_folder(Path(args.out), run_dir)
        return _export_folder(load(args.model_dir, trust_pickle=args.trust_pickle), Path(args.out), args.format, run_dir)
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    out = Path(args.out) if args.out else model_dir / f"model{suffix}"
    check_output(out, export=True)  # never over the model's own files
    if (args.format == "onnx") != out.name.lower().endswith(".onnx"):
        raise UserError(f"--out {out}: --format {args.format} writes "
                        + ("an .onnx file: end the name with .onnx" if args.format == "onnx" else
                           "a TorchScript file, not ONNX: end the name with .torchscript.pt, or add --format onnx"))
    _refuse_data_folder(out, run_dir)
    model = load(args.model_dir, trust_pickle=args.trust_pickle)
    try:
        export_model(model, out, args.format)
        diff, agree = check_parity(model, out, args.format)
    except ImportError as err:
        raise _missing(err) from None
    runtime = "onnxruntime" if args.format == "onnx" else "torch.jit"
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB): outputs probs and mask for "
          f"{model.num_labels} labels, dynamic batch")
    print(f"parity with PyTorch ({runtime}, batch 3): max |prob diff| {diff:.2e}, masks "
          f"{'agree' if agree else 'DIFFER'} (goal < {PARITY_GOAL:g})")
    return 0 if diff < PARITY_GOAL and agree else 1


def _refuse_data_folder(out: Path, run_dir: Path | None) -> None:
    """An export never goes into the data folder of the run's recipe."""
    from .rundir import run_data_folder
    folder = run_data_folder(run_dir)
    refuse_inside(out, [folder] if folder is not None else [], "mlabel never writes into a data folder: export elsewhere")


def _missing(err: ImportError) -> UserError:
    return UserError(f"{err.name or err} is missing; ONNX export needs: pip install 'mlabel[export]' "
                     "(onnx, onnxscript, onnxruntime)")


def _export_folder(model: MultiLabelClassifier, out: Path, fmt: str, run_dir: Path | None) -> int:
    """``--format timm`` or ``tagger``: write the folder, check it, say where it went."""
    if fmt == "timm":
        export_timm(model, out)
        diff = check_timm_parity(model, out)
        print(f"exported {out}: config.json + {TIMM_WEIGHTS} for timm.create_model('local-dir:{out}', "
              f"pretrained=True), {model.num_labels} classes; thresholds and calibration in config.json['mlabel']")
        print(f"parity with mlabel (timm local-dir, batch 3): max |logit diff| {diff:.2e} (goal < {PARITY_GOAL:g})")
        return 0 if diff < PARITY_GOAL else 1
    try:
        export_tagger(model, out, run_dir)
        diff, agree = check_tagger_parity(model, out)
    except ImportError as err:
        raise _missing(err) from None
    print(f"exported {out}: {TAGGER_MODEL} (NHWC BGR 0..255 in, probabilities out, dynamic batch), {TAGS_FILE} "
          f"({model.num_labels} general tags) and {THRESHOLDS_FILE} (per-tag thresholds)")
    print(f"parity with mlabel (onnxruntime, batch 3): max |prob diff| {diff:.2e}, decisions "
          f"{'agree' if agree else 'DIFFER'} (goal < {PARITY_GOAL:g})")
    return 0 if diff < PARITY_GOAL and agree else 1


if __name__ == "__main__":
    sys.exit(main())
