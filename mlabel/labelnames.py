"""What a label name may be: the one rule set that :func:`mlabel.load` enforces on ``mlabel.json``
and the data readers enforce when they build the label order, so that no run trains a model that
load would then refuse. Needs nothing beyond the standard library (the ONNX path uses it too)."""
from __future__ import annotations

from typing import Sequence

from .errors import DataError

__all__ = ["check_label_names"]


def check_label_names(names, source, where: Sequence[str] | None = None) -> list[str]:
    """``names`` as a list, after checking that it is a non-empty list of distinct, non-empty strings.

    Args:
        names: the label names in output order.
        source: the file (or key) they come from, named in the error.
        where: per name, where it stands in ``source`` (e.g. ``"header column 3"``); default
            ``"label N"``.

    Raises:
        DataError: naming ``source``, the place of the offending name and the fix.
    """
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{source}: labels must be a non-empty list of names, got {names!r:.80}")
    places = list(where) if where is not None else [f"label {i + 1}" for i in range(len(names))]
    for place, name in zip(places, names):
        if not isinstance(name, str):
            raise DataError(f"{source}: {place} is {name!r:.80}, not a name; labels must be a list of names")
        if not name:
            raise DataError(f"{source}: {place} has an empty label name; name it, or remove the column or "
                            "entry (a trailing comma in a CSV header makes one)")
    seen: dict[str, str] = {}
    for place, name in zip(places, names):
        if name in seen:
            raise DataError(f"{source}: labels repeat a name: {name!r} is {seen[name]} and {place}; give each "
                            "label its own name")
        seen[name] = place
    return list(names)
