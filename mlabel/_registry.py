"""Registries of pluggable parts (heads, losses): a name maps to a class, and a part's settings
are the keyword arguments of its constructor, checked against its signature."""
from __future__ import annotations

import difflib
import inspect

# Arguments the framework passes itself, never taken from a config.
FRAMEWORK_ARGS = ("self", "pos_weight", "reduction", "in_features", "num_labels")


def settable(cls: type) -> list[str]:
    """The keyword arguments of ``cls`` a config may set."""
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in FRAMEWORK_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def checked(registry: dict, name: str, args: dict, what: str) -> type:
    """The class registered as ``name``, after checking that ``args`` are its arguments."""
    if name not in registry:
        close = difflib.get_close_matches(str(name), list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint}; available: {sorted(registry)}")
    cls = registry[name]
    valid = settable(cls)
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"{what} {name!r} takes no argument {unknown}; its arguments: {valid}")
    return cls
