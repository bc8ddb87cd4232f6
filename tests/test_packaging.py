"""The package as it is released: its metadata in pyproject.toml (the version
from dials_truncfix.__version__ alone), setup.py a shim, a LICENSE, the
metadata setuptools builds from them, and the libtbx module files as libtbx
itself reads and runs them. make test-release builds and runs the wheel."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the entry points of the package (the console script and dxtbx's format classes),
#: as make test-release checks them in the wheel
from devtools.release_check import ENTRY_POINTS  # noqa: E402


def _pyproject():
    import tomllib  # Python 3.11, the oldest lane

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def _package_files():
    return sorted(
        glob.glob(os.path.join(ROOT, "dials_truncfix", "**", "*.py"), recursive=True)
    )


def _source_copy(destination):
    """What setuptools needs to build the package, copied from the checkout."""
    for name in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "LICENSE",
        "MANIFEST.in",
        "libtbx_config",
        "libtbx_refresh.py",
    ):
        shutil.copy2(os.path.join(ROOT, name), destination)
    shutil.copytree(
        os.path.join(ROOT, "dials_truncfix"),
        os.path.join(destination, "dials_truncfix"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )


def test_the_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "dials_truncfix.__version__"
    }
    assignments = [
        path
        for path in _package_files()
        if re.search(r"^__version__ =", open(path).read(), flags=re.M)
    ]
    assert assignments == [os.path.join(ROOT, "dials_truncfix", "__init__.py")]


def test_setup_py_is_a_shim():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    # the docstring and the future import DIALS' ruff settings require aside
    future = ast.dump(ast.parse("from __future__ import annotations").body[0])
    body = [
        node
        for node in tree.body
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        and ast.dump(node) != future
    ]
    assert [ast.dump(node) for node in body] == [
        ast.dump(ast.parse("from setuptools import setup").body[0]),
        ast.dump(ast.parse("setup()").body[0]),
    ]


def test_license():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert (
        text.startswith("BSD 3-Clause License")
        and "the dials-truncfix developers" in text
    )
    assert _pyproject()["project"]["license"] == {"text": "BSD-3-Clause"}


def test_metadata_as_setuptools_builds_it(tmp_path):
    """The wheel's metadata from the build backend's own hook: name, the
    version of __init__.py, dependencies, extras and the entry points."""
    from dials_truncfix import __version__

    source = tmp_path / "source"
    source.mkdir()
    _source_copy(source)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))",
            str(tmp_path),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    info = tmp_path / out
    headers = (info / "METADATA").read_text().split("\n\n")[0]
    fields = [line.split(": ", 1) for line in headers.splitlines() if ": " in line]
    get = lambda key: [value for k, value in fields if k == key]  # noqa: E731
    assert get("Name") == ["dials-truncfix"] and get("Version") == [__version__]
    assert get("Requires-Python") == [_pyproject()["project"]["requires-python"]]
    # setuptools < 67 writes a version in parentheses: "x (>=1)"
    requires = {
        re.sub(r"\((.*?)\)", r"\1", value.replace(" ", "").replace("'", '"'))
        for value in get("Requires-Dist")
    }
    assert {
        "numpy",
        "scipy",
        'pytest;extra=="test"',
        'hypothesis;extra=="test"',
        'plotly;extra=="report"',
        'dask-jobqueue>=0.8.2;extra=="cluster"',
    } <= requires
    assert not any(
        name in value for value in requires for name in ("dials", "dxtbx", "cctbx")
    )
    found, group = set(), None
    for line in (info / "entry_points.txt").read_text().splitlines():
        if line.startswith("["):
            group = line.strip().strip("[]")
        elif "=" in line:
            found.add((group, *(part.strip() for part in line.split("=", 1))))
    assert found == ENTRY_POINTS

    from devtools.release_check import ENTRY_POINTS as checked_by_make_test_release

    assert checked_by_make_test_release == ENTRY_POINTS


def test_no_newer_python_than_requires_python():
    """Every module of the package parses as the oldest Python allowed, and
    annotations (builtin generics, unions) are never evaluated."""
    oldest = tuple(
        int(n)
        for n in re.fullmatch(
            r">=(\d+)\.(\d+)", _pyproject()["project"]["requires-python"]
        ).groups()
    )
    for path in _package_files():
        text = open(path).read()
        tree = ast.parse(text, path, feature_version=oldest)
        annotated = any(
            isinstance(node, ast.AnnAssign)
            or (isinstance(node, ast.arg) and node.annotation)
            or (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.returns
            )
            for node in ast.walk(tree)
        )
        assert not annotated or "from __future__ import annotations" in text, path


class _Environment:
    """What libtbx's module class asks of its environment here."""

    explicitly_requested_modules: set = set()


