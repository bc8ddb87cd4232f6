"""Correction of whole imagesets for dials.correct_truncation: planning the
output files, correcting every image (in parallel, bit-identically for any
nproc), the per-sweep offset, and the corrected experiment list."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from dials_truncfix.correct import LOWEST_VALUE, shell_histograms, sweep_offset
from dials_truncfix.dxtbx_correction import ImageCorrector, image_identity
from dials_truncfix.writers import OutputFormatError, write_full_cbf, write_smv_image

logger = logging.getLogger(f"dials.{__name__}")

#: trusted minimum written for signed (CBF) output: below any corrected value
CBF_TRUSTED_MINIMUM = LOWEST_VALUE - 1
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


def _image_numbers(imageset):
    scan = imageset.get_scan()
    if scan is not None and not scan.is_still():
        first = scan.get_image_range()[0]
        return [first + i for i in range(len(imageset))]
    return [int(i) + 1 for i in imageset.indices()]


def plan(experiments, directory, fmt):
    """One SweepPlan per distinct imageset, with its output file names."""
    from dials_truncfix.format_wrapper import _CorrectOnRead

    plans = []
    for imageset in experiments.imagesets():
        if issubclass(imageset.get_format_class(), _CorrectOnRead):
            raise TruncationInputError(
                f"{imageset.get_path(0)}: imported with the correction on read "
                "(DIALS_TRUNCFIX); re-import the images without it"
            )
        multi = _is_multi_image(imageset)
        keys, names = [], []
        for i, number in enumerate(_image_numbers(imageset)):
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
        from dials_truncfix.format_wrapper import _supported

        for p in plans:
            if not _supported(p.imageset.get_format_class()):
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


def imageset_masks(imageset, user_mask=True):
    """The format's static mask and the external (user) mask, as tuples of
    flex.bool; not the trusted-range mask."""
    masks = []
    try:
        fmt = imageset.get_format_class().get_instance(
            imageset.get_path(0), **imageset.data().get_format_kwargs()
        )
        static = fmt.get_static_mask()
        if static is not None:
            masks.append(tuple(static))
    except Exception as e:  # pragma: no cover - formats without instances
        logger.debug("no static mask: %s", e)
    lookup = imageset.external_lookup.mask
    if user_mask and lookup.data is not None and not lookup.data.empty():
        masks.append(tuple(lookup.data.tile(i).data() for i in range(len(lookup.data))))
    return masks


def low_count_histograms(panels, shell_map, imax):
    """Raw H(0..imax) per shell (for the report); negative values of images
    passed through count as 0."""
    flat = np.concatenate([np.asarray(p).ravel() for p in panels])
    order, starts = shell_map.pixel_order()
    return shell_histograms(np.clip(flat[order], 0, None), starts)[:, : imax + 1]


_correctors = {}


class CorrectTask:
    """Correct (and, for CBF, write) one image; picklable for dials.util.mp."""

    def __init__(self, plans, params, mask_file, fmt, staging, report_images):
        self.items = {
            p.number: (p.imageset, p.keys, p.outputs, _trusted_for_cbf(p.imageset.get_detector()))
            for p in plans
        }
        self.params = params
        self.mask_file = mask_file
        self.fmt = fmt
        self.staging = staging
        self.report_images = report_images

    def corrector(self, number):
        key = (number, self.params, self.mask_file)
        if key not in _correctors:
            imageset = self.items[number][0]
            _correctors[key] = ImageCorrector(
                imageset.get_detector(), imageset.get_beam(), self.params,
                masks=imageset_masks(imageset, user_mask=self.fmt != ON_READ),
                mask_file=self.mask_file,
            )
        return _correctors[key]

    def __call__(self, item):
        number, index = item
        imageset, keys, outputs, trusted = self.items[number]
        try:
            raw = imageset.get_raw_data(index)
        except Exception as e:
            raise TruncationInputError(f"{imageset.get_path(index)}: image {index + 1} cannot be read: {e}")
        if not isinstance(raw, tuple):
            raw = (raw,)
        corrector = self.corrector(number)
        corrected, result = corrector.correct(raw, keys[index])
        panels = [np.asarray(p.as_numpy_array()) for p in corrected]
        raw_np = [p.as_numpy_array() for p in raw]
        valid = corrector.shell_map.labels >= 0
        flat_raw = np.concatenate([p.ravel() for p in raw_np])[valid]
        flat_out = np.concatenate([p.ravel() for p in panels])[valid]
        summary = {
            "image": index + 1,
            "file": imageset.get_path(index),
            "output": outputs[index],
            "status": result.status,
            "n_valid": int(valid.sum()),
            "zero_fraction": float(np.count_nonzero(flat_raw == 0) / max(1, flat_raw.size)),
            "negative_fraction": float(np.count_nonzero(flat_out < 0) / max(1, flat_out.size)),
            "n_changed": result.n_changed,
            "min_value": result.min_value,
            "shells": [s.as_dict() for s in result.shells],
        }
        if index in self.report_images.get(number, ()):
            imax = max([s.imax or 0 for s in result.shells] + [20])
            summary["histograms"] = low_count_histograms(raw_np, corrector.shell_map, imax).tolist()
        ints = []
        for p in panels:
            if p.dtype.kind == "f":
                if not np.array_equal(p, np.rint(p)):
                    raise OutputFormatError(
                        f"{imageset.get_path(index)}: non-integer pixel values cannot be written as integers"
                    )
            ints.append(p.astype(np.int32))
        if self.fmt == "cbf":
            write_full_cbf(outputs[index], imageset, index, ints, trusted)
        elif self.fmt == "smv":
            np.save(_staged(self.staging, number, index), np.stack(ints) if len(ints) > 1 else ints[0])
        return summary


def _staged(staging, number, index):
    return os.path.join(staging, f"{number:03d}_{index:06d}.npy")


def _trusted_for_cbf(detector):
    return [(min(p.get_trusted_range()[0], CBF_TRUSTED_MINIMUM), p.get_trusted_range()[1]) for p in detector]


def _trusted_for_smv(detector, offset):
    """Trusted range on the raw (stored) values: all of 0..65534 valid."""
    return [(-1.0 - offset, float(min(p.get_trusted_range()[1] + offset, 65535))) for p in detector]


class SMVTask:
    def __init__(self, plans, staging):
        self.items = {p.number: (p.imageset, p.outputs, p.offset) for p in plans}
        self.staging = staging

    def __call__(self, item):
        number, index = item
        imageset, outputs, offset = self.items[number]
        data = np.load(_staged(self.staging, number, index))
        n = write_smv_image(outputs[index], imageset, index, [data], offset)
        os.unlink(_staged(self.staging, number, index))
        return n


def parallel_map(func, items, mp, callback=None):
    from dials.util.mp import available_cores, batch_multi_node_parallel_map

    nproc = mp.nproc if mp.nproc not in (None, 0) else available_cores()
    if mp.method in (None, "none") and nproc == 1:
        results = []
        for item in items:
            results.append(func(item))
            if callback:
                callback(results[-1])
        return results
    chunks = batch_multi_node_parallel_map(
        func=func, iterable=items, nproc=nproc, njobs=mp.njobs,
        cluster_method=None if mp.method in (None, "none") else mp.method,
        callback=callback or (lambda result: None), chunksize=1,
    )
    # results come back in order, one list per chunk
    return [result for chunk in chunks for result in chunk]


def report_image_indices(n_images, n_chosen):
    if n_images <= n_chosen:
        return list(range(n_images))
    return sorted({int(round(x)) for x in np.linspace(0, n_images - 1, n_chosen)})


def correct_sweeps(experiments, plans, params, mask_file, fmt, mp, n_report_images=3, progress=None):
    """Correct every image; write the images; return the plans (with
    per-image summaries and offsets)."""
    directories = {os.path.dirname(o) for p in plans for o in p.outputs if o}
    for d in sorted(directories):
        os.makedirs(d, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".truncfix-staging-", dir=sorted(directories)[0]) if fmt == "smv" else None
    if fmt == ON_READ and any(
        imageset_masks(p.imageset) != imageset_masks(p.imageset, user_mask=False) for p in plans
    ):
        logger.warning("The imageset's user mask is not used on read: give it as truncfix.mask")
    try:
        report_images = {p.number: report_image_indices(len(p.imageset), n_report_images) for p in plans}
        task = CorrectTask(plans, params, mask_file, fmt, staging, report_images)
        items = [(p.number, i) for p in plans for i in range(len(p.imageset))]
        summaries = parallel_map(task, items, mp, callback=progress)
        by_number = {p.number: p for p in plans}
        for (number, _), summary in zip(items, summaries):
            by_number[number].corrections.append(summary)
        for p in plans:
            p.offset = sweep_offset(s["min_value"] for s in p.corrections)
        if fmt == "smv":
            clipped = parallel_map(SMVTask(plans, staging), items, mp)
            if sum(clipped):
                logger.warning(
                    "%d pixel(s) above 65535 - offset were clipped to 65535 (treated as overloaded)",
                    sum(clipped),
                )
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    return plans


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
            ranges = _trusted_for_cbf(detector)
        else:
            ranges = _trusted_for_smv(detector, p.offset)
        for panel, r in zip(detector, ranges):
            panel.set_trusted_range(r)
            if fmt == "smv":
                panel.set_pedestal(float(p.offset))
        scan = old.get_scan()
        if scan is not None and not scan.is_still() and len(p.outputs) == len(old):
            template = _template_for(p.outputs, _image_numbers(old))
            if template is not None:
                new = ImageSetFactory.make_sequence(
                    template, _image_numbers(old), format_class=format_class,
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

    from dials_truncfix.format_wrapper import FORMAT_KWARG, TRUSTED_MINIMUM, wrapped_class

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
                old.get_template(), _image_numbers(old), format_class=wrapped,
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
