"""The experiment lists written by dials.correct_truncation: copies of the
input, every model and mask kept, whose imagesets read the corrected images
with stock dxtbx, or the original images through the correction on read."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from dials_truncfix import compat
from dials_truncfix.corrector import describe_corrected
from dials_truncfix.detectors import describe_as_integrating
from dials_truncfix.io.smv import smv_valid_range
from dials_truncfix.program.tasks import shell_geometry_of

if TYPE_CHECKING:
    from dxtbx.model.experiment_list import ExperimentList

    from dials_truncfix.program.planning import SweepPlan
    from dials_truncfix.program.tasks import SweepResult
    from dials_truncfix.settings import Settings

logger = logging.getLogger(f"dials.{__name__}")


def _copy_lookups(old, new):
    """The external mask (a beam stop, say), gain, pedestal and dx/dy maps."""
    for name in ("mask", "gain", "pedestal", "dx", "dy"):
        source, target = (
            getattr(old.external_lookup, name),
            getattr(new.external_lookup, name),
        )
        target.data, target.filename = source.data, source.filename


def _output_detector(result, index, fmt):
    """The detector of image ``index`` with the trusted ranges (and, for SMV,
    the pedestal) of the written values, described as an integrating camera
    where they are corrected (detectors.describe_as_integrating)."""
    detector = copy.deepcopy(result.plan.imageset.get_detector(index))
    if fmt == "smv":
        for panel in detector:
            panel.set_trusted_range(
                compat.trusted_range_for(*smv_valid_range(result.pedestal))
            )
            panel.set_pedestal(float(result.pedestal))
        if not result.plan.refused:
            describe_as_integrating(detector)
    elif not result.plan.refused:
        describe_corrected(detector)
    return detector


def corrected_experiments(
    experiments: ExperimentList, results: list[SweepResult], fmt: str
) -> ExperimentList:
    """A copy of ``experiments`` whose imagesets read the written images with
    stock dxtbx (the format class is the one dxtbx finds for them)."""
    from dxtbx.format.Registry import get_format_class_for_file
    from dxtbx.imageset import ImageSetFactory

    replaced = {}
    for r in results:
        p = r.plan
        old = p.imageset
        format_class = get_format_class_for_file(p.outputs[0])
        if p.is_sequence:
            detector = _output_detector(r, 0, fmt)
            template = p.output_template()
            new = ImageSetFactory.make_sequence(
                template,
                [p.first_number + i for i in range(len(old))],
                format_class=format_class,
                beam=old.get_beam(),
                detector=detector,
                goniometer=old.get_goniometer(),
                scan=old.get_scan(),
                check_format=False,
            )
        else:
            new = ImageSetFactory.make_imageset(
                list(p.outputs), format_class, check_format=False
            )
            detector = _set_still_models(
                new, old, lambda i: _output_detector(r, i, fmt)
            )
        _copy_lookups(old, new)
        replaced[id(old)] = (new, detector)
    return _with_new_imagesets(experiments, replaced)


def on_read_experiments(
    experiments: ExperimentList, plans: list[SweepPlan], settings: Settings
) -> ExperimentList:
    """A copy of ``experiments`` whose imagesets read the original images
    through the correction on read, with the settings and the shell
    geometry of this run recorded (so that later refinement changes nothing)."""
    from dials_truncfix.format_wrapper import wrapped_class
    from dials_truncfix.settings import FORMAT_KWARG

    replaced = {}
    for p in plans:
        old = p.imageset
        if p.refused:
            replaced[id(old)] = (old, None)
            continue
        geometries = {
            g.digest: g
            for g in (shell_geometry_of(old, i, settings) for i in _geometry_images(p))
        }
        if len(geometries) > 1:
            logger.info(
                "Imageset %d: its images have different geometries; the correction on read takes each "
                "image's from the experiment list",
                p.number,
            )
        fixed = next(iter(geometries.values())) if len(geometries) == 1 else None
        kwargs = dict(old.params())
        kwargs[FORMAT_KWARG] = type(settings)(
            settings.parameters, settings.mask, settings.detector, fixed
        ).to_record()
        wrapped = wrapped_class(old.get_format_class().__name__)
        if p.is_sequence:
            detector = describe_corrected(copy.deepcopy(old.get_detector()))
            extra = (
                {"single_file_indices": list(old.indices())}
                if p.multi_image
                else {"template": old.get_template()}
            )
            paths = (
                [old.get_path(0)]
                if p.multi_image
                else [old.get_path(i) for i in range(len(old))]
            )
            new = wrapped.get_imageset(
                paths,
                beam=old.get_beam(),
                detector=detector,
                goniometer=old.get_goniometer(),
                scan=old.get_scan(),
                as_sequence=True,
                format_kwargs=kwargs,
                **extra,
            )
        else:
            new = wrapped.get_imageset(
                [old.get_path(i) for i in range(len(old))],
                as_imageset=True,
                format_kwargs=kwargs,
                single_file_indices=list(old.indices()) if p.multi_image else None,
            )
            detector = _set_still_models(
                new,
                old,
                lambda i: describe_corrected(copy.deepcopy(old.get_detector(i))),
            )
        _copy_lookups(old, new)
        replaced[id(old)] = (new, detector)
    return _with_new_imagesets(experiments, replaced)


def _geometry_images(plan):
    return [0] if plan.is_sequence else range(len(plan.imageset))


def _set_still_models(new, old, detector_of):
    """Per-image models of stills, the detectors from ``detector_of(index)``;
    returns the first image's detector (that of a one-image still's experiment)."""
    detectors = [detector_of(i) for i in range(len(new))]
    for i, detector in enumerate(detectors):
        new.set_beam(old.get_beam(i), i)
        new.set_detector(detector, i)
        new.set_goniometer(old.get_goniometer(i), i)
        new.set_scan(old.get_scan(i), i)
    return detectors[0]


def _with_new_imagesets(experiments, replaced):
    """Copies of the experiments with imageset and detector swapped, from
    {id(old imageset): (new imageset, its detector or None to keep)}."""
    from dxtbx.model.experiment_list import ExperimentList

    result = ExperimentList()
    for expt in experiments:
        new, detector = replaced[id(expt.imageset)]
        expt = copy.copy(expt)
        expt.imageset = new
        if detector is not None:
            expt.detector = detector
        result.append(expt)
    return result