def test_libtbx_reads_the_module_configuration():
    """libtbx's own module class (libtbx.env_config.module) reads libtbx_config:
    dxtbx and dials required for use, nothing for the build, and only keys it
    knows; the checkout goes on the build's PYTHONPATH."""
    import inspect

    import libtbx.env_config
    from libtbx.path import absolute_path

    config = eval(
        open(os.path.join(ROOT, "libtbx_config")).read(), {}, {}
    )  # as libtbx evaluates it
    known = set(
        re.findall(
            r"config\.get\(\s*\"(\w+)\"", inspect.getsource(libtbx.env_config.module)
        )
    )
    assert set(config) <= known, set(config) - known
    module = libtbx.env_config.module(
        env=_Environment(), name="dials_truncfix", dist_path=absolute_path(ROOT)
    )
    module.process_libtbx_config()
    assert module.required_for_use == ["dxtbx", "dials"]
    assert module.required_for_build == [] and module.optional == []
    assert [abs(p) for p in module.assemble_pythonpath()] == [ROOT]


LIBTBX_REFRESH = """
import json, sys
import libtbx.env_config
from libtbx.path import absolute_path

class Environment:
    explicitly_requested_modules = set()

module = libtbx.env_config.module(env=Environment(), name="dials_truncfix", dist_path=absolute_path(sys.argv[1]))
before = set(vars(libtbx.env_config))
module.process_libtbx_refresh_py()  # libtbx's own code: exec() of libtbx_refresh.py in env_config's namespace
print(json.dumps({"added": sorted(set(vars(libtbx.env_config)) - before),
                  "pythonpath": [abs(p) for p in module.assemble_pythonpath()]}))
"""

IN_THE_BUILD = """
import importlib.metadata as md, json, os, sys
import dials_truncfix
from dxtbx.format.Registry import get_format_class_index
cls = get_format_class_index()["FormatATruncfix"][0]()
dist = md.distribution("dials-truncfix")
print(json.dumps({"package": dials_truncfix.__file__, "format_class": sys.modules[cls.__module__].__file__,
                  "distribution": str(dist._path), "direct_url": json.loads(dist.read_text("direct_url.json")),
                  "script": os.path.isfile(os.path.join(sys.prefix, "bin", "dials.correct_truncation"))}))
"""


@pytest.mark.slow
def test_libtbx_refresh_installs_the_checkout_into_the_build_python(tmp_path):
    """A DIALS source build as far as it can be without one: libtbx's module
    class runs libtbx_refresh.py for a copy of the checkout (as a module in
    modules/dials_truncfix) under a fresh environment's Python standing in for
    the build's. The package is installed editable there (metadata, entry
    points, console script), libtbx's PYTHONPATH for the module imports it
    from the copy, dxtbx's registry finds the format classes there, and the
    refresh leaves one name of its own in env_config's namespace."""
    from devtools.release_check import fresh_environment

    module_path = tmp_path / "modules" / "dials_truncfix"
    module_path.mkdir(parents=True)
    _source_copy(module_path)
    python, env, _ = fresh_environment(sys.executable, str(tmp_path / "build-python"))
    result = subprocess.run(
        [python, "-c", LIBTBX_REFRESH, str(module_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    refresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert refresh["added"] == ["_dials_truncfix_libtbx_refresh", "self"]
    assert refresh["pythonpath"] == [str(module_path)]
    result = subprocess.run(
        [python, "-c", IN_THE_BUILD],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(env, PYTHONPATH=os.pathsep.join(refresh["pythonpath"])),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["package"] == str(module_path / "dials_truncfix" / "__init__.py")
    assert found["format_class"] == str(
        module_path / "dials_truncfix" / "format_wrapper.py"
    )
    assert found["distribution"].startswith(str(tmp_path / "build-python") + os.sep)
    assert found["direct_url"] == {
        "url": module_path.as_uri(),
        "dir_info": {"editable": True},
    }
    assert found["script"]
