"""mlabel.predict, mlabel.export and safe loading."""
import csv
import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import mlabel
from mlabel.export import main as export_main
from mlabel.models import UnsafeModelFileError
from mlabel.predict import main as predict_main

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = mlabel.create_model("test_resnet", LABELS, image_size=32, resize="squish")
    model.set_thresholds([0.45, 0.5, 0.55])
    model.set_calibration("platt", [0.8, 1.2, 1.0], [0.1, -0.2, 0.0])
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        folder = root if i < 5 else root / "nested" / ("deeper" if i > 8 else "")
        path = folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root, paths


def _read(path):
    return list(csv.DictReader(open(path)))


def test_predict_writes_thresholded_labels_and_reports_unreadable(model_dir, images, tmp_path, capsys):
    root, paths = images
    out = tmp_path / "preds.csv"
    assert predict_main([str(model_dir), str(root), str(tmp_path / "missing.png"), "--out", str(out),
                         "--batch-size", "4", "--quiet"]) == 0
    rows = _read(out)
    assert [r["path"] for r in rows] == sorted(str(p) for p in paths)
    model = mlabel.load(model_dir)
    probs = model.predict_proba(sorted(str(p) for p in paths)).numpy()
    got = np.array([[float(r[n]) for n in LABELS] for r in rows])
    np.testing.assert_allclose(got, probs, atol=1e-6)
    for row, p in zip(rows, probs):
        expected = [n for n, v, t in zip(LABELS, p, [0.45, 0.5, 0.55]) if v >= t]
        assert row["labels"] == ";".join(expected)
    skipped = _read(tmp_path / "preds.csv.skipped.csv")
    assert {r["path"] for r in skipped} == {str(root / "broken.jpg"), str(tmp_path / "missing.png")}
    assert "2 unreadable, skipped" in capsys.readouterr().out


