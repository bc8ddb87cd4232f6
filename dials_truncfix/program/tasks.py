"""Correcting every image of the planned sweeps, in parallel and
bit-identically for any nproc; the per-sweep offset; writing the images."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np

from dials_truncfix.core.assignment import LOWEST_VALUE
from dials_truncfix.core.correction import sweep_offset
from dials_truncfix.core.histogram import shell_histograms
from dials_truncfix.corrector import ImageCorrector
from dials_truncfix.geometry import imageset_masks
from dials_truncfix.io import OutputFormatError
from dials_truncfix.io.cbf import write_full_cbf
from dials_truncfix.io.smv import write_smv_image
from dials_truncfix.program.planning import ON_READ, TruncationInputError

logger = logging.getLogger(f"dials.{__name__}")

#: trusted minimum written for signed (CBF) output: below any corrected value
CBF_TRUSTED_MINIMUM = LOWEST_VALUE - 1


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
            p.number: (p.imageset, p.keys, p.outputs, trusted_for_cbf(p.imageset.get_detector()))
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


def trusted_for_cbf(detector):
    return [(min(p.get_trusted_range()[0], CBF_TRUSTED_MINIMUM), p.get_trusted_range()[1]) for p in detector]


def trusted_for_smv(detector, offset):
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


