"""Planning a run of dials.correct_truncation: one plan per imageset with
its kind (a rotation sequence or stills), the identity that seeds each
image's correction, its output file, and why it is not corrected, if so.

Output names: a sequence keeps its image numbers, so that its corrected
images form a template that a fresh ``dials.import`` reads as a sequence
(``x_#####.img`` or ``x_#####.img.gz`` -> ``x_#####.cbf``; a multi-image or unnumbered file
``stack.mrc`` -> ``stack_#####.cbf``); stills keep their file names, with
``_#####`` added where a name has no number of its own (dxtbx reads a scan
only from a numbered file).  Two imagesets whose names would collide go into
``sequence_NN`` subdirectories.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from dials_truncfix.corrector import image_identity
from dials_truncfix.detectors import correction_refused
from dials_truncfix.io import OutputFormatError
from dials_truncfix.io.cbf import panels_read_back
from dials_truncfix.io.smv import check_single_panel

if TYPE_CHECKING:
    from dxtbx.imageset import ImageSet
    from dxtbx.model.experiment_list import ExperimentList

    from dials_truncfix.settings import Settings

EXTENSIONS = {"cbf": ".cbf", "smv": ".img"}
#: compressions dxtbx reads transparently (``x_00001.img.gz``)
COMPRESSIONS = (".gz", ".bz2")
ON_READ = "on_read"


class TruncationInputError(RuntimeError):
    """Input that cannot be corrected (reported as a one-line error)."""


@dataclass(frozen=True)
class SweepPlan:
    """Everything known about one imageset before a pixel is read: what it
    is, what seeds each image's correction, where each corrected image goes.
    Frozen, so that the workers, the experiment lists and the record all see
    the plan the output checks saw; what the run finds is a
    :class:`~dials_truncfix.program.tasks.SweepResult`."""

    number: int  #: from 1, in the order of the experiment list
    imageset: ImageSet
    is_sequence: bool
    multi_image: bool
    keys: tuple[str, ...]  #: image identity per image (seeds its correction)
    names: tuple[str, ...]  #: output file name (no directory, no extension) per image
    refused: str | None = None  #: why its images are passed through uncorrected
    template: str | None = None  #: of a sequence's names, e.g. x_#####
    first_number: int = 1  #: of a sequence
    outputs: tuple[str, ...] = ()  #: output path per image; none for on_read

    @property
    def description(self) -> str:
        if self.is_sequence and not self.multi_image:
            return self.imageset.get_template()
        return self.imageset.get_path(0) + (
            f" and {len(self.imageset) - 1} more" if len(self.imageset) > 1 else ""
        )

    def output_template(self) -> str:
        """The path template of a sequence's outputs."""
        return os.path.join(
            os.path.dirname(self.outputs[0]),
            self.template + os.path.splitext(self.outputs[0])[1],
        )


def image_numbers(imageset):
    """The image number of each image of an imageset: the scan's for a
    sequence, the position in its file (from 1) for stills."""
    scan = imageset.get_scan()
    if _is_sequence(imageset):
        first = scan.get_image_range()[0]
        return [first + i for i in range(len(imageset))]
    return [int(i) + 1 for i in imageset.indices()]


def _is_sequence(imageset):
    from dxtbx.imageset import ImageSequence

    return isinstance(imageset, ImageSequence)


def _is_multi_image(imageset):
    from dxtbx.format.FormatMultiImage import FormatMultiImage

    return issubclass(imageset.get_format_class(), FormatMultiImage)


def _stem(path):
    """A file name without directory, compression suffix and extension."""
    name = os.path.basename(path)
    if name.endswith(COMPRESSIONS):
        name = os.path.splitext(name)[0]
    return os.path.splitext(name)[0]


def _template(imageset, multi):
    """The name template (no directory, no extension) of a sequence's images."""
    if not multi:
        template = _stem(imageset.get_template())
        if "#" in template:
            return template
    return _stem(imageset.get_path(0)) + "_#####"


