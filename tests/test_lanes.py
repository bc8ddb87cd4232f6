"""The current-DIALS lane runs in an environment that already exists: where
there is none it is skipped with one line saying how to enable it, a
CURRENT_DIALS given by the user that is no DIALS environment is an error,
and nothing in the project builds DIALS."""

from __future__ import annotations

import os
import subprocess

import pytest

from devtools.validation.lanes import StepError, lane_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(target, tmp_path, **variables):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CURRENT_DIALS", "MAKEFLAGS", "MAKELEVEL")
    }
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no cached environment there
    args = ["make", "--no-print-directory", "-C", ROOT, target] + [
        f"{k}={v}" for k, v in variables.items()
    ]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", ["test-current", "setup-current"])
def test_a_missing_default_environment_skips_the_lane_with_one_line(tmp_path, target):
    result = _make(target, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"make {target}: skipped, no current DIALS environment at {tmp_path / 'cache'}"
    )
    assert "CURRENT_DIALS=" in lines[0]


def test_a_given_environment_that_is_not_dials_is_an_error(tmp_path):
    (tmp_path / "env" / "bin").mkdir(parents=True)
    result = _make("test-current", tmp_path, CURRENT_DIALS=tmp_path / "env")
    assert result.returncode != 0
    assert f"CURRENT_DIALS={tmp_path / 'env'}" in result.stderr
    assert "cannot import dials" in result.stderr


def test_nothing_in_the_project_builds_dials():
    """No build of dxtbx or DIALS and no path to withdrawn third-party sources
    in what CI and the developers run."""
    for name in ("Makefile", ".ci/run"):
        text = open(os.path.join(ROOT, name)).read()
        assert "upstream" not in text, name
        assert "cmake" not in text.lower(), name


def test_the_current_lane_puts_the_environment_first_on_path(tmp_path):
    prefix = tmp_path / "dials-env"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "dials.import").write_text("#!/bin/sh\n")
    base = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": "/checkout",
        "LD_PRELOAD": "x.so",
        "DIALS_TRUNCFIX": "1",
    }
    env = lane_environment("current", str(prefix), base)
    assert env["PATH"].split(os.pathsep)[0] == str(prefix / "bin")
    assert (
        env["PYTHONPATH"] == "/checkout"
    )  # the plugin under test is the same in every lane
    assert "LD_PRELOAD" not in env and "DIALS_TRUNCFIX" not in env
    with pytest.raises(StepError, match="CURRENT_DIALS"):
        lane_environment("current", str(tmp_path / "nothing"), base)
