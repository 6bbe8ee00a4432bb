"""python -m mlabel.data convert: every new format's split as csv / jsonl, read back by those
readers to the same paths and the same cells (unknowns included)."""
import os

import numpy as np
import pytest
import yaml

from mlabel.config import load_config
from mlabel.data import openimages, read_split
from mlabel.data.__main__ import main as data_main
from mlabel.data.formats import read_jsonl_table
from mlabel.data.tables import read_csv_table

from test_formats_labelstudio import write_export
from test_formats_openimages import write_openimages
from test_formats_yolo import roboflow


def _yolo(root):
    yaml_path, _ = roboflow(root, n=(12, 5, 4))
    return {"format": "yolo", "root": str(yaml_path)}


def _labelstudio(root):
    write_export(root, "train.json", 14, 0)
    write_export(root, "val.json", 6, 1)
    return {"format": "labelstudio", "root": str(root), "train": "train.json", "val": "val.json"}


def _openimages(root):
    write_openimages(root, counts=(14, 6))
    return {"format": "openimages", "root": str(root), "train": "train-annotations-human-imagelabels.csv",
            "val": "validation-annotations-human-imagelabels.csv"}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("make", [_yolo, _labelstudio, _openimages])
def test_convert_round_trips_paths_and_cells(tmp_path, capsys, monkeypatch, make, kind):
    if make is _openimages:  # past the cell limit: the sparse table with an unknown default converts too
        monkeypatch.setattr(openimages, "SPARSE_FROM", 10)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": make(tmp_path / "data")}))
    data = load_config(str(recipe), []).data
    for split in ("train", "val"):
        out = tmp_path / "out" / f"{split}.{kind}"
        assert data_main(["convert", str(recipe), "--to", kind, "--out", str(out), "--split", split]) == 0
        source = read_split(data, split)
        back = (read_csv_table(out, out.parent) if kind == "csv" else
                read_jsonl_table(out, out.parent, labels=source.labels))
        assert back.labels == source.labels
        assert [os.path.normpath(p) for p in back.paths] == [os.path.normpath(p) for p in source.paths]
        np.testing.assert_array_equal(back.dense_targets(), source.dense_targets())
    assert "written:" in capsys.readouterr().out


def test_convert_never_writes_into_the_data_folder(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": _yolo(tmp_path / "data")}))
    out = tmp_path / "data" / "table.csv"
    assert data_main(["convert", str(recipe), "--to", "csv", "--out", str(out)]) == 2
    assert "inside the data folder" in capsys.readouterr().err and not out.exists()


def test_data_summary_and_convert_refuse_the_data_folder_and_a_folder_for_a_file(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "multilabel", "data": _labelstudio(tmp_path / "data")}))
    before = sorted(p.name for p in (tmp_path / "data").rglob("*"))
    assert data_main([str(recipe), "--out", str(tmp_path / "data" / "summary")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"inside the data folder {(tmp_path / 'data').resolve()}" in errors[0], errors
    (tmp_path / "taken").mkdir()
    assert data_main(["convert", str(recipe), "--to", "csv", "--out", str(tmp_path / "taken")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"output {tmp_path / 'taken'} is a folder; give a file name" in errors[0], errors
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == before
    assert list((tmp_path / "taken").iterdir()) == []
