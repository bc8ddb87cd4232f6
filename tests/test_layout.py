"""The layout shows the architecture, and the imports keep to it: the core
imports no DIALS code, the installed package no development tool, and no
module imports another's private (underscore) names."""

from __future__ import annotations

import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
    """(module, names) of every import in a file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, [alias.name for alias in node.names]


def _files(pattern):
    return sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True))


def test_core_imports_only_numpy_scipy_and_itself():
    allowed = ("numpy", "scipy", "dials_truncfix.core")
    for path in _files("dials_truncfix/core/*.py"):
        for module, _ in _imports(path):
            top = module.split(".")[0]
            assert (
                module.startswith(allowed)
                or top in sys.stdlib_module_names
                or top == "__future__"
            ), (path, module)


def test_package_imports_no_development_tool():
    for path in _files("dials_truncfix/**/*.py"):
        assert all(not module.startswith("devtools") for module, _ in _imports(path)), (
            path
        )


def test_no_private_names_imported_across_modules():
    for path in (
        _files("dials_truncfix/**/*.py")
        + _files("devtools/*.py")
        + _files("tests/*.py")
        + _files("benchmarks/*.py")
    ):
        for module, names in _imports(path):
            if module.startswith(("dials_truncfix", "devtools")):
                private = [
                    n for n in names if n.startswith("_") and not n.startswith("__")
                ]
                assert not private, (path, module, private)


def test_no_private_names_of_the_package_used_across_modules():
    """Nor reached as attributes: ``module._name`` of a project module
    imported under a name (tests and tools use the public API)."""
    for path in (
        _files("dials_truncfix/**/*.py")
        + _files("devtools/**/*.py")
        + _files("tests/*.py")
        + _files("benchmarks/*.py")
    ):
        tree = ast.parse(open(path).read(), path)
        modules = set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module.startswith(("dials_truncfix", "devtools"))
            ):
                modules |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                modules |= {
                    alias.asname
                    for alias in node.names
                    if alias.asname and alias.name.startswith("dials_truncfix")
                }
        private = sorted(
            f"{node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        )
        assert not private, (path, private)
