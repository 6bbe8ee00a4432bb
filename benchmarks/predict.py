"""Prediction throughput: ``mlabel.predict`` (batched, decoding threads one batch ahead) against a
plain loop that predicts one image at a time with the same model and preprocessing.

    python benchmarks/predict.py [--images 192] [--backbone tf_efficientnet_lite0] [--size 224]

Images are generated 500x375 JPEGs (a typical photo size); weights are random (speed does not
depend on them). Also times the exported ONNX model under onnxruntime when it is installed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mlabel
from _images import noise_jpegs
from mlabel.predict import load_backend, predict_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: mlabel.predict's")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        paths = noise_jpegs(tmp, args.images, 375, 500, rng)
        model = mlabel.create_model(args.backbone, ["a", "b", "c", "d", "e"], image_size=args.size)
        model_dir = model.save_pretrained(tmp / "model")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"{args.images} JPEGs 500x375, {args.backbone} at {args.size}px, {device}, "
              f"{torch.get_num_threads()} torch threads")

        loaded = mlabel.load(model_dir).to(device)
        loaded.predict_proba(paths[0])  # warm-up
        start = time.perf_counter()
        for path in paths:
            loaded.predict_proba(path)
        loop = args.images / (time.perf_counter() - start)

        def rate(backend) -> float:
            list(predict_paths(backend, paths[:8], batch_size=args.batch_size, quiet=True))
            start = time.perf_counter()
            rows = list(predict_paths(backend, paths, batch_size=args.batch_size, workers=args.workers, quiet=True))
            assert all(probs is not None for _, probs, _ in rows)
            return args.images / (time.perf_counter() - start)

        batched = rate(load_backend(str(model_dir), device))
        print(f"{'method':<52}{'img/s':>8}{'ratio':>8}")
        print(f"{'one image at a time (model.predict_proba(path))':<52}{loop:>8.1f}{1.0:>8.2f}")
        print(f"{f'mlabel.predict ({args.workers} decode threads, channels_last)':<52}{batched:>8.1f}{batched / loop:>8.2f}")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return
        from mlabel.export import export_model
        onnx_path = export_model(mlabel.load(model_dir), tmp / "model.onnx")
        onnx_rate = rate(load_backend(str(onnx_path)))
        print(f"{'mlabel.predict on the ONNX export (onnxruntime)':<52}{onnx_rate:>8.1f}{onnx_rate / loop:>8.2f}")


if __name__ == "__main__":
    main()
