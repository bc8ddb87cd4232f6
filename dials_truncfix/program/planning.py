"""Planning a run of dials.correct_truncation: one plan per imageset
(sweep) with its output file names, and the checks that no output replaces
an input or, unless asked, an existing file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dials_truncfix.corrector import image_identity

EXTENSIONS = {"cbf": ".cbf", "smv": ".img"}
ON_READ = "on_read"


class TruncationInputError(RuntimeError):
    """Input that cannot be corrected (reported as a one-line error)."""


@dataclass
class SweepPlan:
    number: int
    imageset: object
    experiments: list
    keys: list  # image identity per image
    outputs: list  # output path per image
    multi_image: bool
    corrections: list = field(default_factory=list)
    offset: int = 0


def _is_multi_image(imageset):
    from dxtbx.format.FormatMultiImage import FormatMultiImage

    return issubclass(imageset.get_format_class(), FormatMultiImage)


def image_numbers(imageset):
    scan = imageset.get_scan()
    if scan is not None and not scan.is_still():
        first = scan.get_image_range()[0]
        return [first + i for i in range(len(imageset))]
    return [int(i) + 1 for i in imageset.indices()]


def plan(experiments, directory, fmt):
    """One SweepPlan per distinct imageset, with its output file names."""
    from dials_truncfix.format_wrapper import is_corrected_on_read

    plans = []
    for imageset in experiments.imagesets():
        if is_corrected_on_read(imageset.get_format_class()):
            raise TruncationInputError(
                f"{imageset.get_path(0)}: imported with the correction on read "
                "(DIALS_TRUNCFIX); re-import the images without it"
            )
        multi = _is_multi_image(imageset)
        keys, names = [], []
        for i, number in enumerate(image_numbers(imageset)):
            path = imageset.get_path(i)
            index = int(imageset.indices()[i]) if multi else 0
            keys.append(image_identity(path, index))
            stem = os.path.splitext(os.path.basename(path))[0]
            names.append(f"{stem}_{number:05d}" if multi else stem)
        exps = [e for e in experiments if e.imageset is imageset]
        plans.append(SweepPlan(len(plans) + 1, imageset, exps, keys, names, multi))
    all_names = [n for p in plans for n in p.outputs]
    per_sweep_dirs = len(set(all_names)) != len(all_names)
    if fmt == ON_READ:
        from dials_truncfix.format_wrapper import can_wrap

        for p in plans:
            if not can_wrap(p.imageset.get_format_class()):
                raise TruncationInputError(
                    f"{p.imageset.get_path(0)}: {p.imageset.get_format_class().__name__} "
                    "images cannot be corrected on read (SMV, CBF and MRC can)"
                )
            p.outputs = [None] * len(p.outputs)
        return plans
    ext = EXTENSIONS[fmt]
    for p in plans:
        base = os.path.join(directory, f"sweep_{p.number:02d}") if per_sweep_dirs else directory
        p.outputs = [os.path.abspath(os.path.join(base, n + ext)) for n in p.outputs]
    return plans


def check_outputs(plans, other_outputs, overwrite):
    """Refuse to overwrite an input image ever, and existing outputs unless
    ``overwrite``."""
    inputs = {
        os.path.realpath(p.imageset.get_path(i)) for p in plans for i in range(len(p.imageset))
    }
    outputs = [o for p in plans for o in p.outputs if o]
    for path in outputs + [o for o in other_outputs if o]:
        if os.path.realpath(path) in inputs:
            raise TruncationInputError(f"{path}: output would overwrite an input image")
    if not overwrite:
        existing = [o for o in outputs + [o for o in other_outputs if o] if os.path.exists(o)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise TruncationInputError(
                f"{existing[0]} exists{more}: choose another output or set output.overwrite=True"
            )


