"""The readers' vectorised fast paths give what their plain references give: YOLO's block parser
against its line-by-line parser, Open Images' run keys against np.unique (a forced key collision
included), sparse.unique_sorted against np.unique."""
import numpy as np
import pytest

from mlabel.data import openimages, yolo
from mlabel.data.sparse import unique_sorted


def _label_files(tmp_path, rng, n=60):
    """n label files: boxes, polygons, blank lines, CRLF, tabs, an empty and a missing file."""
    files = []
    for i in range(n):
        lines = []
        for k in range(int(rng.integers(0, 6))):
            c, x, y = int(rng.integers(0, 7)), rng.uniform(0, 0.9), rng.uniform(0, 0.9)
            if k % 3 == 2:
                pts = [x, y, x + 0.1, y, x + 0.05, y + 0.1, x, y + 0.05][:6 if i % 2 else 8]  # 3 or 4 points
                lines.append(f"{c} " + " ".join(f"{v:.5f}" for v in pts))
            else:
                lines.append(f"{c}\t{x:.6f} {y:.6f}  {rng.uniform(0, 0.2):.6f} {rng.uniform(0, 0.2):.6f}")
            if k == 1:
                lines.append("")
        path = tmp_path / f"{i}.txt"
        if i != 7:  # 7: missing
            path.write_bytes(("\r\n" if i % 5 == 0 else "\n").join(lines).encode())
        files.append(str(path))
    return files


def test_yolo_block_parser_equals_the_line_parser(tmp_path):
    files = _label_files(tmp_path, np.random.default_rng(1))
    contents = yolo._read_bytes(files)
    assert contents[7] is None and sum(c == b"" for c in contents) >= 1
    fast = yolo._parse_block(contents, 7)
    assert fast is not None
    problems = []
    slow = yolo._parse_slowly(files, contents, 7, problems)
    assert problems == []
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("line", ["7 0.5 0.5 0.1 0.1", "1 0.5 0.5 0.1", "1.5 0.5 0.5 0.1 0.1", "x 0.5 0.5 0.1 0.1",
                                  "1 0.5 nan 0.1 0.1", "1 0.5 1.2 0.1 0.1", "1 0.5 0.5 0.1 0.1 0.3"])
def test_yolo_block_parser_leaves_unusual_lines_to_the_line_parser(line):
    assert yolo._parse_block([b"0 0.5 0.5 0.1 0.1\n", line.encode()], 7) is None


def _reference(field):
    _, first, inverse = np.unique(field, return_index=True, return_inverse=True)
    return field[first][inverse.reshape(-1)]


def test_openimages_run_keys_equal_np_unique():
    rng = np.random.default_rng(0)
    values = np.array([f"{k:016x}".encode() for k in rng.integers(0, 2**40, 300)])
    field = values[np.sort(rng.integers(0, 300, 5000))]  # runs, as in Open Images' files
    field[::7] = values[rng.integers(0, 300, len(field[::7]))]  # and values out of order
    first, inverse = openimages._codes(field)
    np.testing.assert_array_equal(field[first][inverse], field)
    assert len(first) == len(np.unique(field)) and all(first[inverse[i]] <= i for i in range(len(field)))
    short = np.array([b"/m/0a", b"/m/0bc", b"/m/0a", b"/m/0d"])
    first, inverse = openimages._codes(short)
    np.testing.assert_array_equal(short[first][inverse], _reference(short))


def test_openimages_run_keys_fall_back_on_a_collision():
    a = np.frombuffer(b"AAAAAAAABBBBBBBB", np.uint64)
    c0 = np.frombuffer(b"CCCCCCCC", np.uint64)[0]
    with np.errstate(over="ignore"):  # a second value with the same key: w0 * MIX ^ w1 agrees
        c1 = (a[0] * openimages._MIX ^ a[1]) ^ (c0 * openimages._MIX)
    other = np.array([c0, c1], np.uint64).tobytes()
    assert other[-1] != 0  # (S arrays drop trailing zero bytes)
    w = np.frombuffer(other, np.uint64)
    with np.errstate(over="ignore"):
        assert w[0] * openimages._MIX ^ w[1] == a[0] * openimages._MIX ^ a[1]  # the keys collide
    field = np.array([b"AAAAAAAABBBBBBBB", other, other, b"AAAAAAAABBBBBBBB"], dtype="S16")
    first, inverse = openimages._codes(field)
    np.testing.assert_array_equal(field[first][inverse], field)
    assert len(first) == 2


def test_unique_sorted_equals_np_unique():
    rng = np.random.default_rng(3)
    for values in (rng.integers(0, 10**12, 10_000), rng.integers(0, 5, 100), np.zeros(0, np.int64)):
        np.testing.assert_array_equal(unique_sorted(values), np.unique(values))


def test_yolo_list_file_naming_a_missing_image_is_refused_with_the_list(tmp_path):
    from mlabel.errors import DataError
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    (tmp_path / "train.txt").write_text("./images/a.jpg\n./images/gone.jpg\n")
    (tmp_path / "data.yaml").write_text("train: train.txt\nnames: [cat]\n")
    with pytest.raises(DataError, match=r"train.txt: 1 of 2 images not found:\n  .*gone.jpg"):
        yolo.read_yolo_table(tmp_path / "data.yaml", "train")
