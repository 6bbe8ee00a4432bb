"""``python -m mlabel.predict MODEL INPUT... [--out preds.csv]``.

MODEL is a model directory, a run directory, or an ``.onnx`` file from ``mlabel.export`` (then
only onnxruntime, NumPy, Pillow and OpenCV are needed: torch is not imported). INPUT is any mix of
image files, folders (searched recursively) and CSV files listing image paths (column ``path``,
``image`` or ``filename``, else the first; relative paths are taken from the CSV's folder).

Writes one row per image: ``path``, ``labels`` (every label at or above its threshold, joined by
``;``, possibly empty), then one probability column per label (and one value column per
regression target of a multi-task model); a text cell (path, label names) that would start a
spreadsheet formula (``=``, ``+``, ``-``, ``@``, tab, CR) is written with a leading ``'``. ``.jsonl``
output gives one JSON object per line instead, names unchanged. ``--threshold T`` replaces every
per-label threshold by T; ``--topk K`` keeps the K most probable labels (among those passing
``--threshold`` when both are given). Unreadable inputs are reported, skipped, listed in
``OUT.skipped.csv`` and counted at the end.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .cli import ArgumentParser, guarded
from .errors import DataError
from .preprocess import IMAGE_EXTENSIONS, preprocess_image

__all__ = ["main", "expand_inputs", "load_backend"]

PATH_COLUMNS = ("path", "image", "filename", "file")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image files, folders (recursive, sorted) and CSV lists of paths -> image paths.

    An image that cannot be read (missing, a broken link, not an image) is reported and skipped
    when predicting; a folder without images is a warning when other inputs give images, the
    error otherwise."""
    paths: list[str] = []
    empty: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                empty.append(item)
            paths.extend(str(p) for p in found)
        elif path.suffix.lower() == ".csv":
            paths.extend(_csv_paths(path))
        else:
            paths.append(str(path))  # an image file: reported and skipped if it cannot be read
    extensions = ", ".join(IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"no images found in {' '.join(inputs)} (looked for {extensions}): give image files, "
                        "folders holding images or a CSV list of images")
    for item in empty:
        print(f"warning: no images ({extensions}) under {item}", file=sys.stderr)
    return paths


def _csv_paths(path: Path) -> list[str]:
    """The image paths a CSV lists (column ``path``, ``image``, ``filename`` or ``file``, else the
    first), relative ones taken from the CSV's folder."""
    if not path.is_file():
        raise DataError(f"CSV file {path} is not a regular file: give a CSV list of image paths")
    from .io import read_text
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path} is empty: expected a header row and one image path per row")
    column = next((c for c in PATH_COLUMNS if c in reader.fieldnames), reader.fieldnames[0])
    paths = []
    for row in reader:
        value = (row.get(column) or "").strip()
        if value:
            paths.append(str(Path(value) if Path(value).is_absolute() else path.parent / value))
    return paths


class Predicted(NamedTuple):
    """What a backend gives for a batch (or, from :func:`predict_paths`, one image): the
    probabilities and, for a multi-task model, the regression values in the targets' units."""
    probs: np.ndarray
    regression: np.ndarray | None = None

    def rows(self, index) -> "Predicted":
        return Predicted(*(None if x is None else x[index] for x in self))


class _TorchBackend:
    def __init__(self, model_dir: str, device: str | None, trust_pickle: bool):
        import torch

        from .distributed import resolve_device
        from .engine import autocast_for, eval_precision
        from .models import load
        self.torch = torch
        self.device = resolve_device(device or "auto")
        # channels_last: faster convolutions on CUDA and, measured on a 2-core CPU, 1.6x there too.
        self.model = load(model_dir, trust_pickle=trust_pickle).to(self.device).eval()
        self.model.to(memory_format=torch.channels_last)
        # On the CPU small batches keep activations in cache (lite0 at 224 px: 61 img/s at batch 1,
        # 43 at batch 32); on a GPU large batches fill the device.
        self.batch_size = 64 if self.device.type == "cuda" else 4
        self.autocast = lambda: autocast_for(self.device, eval_precision(self.device))
        self.labels = self.model.labels
        self.regression_names = self.model.regression_names
        self.thresholds = self.model.thresholds.cpu().numpy()
        self.preprocessing = self.model.preprocessing

    def __call__(self, batch: np.ndarray) -> Predicted:
        torch = self.torch
        with torch.inference_mode(), self.autocast():
            images = torch.from_numpy(batch).to(self.device, non_blocking=True)
            images = images.contiguous(memory_format=torch.channels_last)
            out = self.model.outputs(images)
            probs = self.model.probabilities(out.logits).float().cpu().numpy()
            if out.regression is None:
                return Predicted(probs)
            return Predicted(probs, self.model.regression_values(out.regression).cpu().numpy())


