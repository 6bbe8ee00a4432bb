"""data.label_file: a text file of the labels to train on (one name, or Open Images /m/ id, a line)
gives the same splits as data.labels listing them; malformed files are refused with the line."""
import pytest

from mlabel.config import ConfigError, load_config
from mlabel.data import build_splits
from mlabel.errors import DataError

from test_formats_openimages import IDS, write_openimages, _data


def test_label_file_of_ids_and_names_equals_data_labels(tmp_path):
    write_openimages(tmp_path / "oi", counts=(12, 6))
    (tmp_path / "oi" / "keep.txt").write_text(f"\ufeff{IDS[5]}\n\ncircle\r\n")  # BOM, blank and CRLF lines
    by_file = build_splits(_data(tmp_path / "oi", "data.label_file=keep.txt"), "multilabel")  # relative to root
    by_list = build_splits(_data(tmp_path / "oi", "data.labels=[star,circle]"), "multilabel")
    assert by_file.labels == by_list.labels == ["star", "circle"]
    for a, b in ((by_file.train, by_list.train), (by_file.val, by_list.val)):
        assert a.paths == b.paths
        assert (a.dense_targets() == b.dense_targets()).all()


@pytest.mark.parametrize("text,fragment", [("star\ncircle\nstar\n", "keep.txt:3: label 'star' is also on line 1"),
                                           ("\n \n", "lists no labels")])
def test_bad_label_file_names_the_line(tmp_path, text, fragment):
    write_openimages(tmp_path / "oi", counts=(6, 3))
    (tmp_path / "oi" / "keep.txt").write_text(text)
    with pytest.raises(DataError, match=fragment):
        build_splits(_data(tmp_path / "oi", "data.label_file=keep.txt"), "multilabel")


def test_label_file_missing_or_given_with_labels(tmp_path):
    write_openimages(tmp_path / "oi", counts=(6, 3))
    with pytest.raises(DataError, match="data.label_file .*nowhere.txt not found"):
        build_splits(_data(tmp_path / "oi", "data.label_file=nowhere.txt"), "multilabel")
    with pytest.raises(ConfigError, match="either data.labels or data.label_file"):
        load_config(None, ["data.labels=[a]", "data.label_file=x.txt"])
