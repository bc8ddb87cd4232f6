"""Where DIALS and dxtbx versions differ, and where dxtbx's own behaviour
has to be worked around, in one place.

Supported: Debian's DIALS 3.12 / dxtbx 3.11 and current DIALS 3.2x /
dxtbx 3.2x.  Each difference is detected by what the installed library does
or offers, not by its version string (Debian's dials reports 3.9.dev0).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys


@functools.lru_cache(maxsize=None)
def trusted_range_is_inclusive() -> bool:
    """dxtbx >= 3.12 counts a pixel v as valid when min <= v <= max; dxtbx
    3.11 and earlier when min < v < max."""
    from dxtbx.model import Panel
    from scitbx.array_family import flex

    panel = Panel()
    panel.set_image_size((1, 1))
    panel.set_trusted_range((0, 10))
    return bool(panel.get_trusted_range_mask(flex.int(flex.grid(1, 1), 0))[0])


def valid_integer_range(trusted_range: tuple) -> tuple[int, int]:
    """(lowest, highest) integer pixel value that a panel with this trusted
    range counts as valid."""
    low, high = trusted_range
    if trusted_range_is_inclusive():
        return math.ceil(low), math.floor(high)
    return math.floor(low) + 1, math.ceil(high) - 1


def trusted_range_for(lowest: int, highest: int) -> tuple[float, float]:
    """A trusted range under which exactly the integers lowest..highest are
    valid pixel values."""
    if trusted_range_is_inclusive():
        return float(lowest), float(highest)
    return float(lowest - 1), float(highest + 1)


def available_cores() -> int:
    """The number of processors DIALS would use for nproc=Auto: DIALS 3.19
    moved it from dials.util.mp.available_cores to dials.util.system."""
    try:
        from dials.util.system import CPU_COUNT
    except ImportError:
        from dials.util.mp import available_cores as cores

        return cores()
    return CPU_COUNT


def unmangled_path(name, scheme: str) -> str | None:
    """The file path inside ``name`` if dxtbx mangled a URL of ``scheme``
    into a path, else None.  dxtbx (3.11 and current alike) resolves an
    experiment list's sequence template as a path relative to the list's
    directory even when it is a URL, so ``scheme:///a/b_#####.img`` comes
    back as ``<dir>/scheme:/a/b_#####.img``."""
    match = re.match(r"^.*/" + re.escape(scheme) + r":(/.*)$", os.fspath(name))
    return match.group(1) if match else None


#: (module, class or None, function): the dxtbx functions that write an
#: imageset's file names into a record that is read back (an experiment
#: list; the legacy datablock and imageset dictionaries where dxtbx has them)
IMAGESET_SERIALISERS = (
    ("dxtbx.model", "ExperimentList", "to_dict"),
    ("dxtbx.datablock", "DataBlock", "to_dict"),
    ("dxtbx.serialize.imageset", None, "basic_imageset_to_dict"),
    ("dxtbx.serialize.imageset", None, "imagesequence_to_dict"),
)


def imageset_serialiser_code() -> set:
    """The code objects of the IMAGESET_SERIALISERS this dxtbx has, among the
    modules already imported (a function of a module not imported is not
    running; importing dxtbx.datablock warns in current dxtbx)."""
    found = set()
    for module, owner, name in IMAGESET_SERIALISERS:
        target = sys.modules.get(module)
        if owner is not None:
            target = getattr(target, owner, None)
        code = getattr(getattr(target, name, None), "__code__", None)
        if code is not None:
            found.add(code)
    return found
