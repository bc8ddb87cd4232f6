"""Every DIALS program a test runs must belong to the interpreter running the
tests: in the current-DIALS lane a program found elsewhere on PATH (Debian's
/usr/bin/dials.*) would silently test the other DIALS."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

PROGRAMS = (
    "dials.import",
    "dials.find_spots",
    "dials.index",
    "dials.refine",
    "dials.integrate",
    "dials.scale",
    "dials.export",
    "dials.correct_truncation",
)


def _interpreter(script):
    with open(script, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else None


def pytest_sessionstart(session):
    wrong = []
    for name in PROGRAMS:
        path = shutil.which(name)
        interpreter = path and _interpreter(path)
        if not interpreter or os.path.realpath(interpreter) != os.path.realpath(sys.executable):
            wrong.append(f"{name}: {path or 'not on PATH'} (runs {interpreter})")
    if wrong:
        pytest.exit(
            f"DIALS programs that do not run {sys.executable}:\n  " + "\n  ".join(wrong), returncode=3
        )
