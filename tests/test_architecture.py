"""The house's boundaries (issue 28): the package's import graph has no circle, no module
imports the package root, and no private name crosses a module boundary; functions stay short.
The checks are tools/import_graph.py's and tools/function_lengths.py's, run on mlabel/."""
import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["circles", "upward", "private"])
def test_import_graph(kind):
    found = _tool("import_graph").problems(ROOT / "mlabel")
    assert found[kind] == [], f"{kind}: " + "; ".join(found[kind])


def test_the_checker_finds_what_it_looks_for(tmp_path):
    """The control: a package made to break each rule is caught on each."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = '1'\n")
    (package / "a.py").write_text("from .b import thing\nfrom . import __version__\n")
    (package / "b.py").write_text("def thing():\n    from .a import _hidden\n")
    found = _tool("import_graph").problems(package)
    assert found["circles"] == ["pkg.a <-> pkg.b"]
    assert found["upward"] == ["pkg.a:2 imports pkg itself (__version__)"]
    assert found["private"] == ["pkg.b:2 imports pkg.a._hidden"]


def test_functions_stay_short():
    lengths = [n for n, _ in _tool("function_lengths").lengths(ROOT / "mlabel")]
    assert statistics.median(lengths) <= 10 and max(lengths) <= 50, (statistics.median(lengths), max(lengths))


def test_functions_take_at_most_seven_parameters():
    """Every named parameter counts (keyword-only, ``*args`` and ``**kwargs`` too); ``self`` and
    ``cls`` of methods do not. Values that travel together go in a dataclass."""
    over = [f"{where} ({n})" for n, where in _tool("function_lengths").parameters(ROOT / "mlabel") if n > 7]
    assert over == [], "; ".join(over)


def test_the_parameter_count_is_the_real_argument_count(tmp_path):
    """The control: every kind of parameter counts, self and cls do not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("def f(a, /, b, *c, d, e=1, **g):\n    pass\n\n"
                                  "class K:\n    def m(self, a, b):\n        pass\n\n"
                                  "    @classmethod\n    def n(cls, a):\n        pass\n")
    found = {where.split()[-1]: n for n, where in _tool("function_lengths").parameters(package)}
    assert found == {"f": 6, "m": 2, "n": 1}
