"""Issue 28, item 3: a config resolved once. ``mlabel.config`` is a leaf (keys, types, ranges,
YAML; the checks against timm and the registries are :mod:`mlabel.checks`')."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"errors"}  # what mlabel.config may import from mlabel: modules that import nothing of it


def test_config_is_a_leaf_that_imports_neither_torch_nor_timm():
    code = ("import sys, mlabel.config as c; c.load_config('quickstart', ['train.epochs=2']); "
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_config_imports_only_leaf_modules_of_mlabel():
    tree = ast.parse((ROOT / "mlabel" / "config.py").read_text())
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    absolute = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
                if a.name.startswith("mlabel")]
    assert set(relative) <= LEAVES and absolute == [], (relative, absolute)
