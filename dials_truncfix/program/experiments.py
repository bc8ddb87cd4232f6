"""The experiment lists written by dials.correct_truncation: copies of the
input whose imagesets read the corrected images with stock dxtbx, or the
original images through the correction on read."""

from __future__ import annotations

import copy

from dials_truncfix.program.planning import ON_READ, TruncationInputError, image_numbers
from dials_truncfix.program.tasks import trusted_for_cbf, trusted_for_smv


def corrected_experiments(experiments, plans, fmt, settings=None):
    """A copy of the experiment list whose imagesets read the corrected files
    with stock dxtbx, keeping every model; trusted ranges admit the corrected
    values, and for SMV the offset is the panels' pedestal."""
    from dxtbx.format.Registry import get_format_class_for_file
    from dxtbx.imageset import ImageSetFactory

    if fmt == ON_READ:
        return on_read_experiments(experiments, plans, settings)
    replaced = {}
    for p in plans:
        format_class = get_format_class_for_file(p.outputs[0])
        old = p.imageset
        detector = copy.deepcopy(old.get_detector())
        if fmt == "cbf":
            ranges = trusted_for_cbf(detector)
        else:
            ranges = trusted_for_smv(detector, p.offset)
        for panel, r in zip(detector, ranges):
            panel.set_trusted_range(r)
            if fmt == "smv":
                panel.set_pedestal(float(p.offset))
        scan = old.get_scan()
        if scan is not None and not scan.is_still() and len(p.outputs) == len(old):
            template = _template_for(p.outputs, image_numbers(old))
            if template is not None:
                new = ImageSetFactory.make_sequence(
                    template, image_numbers(old), format_class=format_class,
                    beam=old.get_beam(), detector=detector,
                    goniometer=old.get_goniometer(), scan=scan, check_format=False,
                )
            else:
                raise TruncationInputError("output names do not form a template")
        else:
            new = ImageSetFactory.make_imageset(p.outputs, format_class, check_format=False)
            for i in range(len(new)):
                new.set_beam(old.get_beam(i), i)
                new.set_detector(detector, i)
        replaced[id(old)] = (new, detector)
    return _with_new_imagesets(experiments, replaced)


def _template_for(outputs, numbers):
    from dxtbx.sequence_filenames import template_regex

    template, first = template_regex(outputs[0])
    if template is None:
        return None
    width = template.count("#")
    expected = [template.replace("#" * width, f"{n:0{width}d}") for n in numbers]
    return template if expected == list(outputs) else None


def on_read_experiments(experiments, plans, settings):
    """A copy of the experiment list whose imagesets read the original images
    through the correction on read, with the settings recorded."""
    from dxtbx.imageset import ImageSequence, ImageSetFactory

    from dials_truncfix.format_wrapper import TRUSTED_MINIMUM, wrapped_class
    from dials_truncfix.settings import FORMAT_KWARG

    replaced = {}
    for p in plans:
        old = p.imageset
        wrapped = wrapped_class(old.get_format_class().__name__)
        kwargs = dict(old.params())
        kwargs[FORMAT_KWARG] = settings
        detector = copy.deepcopy(old.get_detector())
        for panel in detector:
            low, high = panel.get_trusted_range()
            panel.set_trusted_range((min(low, TRUSTED_MINIMUM), high))
        if isinstance(old, ImageSequence) and p.multi_image:
            new = wrapped.get_imageset(
                [old.get_path(0)], beam=old.get_beam(), detector=detector,
                goniometer=old.get_goniometer(), scan=old.get_scan(), as_sequence=True,
                single_file_indices=list(old.indices()), format_kwargs=kwargs,
            )
        elif isinstance(old, ImageSequence):
            new = ImageSetFactory.make_sequence(
                old.get_template(), image_numbers(old), format_class=wrapped,
                beam=old.get_beam(), detector=detector, goniometer=old.get_goniometer(),
                scan=old.get_scan(), format_kwargs=kwargs,
            )
        else:
            new = wrapped.get_imageset(
                [old.get_path(i) for i in range(len(old))], as_imageset=True, format_kwargs=kwargs,
                single_file_indices=list(old.indices()) if p.multi_image else None,
            )
            for i in range(len(new)):
                new.set_beam(old.get_beam(i), i)
                new.set_detector(detector, i)
        new.external_lookup.mask.data = old.external_lookup.mask.data
        replaced[id(old)] = (new, detector)
    return _with_new_imagesets(experiments, replaced)


def _with_new_imagesets(experiments, replaced):
    """Copies of the experiments with imageset and detector swapped, from
    {id(old imageset): (new imageset, new detector)}."""
    from dxtbx.model.experiment_list import ExperimentList

    result = ExperimentList()
    for expt in experiments:
        new, detector = replaced[id(expt.imageset)]
        expt = copy.copy(expt)
        expt.imageset = new
        expt.detector = detector
        result.append(expt)
    return result