class _OnnxBackend:
    def __init__(self, path: str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DataError("predicting with an .onnx file needs onnxruntime: pip install onnxruntime") from None
        if not Path(path).is_file():
            raise DataError(f"{path} " + ("is not a file" if Path(path).exists() else "not found"))
        try:
            self.session = ort.InferenceSession(path, providers=ort.get_available_providers())
        except Exception as err:  # onnxruntime's own types (InvalidProtobuf, Fail, ...) derive from Exception
            raise DataError(f"{path} is not a readable ONNX model ({str(err)[:200]}); export it again with "
                            "python -m mlabel.export") from None
        meta = _onnx_metadata(self.session, path)
        self.labels = meta["labels"]
        self.regression_names = (meta.get("regression") or {}).get("names", [])
        self.outputs = ["probs"] + (["regression"] if self.regression_names else [])
        # no tuned thresholds: 0.5, as the PyTorch model (mlabel.load) decides then
        thresholds = meta.get("thresholds")
        self.thresholds = np.asarray([0.5] * len(self.labels) if thresholds is None else thresholds, dtype=np.float32)
        self.preprocessing = meta["preprocessing"]
        self.batch_size = 32

    def __call__(self, batch: np.ndarray) -> Predicted:
        return Predicted(*self.session.run(self.outputs, {"images": batch}))


def _onnx_metadata(session, path: str) -> dict:
    """The mlabel metadata inside an exported ONNX file, validated as ``mlabel.json`` is, and
    checked against the graph's input size and output width."""
    text = session.get_modelmeta().custom_metadata_map.get("mlabel")
    if text is None:
        raise DataError(f"{path} carries no mlabel metadata; export it with python -m mlabel.export")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: also a 5,000-digit number
        raise DataError(f"{path}: its mlabel metadata is not valid JSON ({str(err)[:120]}); export the model "
                        "again (mlabel export)") from None
    from .modeldir import validate_meta
    validate_meta(meta, f"{path} (mlabel metadata)")
    width = session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != len(meta["labels"]):
        raise DataError(f"{path}: its metadata names {len(meta['labels'])} labels but the graph outputs "
                        f"{width} probabilities; re-export the model (mlabel export)")
    side = session.get_inputs()[0].shape[-1]
    if isinstance(side, int) and side != meta["preprocessing"]["image_size"]:
        raise DataError(f"{path}: its metadata gives preprocessing.image_size "
                        f"{meta['preprocessing']['image_size']} but the graph takes {side} x {side} images; "
                        "re-export the model (mlabel export)")
    return meta


def load_backend(model: str, device: str | None = None, trust_pickle: bool = False):
    if model.lower().endswith(".onnx"):
        return _OnnxBackend(model)
    return _TorchBackend(model, device, trust_pickle)


def _decisions(probs: np.ndarray, thresholds: np.ndarray, threshold: float | None, topk: int | None,
               topk_only: bool = False) -> np.ndarray:
    """Labels at or above their threshold (the tuned one, or ``threshold`` for all); ``topk`` keeps
    at most the K most probable of those, ``topk_only`` the K most probable whatever the thresholds."""
    passing = np.ones(probs.shape, dtype=bool) if topk_only else \
        probs >= (thresholds if threshold is None else threshold)
    if topk is not None:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
        top = np.zeros_like(passing)
        np.put_along_axis(top, order, True, axis=1)
        passing &= top
    return passing


OUTPUT_SUFFIXES = (".csv", ".jsonl", ".json")


def _check_output(out: Path, labels: list[str], regression: list[str], inputs=(), data_folders=()) -> None:
    """Refuse, before any inference, an output that could not be written or read back unambiguously,
    or that would overwrite an input, a model's files or a file predict did not write (the list of
    unreadable images beside it too), or that lies in a data folder (``data_folders``)."""
    from .io import check_output, refuse_inside
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: give a .csv, .jsonl or .json file name")
    check_output(out, inputs)
    check_output(_skipped_path(out), inputs)
    _refuse_foreign(out, ("path,labels", '{"path": ', "["))
    _refuse_foreign(_skipped_path(out), ("path,error",))
    refuse_inside(out, data_folders, "predict never writes into a data folder: write the predictions elsewhere")
    if out.suffix.lower() == ".csv":
        clash = sorted({"path", "labels"} & set(labels + regression))
        joined = [name for name in labels if ";" in name]
        if clash or joined:
            raise ValueError(f"--out {out}: the label names {clash + joined} clash with the CSV's own "
                             "columns (path, labels) or its ';' separator; write --out with .jsonl or .json")


def _refuse_foreign(path: Path, starts: tuple[str, ...]) -> None:
    """Refuse to replace an existing file that predict did not write (an annotation file, say):
    predict replaces only its own earlier outputs, recognised by how their first line starts."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        head = handle.read(256).decode("utf-8", "replace").lstrip("\ufeff")
    if not head.startswith(starts):
        first = head.splitlines()[0][:60] if head.strip() else "blank"
        raise ValueError(f"--out {path} exists and was not written by mlabel predict (it starts with {first!r}); "
                         "predict replaces only its own outputs: choose another path, or remove the file")


def _data_folders(model: str, inputs: list[str]) -> list[Path]:
    """The folders predict never writes into: the folders given as INPUT and, for a run directory,
    the data folder of the run's recipe (where it still exists)."""
    folders = [Path(item).resolve() for item in inputs if Path(item).is_dir()]
    if model.lower().endswith(".onnx") or model.startswith("hf://"):
        return folders
    from .rundir import run_data_folder
    run = Path(model) if (Path(model) / "config.yaml").is_file() else Path(model).parent
    data = run_data_folder(run)
    return folders + ([data] if data is not None else [])


def _load(path: str, preprocessing: dict):
    try:
        return preprocess_image(path, preprocessing), None
    except (DataError, ValueError, OSError) as err:
        return None, str(err)


def predict_paths(backend, paths: list[str], *, batch_size: int | None = None, workers: int = 4,
                  quiet: bool = False):
    """Yield (path, :class:`Predicted` of that image, None) for every readable image and
    (path, None, error) otherwise.

    Decoding runs in a thread pool one batch ahead of inference.
    """
    from tqdm import tqdm
    batch_size = batch_size or backend.batch_size
    pool = ThreadPoolExecutor(max(1, workers))
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    submit = lambda chunk: [pool.submit(_load, p, backend.preprocessing) for p in chunk]  # noqa: E731
    pending = submit(chunks[0]) if chunks else []
    bar = tqdm(total=len(paths), unit="img", disable=quiet or not sys.stderr.isatty(), desc="predict")
    try:
        for k, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
            good = [i for i, (array, _) in enumerate(loaded) if array is not None]
            predicted = backend(np.stack([loaded[i][0] for i in good])) if good else None
            row = dict(zip(good, range(len(good))))
            for i, path in enumerate(chunk):
                yield (path, predicted.rows(row[i]), None) if i in row else (path, None, loaded[i][1])
            bar.update(len(chunk))
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's CSV injection list


def _cell(text: str) -> str:
    """A text cell of a CSV a spreadsheet may open: one that would start a formula there (a label
    or file named ``=HYPERLINK(...)``) gets a leading single quote, as OWASP advises. Numbers
    (probabilities, regression values) are written as they are."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _write(out: Path, labels: list[str], regression: list[str], rows) -> None:
    """rows: (path, :class:`Predicted` of the image, decisions)."""
    from .io import write_text
    buffer = io.StringIO()
    if out.suffix.lower() in (".jsonl", ".json"):
        records = []
        for path, values, keep in rows:
            record = {"path": path, "labels": [name for name, k in zip(labels, keep) if k],
                      "probs": {name: round(float(p), 6) for name, p in zip(labels, values.probs)}}
            if regression:
                record["regression"] = {name: float(v) for name, v in zip(regression, values.regression)}
            records.append(record)
        if out.suffix.lower() == ".json":
            buffer.write(json.dumps(records, indent=1) + "\n")
        else:
            buffer.writelines(json.dumps(record) + "\n" for record in records)
    else:
        writer = csv.writer(buffer)
        writer.writerow(["path", "labels", *map(_cell, labels), *map(_cell, regression)])
        for path, values, keep in rows:
            writer.writerow([_cell(path), _cell(";".join(name for name, k in zip(labels, keep) if k)),
                             *(f"{p:.6f}" for p in values.probs),
                             *(f"{v:.6g}" for v in (() if values.regression is None else values.regression))])
    write_text(out, buffer.getvalue())


@guarded
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="mlabel predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("model", help="a model directory, a run directory or an exported .onnx file")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or CSV files of paths")
    parser.add_argument("--out", default="preds.csv", help="output .csv (default preds.csv), .jsonl or .json")
    parser.add_argument("--topk", type=int, help="keep at most the K most probable labels that pass their thresholds")
    parser.add_argument("--topk-only", action="store_true", help="with --topk: the K most probable, thresholds ignored")
    parser.add_argument("--threshold", type=float, help="one threshold in [0, 1] for every label instead of the tuned ones")
    parser.add_argument("--batch-size", type=int, help="default: 64 on CUDA, 4 on the CPU, 32 with ONNX")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickle-based weights file")
    parser.add_argument("--explain", metavar="OUT_DIR", help="also write a heat map per image and label: "
                        "OUT_DIR/IMAGE__LABEL.png overlays and OUT_DIR/maps.npz (the PyTorch model only)")
    parser.add_argument("--explain-labels", metavar="A,B", help="with --explain: these labels for every image "
                        "(default: the labels each image is predicted to have)")
    parser.add_argument("--explain-method", default="auto", help="auto, cam, csra, gradcam, hirescam or gradcam++")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    paths = expand_inputs(args.inputs)
    backend = load_backend(args.model, args.device, args.trust_pickle)
    out = Path(args.out)
    _check_output(out, backend.labels, backend.regression_names, args.inputs, _data_folders(args.model, args.inputs))
    explain_labels = _check_explain(args, backend)
    start = time.perf_counter()
    rows, skipped = _predict_all(backend, paths, args)
    seconds = time.perf_counter() - start
    if rows:
        probs = np.stack([p.probs for _, p in rows])
        keep = _decisions(probs, backend.thresholds, args.threshold, args.topk, args.topk_only)
        _write(out, backend.labels, backend.regression_names, [(path, p, k) for (path, p), k in zip(rows, keep)])
        if args.explain:
            from .explain import write_explanations
            wanted = [explain_labels or [n for n, k in zip(backend.labels, row) if k] for row in keep]
            written = write_explanations(backend.model, [path for path, _ in rows], wanted, Path(args.explain),
                                         method=args.explain_method, device=backend.device)
            print(f"heat maps: {written} overlays and maps.npz in {args.explain}")
    _write_skipped(_skipped_path(out), skipped)
    print(f"{len(rows)} images predicted in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.0f} img/s)"
          + (f" -> {out}" if rows else "") + (f"; {len(skipped)} unreadable, skipped (listed in "
                                              f"{out.name}.skipped.csv)" if skipped else ""))
    if not rows:
        raise DataError(f"none of the {len(paths)} images could be read (listed in {_skipped_path(out)}); "
                        "nothing was predicted: check the files named above")
    return 0


def _check_explain(args, backend) -> list[str] | None:
    """``--explain``: refused for an exported model (explanations need the PyTorch model), or
    with labels the model lacks, or a folder that would overwrite a model or an input."""
    if not args.explain:
        if args.explain_labels:
            raise ValueError("--explain-labels needs --explain OUT_DIR")
        return None
    if not isinstance(backend, _TorchBackend):
        raise ValueError(f"--explain needs the PyTorch model: {args.model} is an ONNX export, which holds no "
                         "feature maps to explain; give the model or run directory")
    from .explain import METHODS
    if args.explain_method not in METHODS:
        raise ValueError(f"--explain-method {args.explain_method!r}: one of {', '.join(METHODS)}")
    from .io import check_output
    check_output(Path(args.explain) / "maps.npz", args.inputs)
    if not args.explain_labels:
        return None
    names = [n.strip() for n in args.explain_labels.split(",") if n.strip()]
    unknown = [n for n in names if n not in backend.labels]
    if unknown or not names:
        import difflib
        close = difflib.get_close_matches(unknown[0], backend.labels, n=1) if unknown else []
        raise ValueError(f"--explain-labels: {unknown[0] if unknown else args.explain_labels!r} is not one of the "
                         f"model's labels" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; it has {', '.join(backend.labels[:20])}")
    return names


def _check_arguments(parser, args) -> None:
    if args.topk is not None and args.topk < 1:
        parser.error("--topk must be at least 1")
    if args.topk_only and args.topk is None:
        parser.error("--topk-only needs --topk K")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold is a probability in [0, 1], got {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")


def _predict_all(backend, paths: list[str], args) -> tuple[list, list]:
    rows, skipped = [], []
    for path, probs, error in predict_paths(backend, paths, batch_size=args.batch_size,
                                            workers=args.workers, quiet=args.quiet):
        if probs is None:
            print(f"skipped {path}: {error}", file=sys.stderr)
            skipped.append((path, error))
        else:
            rows.append((path, probs))
    return rows, skipped


def _skipped_path(out: Path) -> Path:
    return out.with_name(out.name + ".skipped.csv")


def _write_skipped(path: Path, skipped: list) -> None:
    """The images that could not be read; a list left by an earlier run is removed when none were."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    from .io import write_text
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("path", "error"), *((_cell(p), _cell(e)) for p, e in skipped)])
    write_text(path, buffer.getvalue())


if __name__ == "__main__":
    sys.exit(main())
