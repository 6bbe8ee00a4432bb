"""``python -m mlabel.export MODEL_DIR --format onnx|torchscript [--out FILE]``.

The exported graph takes normalised images ``(batch, 3, size, size)`` (batch is dynamic) and
returns ``probs`` (sigmoid, calibrated when the model is) and ``mask`` (``probs >= thresholds``),
plus ``regression`` (values in the targets' units) for a multi-task model.
The model's ``mlabel.json`` (labels, thresholds, calibration, preprocessing) travels inside the
file: ONNX ``metadata_props["mlabel"]``, TorchScript ``extra_files["mlabel.json"]``. A parity check
against the PyTorch model runs right after export and prints the largest difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cli import guarded
from .io import atomic_path, check_output
from .models import MultiLabelClassifier, load, locate_model

__all__ = ["export_model", "check_parity", "main", "METADATA_KEY"]

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
            import onnx
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=["images"],
                output_names=["probs", "mask"] + (["regression"] if model.regression_names else []),
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False)
            proto = program.model_proto
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, meta
            with atomic_path(out) as tmp:
                onnx.save(proto, str(tmp))
        elif fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example)
            with atomic_path(out) as tmp:
                torch.jit.save(traced, str(tmp), _extra_files={"mlabel.json": meta})
        else:
            raise ValueError(f"unknown export format {fmt!r}; available: ['onnx', 'torchscript']")
    return out


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


@guarded
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlabel export",
                                     description="Export a saved model with its labels, thresholds and preprocessing.")
    parser.add_argument("model_dir", help="a model directory or a run directory")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--out", help="output file (default: MODEL_DIR/model.onnx or model.torchscript.pt)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickle-based weights file")
    args = parser.parse_args(argv)
    model_dir, _ = locate_model(args.model_dir)
    suffix = ".onnx" if args.format == "onnx" else ".torchscript.pt"
    out = Path(args.out) if args.out else model_dir / f"model{suffix}"
    check_output(out, export=True)  # never over the model's own files
    model = load(args.model_dir, trust_pickle=args.trust_pickle)
    try:
        export_model(model, out, args.format)
        diff, agree = check_parity(model, out, args.format)
    except ImportError as err:
        raise ValueError(f"{err.name or err} is missing; ONNX export needs: pip install 'mlabel[export]' "
                         "(onnx, onnxscript, onnxruntime)") from None
    runtime = "onnxruntime" if args.format == "onnx" else "torch.jit"
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB): outputs probs and mask for "
          f"{model.num_labels} labels, dynamic batch")
    print(f"parity with PyTorch ({runtime}, batch 3): max |prob diff| {diff:.2e}, masks "
          f"{'agree' if agree else 'DIFFER'} (goal < {PARITY_GOAL:g})")
    return 0 if diff < PARITY_GOAL and agree else 1


if __name__ == "__main__":
    sys.exit(main())
