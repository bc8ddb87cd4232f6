"""Lanes: which DIALS installation runs the programs of the validation, and
the check that every DIALS program on a PATH belongs to one interpreter
(also used by tests/conftest.py, so this module imports nothing heavy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

#: the DIALS installations the validation runs (besides ``this``: the
#: programs on PATH as they are)
LANES = ("debian", "current")

#: the current-DIALS environment (a conda-forge DIALS environment or a
#: virtualenv whose python imports dials): CURRENT_DIALS, as for ``make
#: test-current``, else the cached one of the development machines
DEFAULT_CURRENT_DIALS = os.environ.get("CURRENT_DIALS") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "dials-truncfix",
    "current-dials",
)


#: the DIALS programs a lane runs; all must belong to one interpreter
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


class StepError(RuntimeError):
    """A DIALS program failed (or a lane cannot run)."""


def without_truncfix_variable(env):
    """``env`` without DIALS_TRUNCFIX: no program corrects on read unless a
    dataset asks for it."""
    from dials_truncfix.settings import ENVIRONMENT_VARIABLE

    return {k: v for k, v in env.items() if k != ENVIRONMENT_VARIABLE}


def lane_environment(lane, current_dials=DEFAULT_CURRENT_DIALS, base=None):
    """The environment of the programs of ``lane``: debian = /usr/bin first
    on PATH and no LD_PRELOAD; current = the ``bin`` of the environment
    ``current_dials`` first on PATH (its programs run its own python, as in
    an activated conda environment), no LD_PRELOAD or PYTHONHOME;
    this = ``base`` as it is.  The PYTHONPATH of ``base`` is kept, so that
    the plugin under test is the same in every lane.  Never DIALS_TRUNCFIX
    (it is added for the dials.import of the on-read dataset only)."""
    base = without_truncfix_variable(os.environ if base is None else base)
    if lane == "this":
        return base
    if lane not in LANES:
        raise ValueError("unknown lane %r" % lane)
    bindir = "/usr/bin" if lane == "debian" else os.path.join(current_dials, "bin")
    if lane == "current" and not os.path.isfile(os.path.join(bindir, "dials.import")):
        raise StepError(
            "no DIALS programs in %s: name a current DIALS environment with CURRENT_DIALS=<prefix>"
            % bindir
        )
    env = {k: v for k, v in base.items() if k not in ("LD_PRELOAD", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(
        [bindir] + [p for p in base.get("PATH", "").split(os.pathsep) if p]
    )
    return env


def _interpreter(script):
    with open(script, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else None


def same_interpreter(a, b):
    """Whether two interpreter paths are one Python environment: compared by
    their resolved directories, since a virtualenv's python is a symlink to
    the base interpreter that realpath would make identical to it."""
    return bool(a and b) and os.path.realpath(os.path.dirname(a)) == os.path.realpath(
        os.path.dirname(b)
    )


def program_interpreters(search_path=None):
    """{program: (its path, the interpreter of its #! line)} for PROGRAMS on
    ``search_path`` (default: PATH); None for what is missing."""
    paths = {name: shutil.which(name, path=search_path) for name in PROGRAMS}
    return {name: (path, path and _interpreter(path)) for name, path in paths.items()}


_PROBE = """
import importlib.metadata as m, json, os, sys
import dials_truncfix
from dials.util.version import dials_version
from dials_truncfix.compat import trusted_range_is_inclusive
out = {"python": sys.executable, "dials_version": dials_version(),
       "plugin": os.path.dirname(os.path.realpath(dials_truncfix.__file__)),
       "plugin_version": dials_truncfix.__version__,
       "trusted_range_inclusive": trusted_range_is_inclusive()}
for name in ("dials", "dxtbx"):
    try:
        out[name] = m.version(name)
    except Exception:
        out[name] = None
print(json.dumps(out))
"""


def describe_lane(lane, env):
    """What ``lane`` runs: its programs' interpreter, DIALS and dxtbx versions
    and the plugin it imports.  Every program must be on the lane's PATH and
    run the same interpreter (else StepError)."""
    found = program_interpreters(env.get("PATH", ""))
    paths = {name: path for name, (path, _) in found.items()}
    interpreters = {name: interpreter for name, (_, interpreter) in found.items()}
    python = interpreters["dials.import"]
    wrong = [
        "%s: %s (runs %s)" % (name, paths[name] or "not on PATH", interpreters[name])
        for name in PROGRAMS
        if not same_interpreter(interpreters[name], python)
    ]
    if wrong:
        raise StepError(
            "lane %s: programs of different interpreters:\n  %s"
            % (lane, "\n  ".join(wrong))
        )
    result = subprocess.run(
        [python, "-c", _PROBE], env=env, capture_output=True, text=True
    )
    if result.returncode:
        raise StepError(
            "lane %s: %s cannot import DIALS and the plugin:\n%s"
            % (lane, python, result.stderr[-2000:])
        )
    info = json.loads(result.stdout.strip().splitlines()[-1])
    # Debian's DIALS names its version in dials_version() ("DIALS 3.12";
    # its package metadata says 3.9.dev0), current DIALS only in its
    # metadata (dials_version() is "DIALS 3.dev")
    if not re.search(r"\d+\.\d+", info["dials_version"]) and info["dials"]:
        info["dials_version"] = "DIALS " + info["dials"]
    info["lane"] = lane
    info["programs"] = os.path.dirname(paths["dials.import"])
    info["label"] = (
        {"debian": "Debian", "current": "current"}.get(lane, "PATH")
        + " "
        + info["dials_version"]
    )
    return info


def lane_order(lanes):
    return [l for l in LANES if l in lanes] + [l for l in lanes if l not in LANES]