def _names(imageset, template):
    """Output names: a sequence's from its template; a still keeps its file
    name, numbered if it has no number (dxtbx needs one to read a scan)."""
    numbers = image_numbers(imageset)
    if template is not None:
        width = template.count("#")
        return [template.replace("#" * width, f"{n:0{width}d}") for n in numbers]
    stems = [_stem(imageset.get_path(i)) for i in range(len(imageset))]
    return [
        stem
        if re.search(r"\d$", stem) and len(set(stems)) == len(stems)
        else f"{stem}_{n:05d}"
        for stem, n in zip(stems, numbers)
    ]


def _cbf_reads_back(imageset) -> bool:
    """Whether dxtbx reads the full CBFs written for ``imageset`` with all
    its panels (io.cbf.panels_read_back); a probe that fails counts as no."""
    try:
        return panels_read_back(imageset) == len(imageset.get_detector())
    except Exception:
        return False


def plan(
    experiments: ExperimentList, settings: Settings, directory: str | None, fmt: str
) -> list[SweepPlan]:
    """One SweepPlan per distinct imageset, with its output paths; refuses,
    before any work, what cannot be corrected into ``fmt``."""
    from dials_truncfix.format_wrapper import can_wrap, is_corrected_on_read

    plans = []
    for imageset in experiments.imagesets():
        format_class = imageset.get_format_class()
        if is_corrected_on_read(format_class):
            raise TruncationInputError(
                f"{imageset.get_path(0)}: imported with the correction on read "
                "(DIALS_TRUNCFIX); re-import the images without it"
            )
        multi = _is_multi_image(imageset)
        keys = tuple(
            image_identity(
                imageset.get_path(i), int(imageset.indices()[i]) if multi else 0
            )
            for i in range(len(imageset))
        )
        sequence = _is_sequence(imageset)
        template = _template(imageset, multi) if sequence else None
        plans.append(
            SweepPlan(
                len(plans) + 1,
                imageset,
                sequence,
                multi,
                keys,
                tuple(_names(imageset, template)),
                correction_refused(
                    format_class,
                    settings.detector,
                    lambda imageset=imageset: [
                        panel.get_type() for panel in imageset.get_detector(0)
                    ],
                ),
                template,
                image_numbers(imageset)[0],
            )
        )
    for p in plans:
        if fmt == ON_READ:
            if not can_wrap(p.imageset.get_format_class()):
                raise TruncationInputError(
                    f"{p.imageset.get_path(0)}: {p.imageset.get_format_class().__name__} builds its own "
                    "imagesets and cannot be corrected on read: use output.format=cbf"
                )
        elif fmt == "smv":
            try:
                check_single_panel(p.imageset.get_detector())
            except OutputFormatError as e:
                raise TruncationInputError(f"{p.imageset.get_path(0)}: {e}") from None
        elif not p.is_sequence and any(
            p.imageset.get_goniometer(i) is None for i in range(len(p.imageset))
        ):
            # dxtbx's full-CBF writer gives such an image a goniometer without axes, which dxtbx cannot read back
            raise TruncationInputError(
                f"{p.imageset.get_path(0)}: a still without a goniometer (an XFEL still) cannot be written as a "
                "full CBF: use output.format=on_read"
            )
        elif len(p.imageset.get_detector()) > 1 and not _cbf_reads_back(p.imageset):
            raise TruncationInputError(
                f"{p.imageset.get_path(0)}: dxtbx cannot read back a full CBF of this "
                f"{len(p.imageset.get_detector())}-panel detector panel by panel: "
                "use output.format=on_read"
            )
    if fmt == ON_READ:
        return plans
    all_names = [n for p in plans for n in p.names]
    per_sequence = len(set(all_names)) != len(all_names)
    planned = []
    for p in plans:
        base = (
            os.path.join(directory, f"sequence_{p.number:02d}")
            if per_sequence
            else directory
        )
        planned.append(
            replace(
                p,
                outputs=tuple(
                    os.path.abspath(os.path.join(base, n + EXTENSIONS[fmt]))
                    for n in p.names
                ),
            )
        )
    return planned


def input_files(
    plans: list[SweepPlan], experiment_files: Sequence[str], settings: Settings
) -> list[str]:
    """Every file the run reads (images, experiment lists, masks): none may
    be an output."""
    files = [p.imageset.get_path(i) for p in plans for i in range(len(p.imageset))]
    files += [p.imageset.external_lookup.mask.filename for p in plans]
    files += list(experiment_files)
    files.append(settings.mask)
    return [f for f in files if f]
