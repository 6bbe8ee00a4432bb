"""Property tests (issue 27, section 3): the readers of labels.json, the shard index and the
samples' JSON take random structures and values; every outcome is a table or a user error whose
message names the data's folder, never another exception type."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mlabel.data.shards import Vocabulary, read_wds_table
from mlabel.data.shards.read import scan_split
from mlabel.data.tables import LabelTable
from mlabel.errors import UserError

LABELS = ["a", "b", "c"]
SAMPLES = [("k0", {"labels": ["a"]}), ("k1", {"labels": ["b", "c"], "unknown": ["a"]}), ("k2", {"labels": []})]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, samples) -> None:
    """A shard of (key, JSON bytes) samples, each with a small PNG."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, meta in samples:
            for name, data in ((f"{key}.png", _png()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One valid shard ``s.tar`` of three samples, and its index ``s.index.npz``."""
    root = tmp_path_factory.mktemp("fuzz")
    _tar(root / "s.tar", [(k, json.dumps(m).encode()) for k, m in SAMPLES])
    arrays, problems = scan_split([root / "s.tar"], Vocabulary(root / "labels.json", LABELS, "negative", {}))
    assert not problems
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (root / "s.index.npz").write_bytes(buffer.getvalue())
    return root


def _outcome(root: Path, spec: str):
    """The table read, or None after a user error naming the folder; anything else fails."""
    try:
        table = read_wds_table(root, spec)
    except UserError as err:
        assert str(root) in str(err), str(err)
        return None
    assert isinstance(table, LabelTable)
    table.dense_targets()  # usable as read
    return table


def _entry(root: Path) -> dict:
    data = (root / "s.index.npz").read_bytes()
    return {"shards": ["s.tar"], "samples": [3], "bytes": [(root / "s.tar").stat().st_size], "index": "s.index.npz",
            "index_bytes": len(data), "index_sha256": hashlib.sha256(data).hexdigest()}


def _maybe(valid, other):
    return st.one_of(st.just(valid), other)


@FUZZ
@given(data=st.data())
def test_labels_json_of_any_shape(folder, data):
    entry = _entry(folder)
    fields = {name: _maybe(value, json_values | st.lists(st.integers(-3, 2**64), max_size=3))
              for name, value in entry.items()}
    fields["shards"] = _maybe(["s.tar"], json_values | st.lists(
        st.sampled_from(["s.tar", "missing.tar", "/abs.tar", "http://127.0.0.1:9/s.tar", ""]), max_size=3))
    split = st.fixed_dictionaries({}, optional=fields)
    tree = data.draw(st.one_of(json_values, st.fixed_dictionaries({
        "labels": _maybe(LABELS, json_values | st.lists(st.sampled_from(["a", "b", "c", "", "d"]), max_size=4)),
        "splits": _maybe({"train": entry}, json_values | st.dictionaries(st.sampled_from(["train", "s.tar"]),
                                                                         split | json_values, max_size=2)),
    }, optional={"default": st.sampled_from(["negative", "unknown"]) | json_values})))
    (folder / "labels.json").write_text(json.dumps(tree))
    table = _outcome(folder, "train")
    if table is not None:
        assert len(table) == 3 and [p.rsplit("#", 1)[1] for p in table.paths] == ["k0", "k1", "k2"]


def _fitting(dtype: np.dtype):
    """Any value the array's dtype can hold, at the edges of its range included."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    if dtype.kind == "f":
        return st.floats(width=dtype.itemsize * 8)
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind == "S":
        return st.binary(max_size=dtype.itemsize)
    return st.text(max_size=3)


def _mutated(arrays: dict, draw) -> dict:
    """Each array kept, dropped, replaced by a random one, or with one value changed."""
    out = {}
    for name, values in arrays.items():
        how = draw(st.sampled_from(["keep", "keep", "drop", "random", "poke"]))
        if how == "keep":
            out[name] = values
        elif how == "random":
            out[name] = draw(hnp.arrays(st.sampled_from([np.int8, np.int32, np.int64, np.uint64, np.float64, "U3",
                                                         "S3", np.bool_]),
                                        hnp.array_shapes(min_dims=0, max_dims=2, max_side=4)))
        elif how == "poke" and len(values):
            values = values.copy()
            values[draw(st.integers(0, len(values) - 1))] = draw(_fitting(values.dtype))
            out[name] = values
    return out


@FUZZ
@given(data=st.data())
def test_shard_index_of_any_content(folder, data):
    with np.load(folder / "s.index.npz") as saved:
        arrays = _mutated({k: saved[k] for k in saved.files}, data.draw)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw = buffer.getvalue()
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    raw = raw if cut is None else raw[:cut]
    index = folder / "fuzz.index.npz"
    index.write_bytes(raw)
    entry = {**_entry(folder), "index": "fuzz.index.npz", "index_bytes": max(len(raw), 1),
             "index_sha256": hashlib.sha256(raw).hexdigest()}  # hostile data consistent with itself
    if data.draw(st.booleans()):
        del entry["samples"]
    (folder / "labels.json").write_text(json.dumps({"labels": LABELS, "splits": {"train": entry}}))
    table = _outcome(folder, "train")
    if table is not None:  # every image inside its shard, every label in the vocabulary
        size = (folder / "s.tar").stat().st_size
        assert all(0 <= offset <= offset + length <= size for _, offset, length in table.members)
        assert table.dense_targets().shape == (len(table), 3)


keys = st.text(st.characters(blacklist_characters="/.\0", blacklist_categories=("Cs",)), min_size=1, max_size=6)


@FUZZ
@given(samples=st.lists(st.tuples(keys, json_values | st.binary(max_size=20) | st.fixed_dictionaries({}, optional={
    "labels": st.lists(st.sampled_from(LABELS + ["z"]), max_size=3) | json_values,
    "unknown": st.lists(st.sampled_from(LABELS), max_size=3) | json_values})), min_size=1, max_size=4,
    unique_by=lambda s: s[0]))
def test_sample_json_of_any_content(folder, samples):
    shard = folder / "j.tar"
    _tar(shard, [(k, m if isinstance(m, bytes) else json.dumps(m).encode()) for k, m in samples])
    (folder / "labels.json").write_text(json.dumps({"labels": LABELS}))
    table = _outcome(folder, "j.tar")
    if table is None:
        return
    assert [p.split(".tar#", 1)[1] for p in table.paths] == [k for k, _ in samples]
    for row, (_, meta) in enumerate(samples):  # the labels as the JSON says, positive before unknown
        expected = np.zeros(3)
        expected[[LABELS.index(n) for n in meta.get("unknown", [])]] = -1
        expected[[LABELS.index(n) for n in meta.get("labels", [])]] = 1
        np.testing.assert_array_equal(table.dense_targets()[row], expected)
