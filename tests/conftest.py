"""Every DIALS program a test runs must belong to the interpreter running the
tests: in the current-DIALS lane a program found elsewhere on PATH (Debian's
/usr/bin/dials.*) would silently test the other DIALS."""

from __future__ import annotations

import sys

import pytest

from devtools.validation.lanes import program_interpreters, same_interpreter


def pytest_sessionstart(session):
    wrong = []
    for name, (path, interpreter) in program_interpreters().items():
        if not same_interpreter(interpreter, sys.executable):
            wrong.append(f"{name}: {path or 'not on PATH'} (runs {interpreter})")
    if wrong:
        pytest.exit(
            f"DIALS programs that do not run {sys.executable}:\n  "
            + "\n  ".join(wrong),
            returncode=3,
        )
