"""The README says what the code does: its parameter table lists every PHIL
parameter of dials.correct_truncation with its real default."""

from __future__ import annotations

import os
import re

from dials_truncfix.command_line.correct_truncation import phil_scope

README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"
)


def _phil_defaults():
    defaults = {}
    for definition in phil_scope.all_definitions():
        path = definition.path
        if path.startswith("input."):
            continue  # DIALS' own input parameters
        words = definition.object.words
        value = " ".join(w.value for w in words)
        if definition.object.type.phil_type == "choice":
            value = next(w.value[1:] for w in words if w.value.startswith("*"))
        defaults[path] = value
    return defaults


def _readme_table():
    rows = re.findall(
        r"^\| `([a-z_.]+)` \| `([^`]*)` \|", open(README).read(), flags=re.M
    )
    return dict(rows)


def test_readme_lists_every_parameter_with_its_default():
    assert _readme_table() == _phil_defaults()


def test_example_phil_files_are_valid():
    """Every file in phil/ parses for dials.correct_truncation; those without
    program parameters also for DIALS_TRUNCFIX at dials.import."""
    import glob

    import iotbx.phil

    from dials_truncfix.phil import read_phil_file

    files = sorted(glob.glob(os.path.join(os.path.dirname(README), "phil", "*.phil")))
    assert len(files) >= 3
    for path in files:
        _, unused = phil_scope.fetch(
            source=iotbx.phil.parse(file_name=path), track_unused_definitions=True
        )
        assert not unused, path
        if "output" not in open(path).read():
            read_phil_file(path)
