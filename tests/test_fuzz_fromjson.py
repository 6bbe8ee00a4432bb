"""Property test of ``mlabel tune --from-json``'s reader (:func:`mlabel.tune.read_thresholds`):
for any file (random JSON structures and values, truncated, with repeated keys, nested deep,
numbers of thousands of digits, bytes that are not UTF-8) the outcome is either the thresholds a
plain JSON parser finds in it, or one error the command line prints as one ``error:`` line naming
the file, never an "internal error"."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlabel.cli import describe_error
from mlabel.tune import read_thresholds

LABELS = ["circle", "square", "<!--<script>", "naïve label", "a\"b"]

scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True)
           | st.floats(0, 1) | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
names = st.sampled_from(LABELS) | st.text(max_size=8)
good_ish = st.fixed_dictionaries({"thresholds": st.dictionaries(names, st.floats(0, 1) | values, max_size=5)},
                                 optional={"note": values})
documents = good_ish | values


@st.composite
def files(draw) -> bytes:
    """The bytes of a thresholds file: a JSON document, perhaps damaged on purpose."""
    text = json.dumps(draw(documents))
    how = draw(st.sampled_from(["as is", "truncated", "repeated key", "nested", "huge number", "raw bytes"]))
    if how == "truncated":
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    elif how == "repeated key":
        label = draw(st.sampled_from(LABELS))
        text = '{"thresholds": {%s: 0.25, "square": 0.5, %s: %s}}' % (
            json.dumps(label), json.dumps(label), json.dumps(draw(st.floats(0, 1))))
    elif how == "nested":
        depth = draw(st.sampled_from([3, 500, 100_000]))
        text = '{"thresholds": ' + "[" * depth + text + "]" * depth + "}"
    elif how == "huge number":
        digits = "1" + "0" * draw(st.integers(300, 6000))
        text = '{"thresholds": {"circle": %s, "square": -%s}}' % (digits, digits)
    elif how == "raw bytes":
        return draw(st.binary(max_size=64))
    return text.encode("utf-8")


def _reference(raw: bytes) -> dict | None:
    """What the file holds by a plain reading (no duplicates, a thresholds object of label names to
    numbers in [0, 1]); None when the file is not such a document."""
    import math
    try:
        pairs_seen = []
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=lambda pairs: pairs_seen.append(pairs) or dict(pairs))
    except (ValueError, RecursionError):
        return None
    if any(len({k for k, _ in pairs}) != len(pairs) for pairs in pairs_seen):
        return None
    chosen = doc.get("thresholds") if isinstance(doc, dict) else None
    if not isinstance(chosen, dict) or not chosen:
        return None
    for name, value in chosen.items():
        if name not in LABELS or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            if not math.isfinite(value) or not 0 <= value <= 1:
                return None
        except OverflowError:
            return None
    return {name: float(value) for name, value in chosen.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=files())
def test_from_json_gives_the_file_s_thresholds_or_one_clean_error(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("fromjson") / "thresholds.json"
    path.write_bytes(raw)
    expected = _reference(raw)
    try:
        got = read_thresholds(str(path), LABELS)
    except Exception as err:  # noqa: BLE001 - every outcome is classified below
        line = describe_error(err)
        assert not line.startswith("internal error"), line
        assert str(path) in line and "\n" not in line and len(line) < 700, line
        assert expected is None, (line, expected)
        return
    assert got == expected