def test_predict_overrides_and_jsonl_and_csv_input(model_dir, images, tmp_path):
    root, paths = images
    listing = tmp_path / "list.csv"
    listing.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(paths[:4])))
    out = tmp_path / "p.jsonl"
    assert predict_main([str(model_dir), str(listing), "--out", str(out), "--topk", "1", "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in paths[:4]]
    for r in records:
        assert r["labels"] == [max(r["probs"], key=r["probs"].get)]
    out = tmp_path / "all.csv"
    assert predict_main([str(model_dir), str(paths[0]), "--out", str(out), "--threshold", "0", "--quiet"]) == 0
    assert _read(out)[0]["labels"] == "red;green;blue"
    assert predict_main([str(model_dir), str(tmp_path / "empty_dir_missing.csv")]) == 2


def test_python_predict_accepts_paths_pil_and_arrays_with_saved_preprocessing(model_dir, images):
    _, paths = images
    model = mlabel.load(model_dir)
    pixels = np.asarray(Image.open(paths[3]).convert("RGB"))
    # The preprocessing written out by hand: squish to 32 x 32, scale, normalise.
    pre = model.preprocessing
    resized = cv2.resize(pixels, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    tensor = torch.from_numpy(((resized - pre["mean"]) / pre["std"]).transpose(2, 0, 1).astype(np.float32))[None]
    expected = model.predict_proba(tensor)
    for item in (str(paths[3]), paths[3], Image.open(paths[3]), pixels):
        torch.testing.assert_close(model.predict_proba(item), expected, atol=1e-5, rtol=0)
    assert model.predict([paths[3], paths[4]]).shape == (2, 3)


def test_load_accepts_a_run_directory_and_refuses_other_versions(model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for name in ("model.safetensors", "mlabel.json"):
        (run / "model" / name).write_bytes((model_dir / name).read_bytes())
    assert mlabel.load(run).labels == LABELS
    meta = json.loads((run / "model" / "mlabel.json").read_text())
    meta["format_version"] = 99
    (run / "model" / "mlabel.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version 99.*cannot load it"):
        mlabel.load(run)


class _Payload:
    """Unpickling this object would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_executed(model_dir, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "mlabel.json").write_text((model_dir / "mlabel.json").read_text())
    live = tmp_path / "payload_is_live"
    pickle.loads(pickle.dumps(_Payload(live)))  # plain unpickling does run it
    assert live.exists()
    marker = tmp_path / "code_ran"
    with open(folder / "model.pt", "wb") as handle:
        pickle.dump({"head.weight": _Payload(marker)}, handle)
    with pytest.raises(UnsafeModelFileError, match="trust_pickle=True"):
        mlabel.load(folder)
    with pytest.raises(UnsafeModelFileError, match="holds more than tensors"):
        mlabel.load(folder, trust_pickle=True)  # weights_only=True refuses the payload
    assert not marker.exists()
    # A plain state dict in a pickle file loads when the user vouches for it.
    state = mlabel.load(model_dir).state_dict()
    torch.save(state, folder / "model.pt")
    assert mlabel.load(folder, trust_pickle=True).labels == LABELS


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_carries_metadata_and_matches_pytorch(model_dir, tmp_path, fmt, capsys):
    out = tmp_path / f"m.{fmt}"
    assert export_main([str(model_dir), "--format", fmt, "--out", str(out)]) == 0
    assert "masks agree" in capsys.readouterr().out
    model = mlabel.load(model_dir)
    images = torch.randn(5, 3, 32, 32)
    expected = model.predict_proba(images)
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(out))
        meta = json.loads(session.get_modelmeta().custom_metadata_map["mlabel"])
        probs, mask = session.run(None, {"images": images.numpy()})
    else:
        extra = {"mlabel.json": ""}
        module = torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["mlabel.json"])
        with torch.no_grad():
            probs, mask = (t.numpy() for t in module(images))
    assert meta["labels"] == LABELS and meta["thresholds"] == pytest.approx([0.45, 0.5, 0.55])
    assert meta["preprocessing"] == model.preprocessing and meta["calibration"]["method"] == "platt"
    assert probs.shape == (5, 3)
    assert np.abs(probs - expected.numpy()).max() < 1e-4
    np.testing.assert_array_equal(mask, probs >= np.array(meta["thresholds"], dtype=np.float32))


def test_onnx_predict_runs_without_torch_and_agrees(model_dir, images, tmp_path):
    root, _ = images
    onnx_path = tmp_path / "m.onnx"
    assert export_main([str(model_dir), "--out", str(onnx_path)]) == 0
    torch_csv, onnx_csv = tmp_path / "t.csv", tmp_path / "o.csv"
    assert predict_main([str(model_dir), str(root), "--out", str(torch_csv), "--quiet"]) == 0
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['predict', {str(onnx_path)!r}, {str(root)!r}, '--out', {str(onnx_csv)!r}, '--quiet']; "
            "runpy.run_module('mlabel.predict', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a, b = _read(torch_csv), _read(onnx_csv)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    got = np.array([[float(r[n]) for n in LABELS] for r in b])
    want = np.array([[float(r[n]) for n in LABELS] for r in a])
    assert np.abs(got - want).max() < 1e-4


def test_onnx_export_of_a_multitask_model_carries_the_regression_output(tmp_path):
    import onnxruntime as ort

    from mlabel.export import export_model
    model = mlabel.create_model("test_resnet", LABELS, image_size=32, resize="squish", regression=["age"])
    model.set_regression_scale([40.0], [12.0])
    path = export_model(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    images = torch.randn(4, 3, 32, 32)
    probs, mask, values = session.run(["probs", "mask", "regression"], {"images": images.numpy()})
    model.eval()
    np.testing.assert_allclose(values, model.predict_regression(images).numpy(), atol=1e-4)
    np.testing.assert_allclose(probs, model.predict_proba(images).numpy(), atol=1e-5)
    assert json.loads(session.get_modelmeta().custom_metadata_map["mlabel"])["regression"]["names"] == ["age"]
