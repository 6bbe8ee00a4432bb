import numpy as np
import pytest

from mlabel.config import load_config
from mlabel.data import DataError, build_splits, iterative_split
from mlabel.data.tables import CsvColumns, read_csv_table, read_folder_table


def _images(root, names):
    from PIL import Image
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)


def test_csv_one_hot_with_unknown_and_extensionless_names(tmp_path):
    _images(tmp_path, ["a.jpg", "b.png", "c.jpg"])
    (tmp_path / "t.csv").write_text("file,x,y\na,1,0\nb.png,,1\nc,-1,0\n")
    table = read_csv_table(tmp_path / "t.csv", tmp_path)
    assert table.labels == ["x", "y"]
    assert [p.rsplit("/", 1)[-1] for p in table.paths] == ["a.jpg", "b.png", "c.jpg"]
    np.testing.assert_array_equal(table.targets, [[1, 0], [-1, 1], [-1, 0]])


def test_csv_names_column_with_delimiter(tmp_path):
    _images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "t.csv").write_text("img,tags\na.jpg,sea sun\nb.jpg,\nc.jpg,tree sea\n")
    table = read_csv_table(tmp_path / "t.csv", tmp_path, columns=CsvColumns(joined="tags", delimiter=" "))
    assert table.labels == ["sea", "sun", "tree"]
    np.testing.assert_array_equal(table.targets, [[1, 1, 0], [0, 0, 0], [1, 0, 1]])


def test_val_with_label_unknown_to_train_is_an_error(tmp_path):
    _images(tmp_path, ["a.jpg"])
    (tmp_path / "v.csv").write_text("img,tags\na.jpg,sea moon\n")
    with pytest.raises(DataError, match=r"v.csv:2: label 'moon' is not in the training labels"):
        read_csv_table(tmp_path / "v.csv", tmp_path, columns=CsvColumns(joined="tags"), labels=["sea", "sun"])
    (tmp_path / "w.csv").write_text("img,sea,moon\na.jpg,1,0\n")
    with pytest.raises(DataError, match=r"labels \['moon'\] are not in the training labels"):
        read_csv_table(tmp_path / "w.csv", tmp_path, labels=["sea", "sun"])


def test_val_columns_reordered_to_training_order(tmp_path):
    _images(tmp_path, ["a.jpg"])
    (tmp_path / "v.csv").write_text("img,sun,sea\na.jpg,1,0\n")
    table = read_csv_table(tmp_path / "v.csv", tmp_path, labels=["sea", "sun"])
    np.testing.assert_array_equal(table.targets, [[0, 1]])


@pytest.mark.parametrize("content,fragment", [
    ("img,x\na.jpg,maybe\n", r"t.csv:2: column 'x' has 'maybe'"),
    ("img,x\na.jpg,1,5\n", r"t.csv:2: 3 fields, the header has 2"),
    ("img,x\nmissing.jpg,1\nalso.jpg,0\n", r"2 of 2 images not found:\n  .*missing.jpg"),
    ("", "is empty"),
    ("img,x\n", "no rows"),
    ("img\na.jpg\n", "no label columns"),
])
def test_bad_csv_names_file_and_line(tmp_path, content, fragment):
    _images(tmp_path, ["a.jpg"])
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=fragment):
        read_csv_table(tmp_path / "t.csv", tmp_path)


def test_folder_binary_has_one_label_second_class_positive(folder_dataset):
    table = read_folder_table(folder_dataset / "train")
    assert table.labels == ["dog"] and table.targets.shape == (40, 1)
    assert table.targets.sum() == 20
    assert all(("/dog/" in p) == bool(t) for p, t in zip(table.paths, table.targets[:, 0]))


def test_folder_multilabel_task_gives_one_hot(folder_dataset):
    table = read_folder_table(folder_dataset / "train", task="multilabel")
    assert table.labels == ["cat", "dog"]
    np.testing.assert_array_equal(table.targets.sum(1), 1)


def test_iterative_split_keeps_label_proportions_and_empty_rows():
    rng = np.random.default_rng(0)
    targets = (rng.random((1000, 6)) < np.array([0.4, 0.2, 0.1, 0.05, 0.02, 0.01])).astype(np.float32)
    fold = iterative_split(targets, [0.7, 0.3], seed=3)
    assert set(np.unique(fold)) == {0, 1}
    assert abs((fold == 1).mean() - 0.3) < 0.01
    positives = targets.sum(0)
    in_val = targets[fold == 1].sum(0)
    # every label within one example (or 2 %) of its 30 % share
    assert np.all(np.abs(in_val - 0.3 * positives) <= np.maximum(1.0, 0.02 * positives))
    empty = targets.sum(1) == 0
    assert 0.25 < (fold[empty] == 1).mean() < 0.35
    np.testing.assert_array_equal(fold, iterative_split(targets, [0.7, 0.3], seed=3))


def test_build_splits_carves_val_and_test(scene_csv):
    cfg = load_config(None, [f"data.root={scene_csv}", "data.train=train.csv",
                             "data.val_fraction=0.25", "data.test_fraction=0.25"])
    splits = build_splits(cfg.data, seed=0)
    sizes = len(splits.train), len(splits.val), len(splits.test)
    assert sum(sizes) == 48 and sizes == (24, 12, 12)
    assert not set(splits.train.paths) & set(splits.val.paths)
    assert not set(splits.val.paths) & set(splits.test.paths)
