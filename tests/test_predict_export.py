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


def _one_error(capsys) -> str:
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(captured.err.strip().splitlines()) == 1, captured.err
    return errors[0]


@pytest.mark.parametrize("option, fragment", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
])
def test_predict_refuses_a_batch_size_below_one_and_negative_workers(model_dir, images, tmp_path, capsys,
                                                                       option, fragment):
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit_:  # argparse's way out, as for any wrong option
        predict_main([str(model_dir), str(images[1][0]), "--out", str(out), *option])
    assert exit_.value.code == 2
    error = _one_error(capsys)
    assert fragment in error and "mlabel predict" in error
    assert not out.exists()


def test_predict_with_no_readable_image_is_an_error_and_keeps_the_earlier_predictions(model_dir, images, tmp_path,
                                                                                      capsys):
    out = tmp_path / "preds.csv"
    assert predict_main([str(model_dir), str(images[1][0]), "--out", str(out), "--quiet"]) == 0
    before = out.read_bytes()
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)  # a link to itself: reading it loops
    capsys.readouterr()
    assert predict_main([str(model_dir), str(images[0] / "broken.jpg"), str(loop), "--out", str(out),
                         "--quiet"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "none of the 2 images could be read" in errors[0], captured.err
    assert "preds.csv.skipped.csv" in errors[0] and "internal error" not in captured.err
    assert out.read_bytes() == before
    assert {r["path"] for r in _read(tmp_path / "preds.csv.skipped.csv")} == {str(images[0] / "broken.jpg"), str(loop)}


def test_predict_warns_about_a_folder_without_images_only_when_other_inputs_give_images(model_dir, images, tmp_path,
                                                                                       capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "p.csv"
    assert predict_main([str(model_dir), str(empty), str(images[1][0]), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: no images" in err and str(empty) in err and "error" not in err
    assert [r["path"] for r in _read(out)] == [str(images[1][0])]
    assert predict_main([str(model_dir), str(empty), "--out", str(tmp_path / "q.csv")]) == 2
    error = _one_error(capsys)
    assert "no images found in" in error and str(empty) in error


def test_predict_never_replaces_a_file_it_did_not_write(model_dir, images, tmp_path, capsys):
    for name, text in (("val.csv", "path,red,green,blue\na.jpg,1,0,0\n"), ("val.jsonl", '{"image": "a.jpg"}\n'),
                       ("p.csv.skipped.csv", "image,reason\n")):
        target = tmp_path / name
        target.write_text(text)
        out = tmp_path / name.replace(".skipped.csv", "")
        assert predict_main([str(model_dir), str(images[1][0]), "--out", str(out), "--quiet"]) == 2
        error = _one_error(capsys)
        assert f"{target} exists and was not written by mlabel predict" in error, error
        assert target.read_text() == text
    for name in ("again.csv", "again.jsonl", "again.json"):  # its own outputs are replaced, rerun after rerun
        for _ in range(2):
            assert predict_main([str(model_dir), str(images[1][0]), "--out", str(tmp_path / name), "--quiet"]) == 0


def test_predict_never_writes_into_an_input_folder_or_the_runs_data_folder(model_dir, images, tmp_path, capsys):
    root, paths = images
    out = root / "nested" / "preds.csv"
    assert predict_main([str(model_dir), str(root), "--out", str(out), "--quiet"]) == 2
    assert f"is inside the data folder {root.resolve()}" in _one_error(capsys)
    assert not out.exists()
    run = tmp_path / "run"
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    import shutil
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text(f"data:\n  root: {data}\n  format: csv\n  train: train.csv\n")
    for out in (data / "val.csv", data / "images" / "preds.csv"):
        assert predict_main([str(run), str(paths[0]), "--out", str(out), "--quiet"]) == 2
        assert f"is inside the data folder {data.resolve()}" in _one_error(capsys)
        assert not out.exists()
    assert predict_main([str(run), str(paths[0]), "--out", str(tmp_path / "preds.csv"), "--quiet"]) == 0


@pytest.mark.parametrize("fmt, name, fragment", [
    ("onnx", "m.pt", "end the name with .onnx"),
    ("torchscript", "m.onnx", "a TorchScript file, not ONNX"),
])
def test_export_refuses_a_file_name_of_the_other_format(model_dir, tmp_path, capsys, fmt, name, fragment):
    assert export_main([str(model_dir), "--format", fmt, "--out", str(tmp_path / name)]) == 2
    assert fragment in _one_error(capsys) and not (tmp_path / name).exists()


@pytest.mark.parametrize("fmt", ["tagger", "timm", "onnx"])
def test_export_never_writes_into_the_runs_data_folder(model_dir, tmp_path, capsys, fmt):
    import shutil
    run, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    shutil.copytree(model_dir, run / "model")
    (run / "config.yaml").write_text(f"data:\n  root: {data}\n")
    out = data / ("exported.onnx" if fmt == "onnx" else "exported")
    assert export_main([str(run), "--format", fmt, "--out", str(out)]) == 2
    assert f"is inside the data folder {data.resolve()}" in _one_error(capsys)
    assert list(data.iterdir()) == []


def test_a_csv_list_that_is_not_utf8_names_the_file_and_line(model_dir, images, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_bytes(b"path\n" + str(images[1][0]).encode() + b"\ncaf\xe9.jpg\n")
    assert predict_main([str(model_dir), str(listing), "--out", str(tmp_path / "p.csv")]) == 2
    error = _one_error(capsys)
    assert f"{listing}:3: not UTF-8 text" in error and "iconv" in error


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


# --------------------------------------------------------------------------- issue 27

@pytest.fixture(scope="module")
def onnx_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    assert export_main([str(model_dir), "--out", str(path)]) == 0
    return path


def _with_metadata(onnx_file, tmp_path, edit):
    """A copy of the export whose mlabel metadata is ``edit(meta)`` (a dict, or text as it is)."""
    import onnx
    proto = onnx.load(str(onnx_file))
    entry = next(e for e in proto.metadata_props if e.key == "mlabel")
    changed = edit(json.loads(entry.value))
    entry.value = changed if isinstance(changed, str) else json.dumps(changed)
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def _drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _prep(**changes):
    return lambda meta: {**meta, "preprocessing": {**meta["preprocessing"], **changes}}


@pytest.mark.parametrize("edit,fragment", [
    (_drop("preprocessing"), "preprocessing must be an object"),
    (_prep(image_size=0), "preprocessing.image_size must be an integer in [8, 4096]"),
    (_prep(image_size=60000), "preprocessing.image_size must be an integer in [8, 4096]"),
    (_prep(image_size=64), "gives preprocessing.image_size 64 but the graph takes 32 x 32"),
    (_prep(std=[0, 0, 0]), "preprocessing.std must be 3 numbers"),
    (_prep(crop_pct=0), "preprocessing.crop_pct must be a number in [0.5, 2]"),
    (_drop("labels"), "labels must be a non-empty list of names"),
    (lambda meta: {**meta, "labels": ["red", "", "blue"]}, "label 2 has an empty label name"),
    (lambda meta: "{not json", "its mlabel metadata is not valid JSON"),
    (lambda meta: "[1, 2]", "the model metadata must be a JSON object"),
    (lambda meta: "[" * 100_000 + "]" * 100_000, "its mlabel metadata is not valid JSON"),
])
def test_onnx_metadata_is_validated_as_mlabel_json_is(onnx_file, images, tmp_path, capsys, edit, fragment):
    path = _with_metadata(onnx_file, tmp_path, edit)
    out = tmp_path / "p.csv"
    assert predict_main([str(path), str(images[1][0]), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and str(path) in errors[0], errors
    assert not out.exists()


def test_onnx_predict_refuses_a_file_that_is_not_onnx(images, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, fragment in ((garbage, "is not a readable ONNX model"), (tmp_path / "none.onnx", "not found")):
        assert predict_main([str(path), str(images[1][0]), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and fragment in errors[0] and str(path) in errors[0], errors


def test_onnx_without_thresholds_decides_at_one_half_as_pytorch_does(model_dir, onnx_file, images, tmp_path):
    path = _with_metadata(onnx_file, tmp_path, lambda meta: {**meta, "thresholds": None})
    image = str(images[1][0])
    assert predict_main([str(path), image, "--out", str(tmp_path / "o.csv"), "--threshold", "0.5", "--quiet"]) == 0
    assert predict_main([str(path), image, "--out", str(tmp_path / "n.csv"), "--quiet"]) == 0
    at_half, untuned = _read(tmp_path / "o.csv")[0], _read(tmp_path / "n.csv")[0]
    assert untuned == at_half
    probs = [float(untuned[n]) for n in LABELS]
    assert untuned["labels"] == ";".join(n for n, p in zip(LABELS, probs) if p >= 0.5)
    # the same metadata in mlabel.json: the PyTorch model decides at 0.5 too
    copy = tmp_path / "model"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    meta = json.loads((model_dir / "mlabel.json").read_text())
    (copy / "mlabel.json").write_text(json.dumps({**meta, "thresholds": None}))
    assert mlabel.load(copy).thresholds.tolist() == [0.5] * 3


def _owasp(cell: str) -> str:
    """OWASP's advice, written out: a cell starting =, +, -, @, tab or CR gets a leading quote."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def test_prediction_csv_cells_cannot_start_a_formula(tmp_path, monkeypatch):
    labels = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tt", "plain"]
    model = mlabel.create_model("test_resnet", labels, image_size=32, resize="squish", regression=["delta"])
    model.set_regression_scale([-100.0], [1.0])  # negative values: numbers, not formulas
    model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    names = ["=1+1.png", "-x.png", "@y.png", "plain.png"]
    for name in names:
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / name)
    assert predict_main(["--out", "p.csv", "--threshold", "0", "--quiet", "--", "model", *names, "+missing.png"]) == 0
    rows = list(csv.reader(open(tmp_path / "p.csv", newline="")))
    assert rows[0] == ["path", "labels", *map(_owasp, labels), "delta"]
    assert [r[0] for r in rows[1:]] == [_owasp(n) for n in names]
    assert all(r[1] == _owasp(";".join(labels)) for r in rows[1:])  # every label passes threshold 0
    for row in rows[1:]:
        probs, delta = [float(v) for v in row[2:-1]], float(row[-1])
        assert all(0 <= p <= 1 for p in probs) and delta < 0  # plain numbers, a negative one unquoted
    skipped = list(csv.reader(open(tmp_path / "p.csv.skipped.csv", newline="")))
    assert skipped[1][0] == "'+missing.png"
    # JSON output keeps the names as they are: no spreadsheet reads it as formulas
    assert predict_main(["model", names[0], "--out", "p.jsonl", "--threshold", "0", "--quiet"]) == 0
    record = json.loads((tmp_path / "p.jsonl").read_text())
    assert record["path"] == names[0] and record["labels"] == labels


@pytest.mark.parametrize("values,reference", [
    # floats in [0, 1]: the float image convention, 1.0 is white
    (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), lambda v: v * 255),
    # floats in (1, 255]: 8-bit values
    (np.linspace(0, 200, 64, dtype=np.float32).reshape(8, 8), lambda v: v),
    # int32 within 16 bits
    (np.linspace(0, 40000, 64).astype(np.int32).reshape(8, 8), lambda v: v / 65535 * 255),
    # int32 beyond 16 bits: the image's own range
    (np.linspace(1000, 100000, 64).astype(np.int32).reshape(8, 8), lambda v: (v - 1000) / 99000 * 255),
    # negative floats: the image's own range
    (np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8), lambda v: (v + 5) / 10 * 255),
])
def test_tiff_images_are_scaled_by_their_range(tmp_path, values, reference):
    from mlabel.preprocess import read_rgb
    path = tmp_path / "image.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("F", "I", "I;32S", "I;16")
    expected = np.clip(np.floor(reference(values.astype(np.float64)) + 0.5), 0, 255).astype(np.uint8)
    decoded = read_rgb(str(path))
    assert decoded.shape == (8, 8, 3)
    np.testing.assert_array_equal(decoded[..., 0], expected)
    np.testing.assert_array_equal(decoded[..., 2], expected)
