"""Correcting every image of the planned imagesets, in parallel and
bit-identically for any nproc, and writing the corrected images into the
staging directory (program/outputs.py moves them into place): plans in, a
:class:`SweepResult` per plan out."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from dials.util.mp import batch_multi_node_parallel_map

from dials_truncfix import compat
from dials_truncfix.core.histogram import (
    counts_up_to,
    histogram_values,
    region_histogram,
)
from dials_truncfix.corrector import (
    NOT_VALID,
    corrected_value_range,
    corrector_for,
    stock_zeros_valid,
)
from dials_truncfix.geometry import MaskFileError, experiment_shell_geometry
from dials_truncfix.io import OutputFormatError
from dials_truncfix.io.cbf import write_full_cbf
from dials_truncfix.io.smv import smv_pedestal, write_smv_image
from dials_truncfix.program import cluster
from dials_truncfix.program.planning import SweepPlan, TruncationInputError

if TYPE_CHECKING:
    from dxtbx.imageset import ImageSet
    from libtbx.phil import scope_extract

    from dials_truncfix.geometry import ShellGeometry
    from dials_truncfix.program.outputs import Staging
    from dials_truncfix.settings import Settings

logger = logging.getLogger(f"dials.{__name__}")

#: a first image slower than this to correct is reported with an estimate
SLOW_IMAGE_SECONDS = 5.0


@dataclass(frozen=True)
class SweepResult:
    """What correcting the images of one plan gave: a summary per image (the
    JSON record's, plus the low-count histograms of the report images) and,
    for SMV output, the pedestal its images were stored with."""

    plan: SweepPlan
    images: tuple[dict, ...]
    pedestal: int = 0

    @property
    def lowest_value(self) -> int | None:
        """The lowest corrected value over the imageset (None: nothing corrected)."""
        values = [s["min_value"] for s in self.images if s["min_value"] is not None]
        return min(values) if values else None


def shell_geometry_of(
    imageset: ImageSet, index: int, settings: Settings
) -> ShellGeometry:
    """The ShellGeometry of image ``index`` by the rule the correction on read
    follows too (geometry.experiment_shell_geometry); a truncfix.mask that
    cannot be used is bad input."""
    instance = imageset.get_format_class().get_instance(
        imageset.get_path(index), **imageset.params()
    )
    try:
        return experiment_shell_geometry(imageset, index, instance, settings.mask)
    except MaskFileError as e:
        raise TruncationInputError(f"truncfix.mask={e}") from None


def low_count_histograms(panels, shell_map, top):
    """Raw H(0..top) per region (for the report); negative values of images
    passed through count as 0."""
    flat = np.concatenate([np.asarray(p).ravel() for p in panels])
    order, starts = shell_map.pixel_order()
    values = histogram_values(np.clip(flat[order], 0, None))
    return [
        counts_up_to(region_histogram(values, starts, r), top).tolist()
        for r in range(len(starts) - 1)
    ]


def _as_integers(panels, path):
    ints = []
    for p in panels:
        if p.dtype.kind == "f" and not np.array_equal(p, np.rint(p)):
            raise OutputFormatError(
                f"{path}: non-integer pixel values cannot be written as integers"
            )
        ints.append(p.astype(np.int32))
    return ints


class CorrectTask:
    """Correct one image and write it (CBF) or keep it for the pedestal of its
    imageset (SMV); picklable for dials.util.mp."""

    def __init__(self, plans, settings, fmt, staging, report_images):
        self.plans = {p.number: p for p in plans}
        self.settings = settings
        self.fmt = fmt
        self.staged = {
            p.number: [staging.path(o) for o in p.outputs] if staging else None
            for p in plans
        }
        self.report_images = report_images
        self._geometries = {}

    def geometry(self, plan, index):
        """One geometry per sequence; per image for stills."""
        key = (plan.number, 0 if plan.is_sequence else index)
        if key not in self._geometries:
            self._geometries[key] = shell_geometry_of(
                plan.imageset, index, self.settings
            )
        return self._geometries[key]

    def __call__(self, item):
        number, index = item
        plan = self.plans[number]
        imageset, path = plan.imageset, plan.imageset.get_path(index)
        try:
            raw = imageset.get_raw_data(index)
        except Exception as e:  # noqa: BLE001 - whatever the format class raises
            raise TruncationInputError(
                f"{path}: image {index + 1} cannot be read: {e}"
            ) from None
        raw = raw if isinstance(raw, tuple) else (raw,)
        corrector = corrector_for(self.geometry(plan, index), self.settings.parameters)
        if plan.refused:
            corrected, result = raw, None
        else:
            corrected, result = corrector.correct(
                raw, plan.keys[index], stock_zeros_valid(imageset.get_detector(index))
            )
        panels = [p.as_numpy_array() for p in corrected]
        raw_np = [p.as_numpy_array() for p in raw]
        summary = self.summary(plan, index, corrector.shell_map, raw_np, panels, result)
        if result is not None and index in self.report_images.get(number, ()):
            top = max([s.imax or 0 for s in result.shells] + [20])
            summary["histograms"] = low_count_histograms(
                raw_np, corrector.shell_map, top
            )
        if self.fmt == "cbf":
            detector = imageset.get_detector(index)
            ranges = [
                corrected_value_range(panel)
                if not plan.refused
                else compat.valid_integer_range(panel.get_trusted_range())
                for panel in detector
            ]
            write_full_cbf(
                self.staged[number][index],
                imageset,
                index,
                _as_integers(panels, path),
                ranges,
            )
        elif self.fmt == "smv":
            np.save(self.staged[number][index] + ".npy", _as_integers(panels, path)[0])
        return summary

    @staticmethod
    def summary(plan, index, shell_map, raw, panels, result):
        valid = shell_map.labels >= 0
        flat_raw = np.concatenate([p.ravel() for p in raw])[valid]
        flat_out = np.concatenate([p.ravel() for p in panels])[valid]
        shells = [] if result is None else [s.as_dict() for s in result.shells]
        if shells:
            # the mean background per region, which the correction lowers
            labels = shell_map.labels[valid]
            n = np.maximum(np.bincount(labels, minlength=shell_map.n_regions), 1)
            before = (
                np.bincount(labels, weights=flat_raw, minlength=shell_map.n_regions) / n
            )
            after = (
                np.bincount(labels, weights=flat_out, minlength=shell_map.n_regions) / n
            )
            for shell, mean_before, mean_after in zip(shells, before, after):
                shell["mean_before"], shell["mean_after"] = (
                    float(mean_before),
                    float(mean_after),
                )
        return {
            "image": index + 1,
            "file": plan.imageset.get_path(index),
            "output": plan.outputs[index] if plan.outputs else None,
            "status": f"not corrected: {plan.refused}"
            if result is None
            else result.status,
            "n_valid": int(valid.sum()),
            "zero_fraction": float(
                np.count_nonzero(flat_raw == 0) / max(1, flat_raw.size)
            ),
            "negative_fraction": float(
                np.count_nonzero((flat_out < 0) & (flat_out != NOT_VALID))
                / max(1, flat_out.size)
            ),
            "damaged": "" if result is None else result.damaged,
            "n_changed": 0 if result is None else result.n_changed,
            "min_value": None if result is None else result.min_value,
            "shells": shells,
        }


class SMVTask:
    """Write one staged image as SMV with the pedestal of its imageset."""

    def __init__(self, results, staging):
        self.results = {r.plan.number: r for r in results}
        self.staged = {
            r.plan.number: [staging.path(o) for o in r.plan.outputs] for r in results
        }

    def __call__(self, item):
        number, index = item
        result, staged = self.results[number], self.staged[number][index]
        data = np.load(staged + ".npy")
        n_clipped = write_smv_image(
            staged, result.plan.imageset, index, [data], result.pedestal
        )
        os.unlink(staged + ".npy")
        return n_clipped


def parallel_map(func, items, mp, callback=None, client=None):
    """``func`` over ``items`` in order: as dask tasks of the cluster jobs of
    ``client`` where there is one, else in nproc local processes (DIALS'
    mp)."""
    if client is not None:
        return cluster.cluster_map(client, func, items, callback)
    nproc = (
        compat.available_cores()
        if mp.nproc in (None, 0) or str(mp.nproc) == "Auto"
        else mp.nproc
    )
    if nproc == 1:
        results = []
        for item in items:
            results.append(func(item))
            if callback:
                callback(results[-1])
        return results
    chunks = batch_multi_node_parallel_map(
        func=func,
        iterable=items,
        nproc=nproc,
        njobs=1,
        cluster_method=None,
        callback=callback or (lambda result: None),
        chunksize=1,
    )
    # results come back in order, one list per chunk
    return [result for chunk in chunks for result in chunk]


def report_image_indices(n_images, n_chosen):
    if n_images <= n_chosen:
        return list(range(n_images))
    return sorted({int(round(x)) for x in np.linspace(0, n_images - 1, n_chosen)})


def _warn_if_slow(task, items):
    """Correct the first image here and say how long the run will take if
    the settings make it slow."""
    start = time.perf_counter()
    first = task(items[0])
    seconds = time.perf_counter() - start
    if seconds > SLOW_IMAGE_SECONDS:
        logger.warning(
            "Correcting one image took %.0f s with these settings (e.g. truncfix.histogram.max): "
            "the %d images will take about %.0f min",
            seconds,
            len(items),
            seconds * len(items) / 60,
        )
    return first


def correct_sweeps(
    plans: list[SweepPlan],
    settings: Settings,
    fmt: str,
    mp: scope_extract,
    staging: Staging | None,
    n_report_images: int = 3,
    progress: Callable[[dict], None] | None = None,
) -> list[SweepResult]:
    """Correct every image into ``staging`` (nothing is written for
    on_read); ``progress`` is called with each image's summary as it is
    done.  An SMV imageset's pedestal comes from its lowest corrected value,
    so its images are written only once all are corrected."""
    report_images = {
        p.number: report_image_indices(len(p.imageset), n_report_images) for p in plans
    }
    task = CorrectTask(plans, settings, fmt, staging, report_images)
    items = [(p.number, i) for p in plans for i in range(len(p.imageset))]
    first = _warn_if_slow(task, items)
    if progress:
        progress(first)
    with (
        cluster.cluster_client(mp, staging.scratch("cluster"))
        if cluster.is_cluster(mp)
        else contextlib.nullcontext()
    ) as client:
        summaries = [first] + parallel_map(
            task, items[1:], mp, callback=progress, client=client
        )
        results = _sweep_results(plans, items, summaries, fmt, mp, staging, client)
    return results


def _sweep_results(plans, items, summaries, fmt, mp, staging, client):
    """Each plan's summaries; SMV images written with their imageset's pedestal."""
    per_plan = {p.number: [] for p in plans}
    for (number, _), summary in zip(items, summaries):
        per_plan[number].append(summary)
    results = [SweepResult(p, tuple(per_plan[p.number])) for p in plans]
    if fmt == "smv":
        results = [
            SweepResult(r.plan, r.images, smv_pedestal(r.lowest_value)) for r in results
        ]
        clipped = sum(parallel_map(SMVTask(results, staging), items, mp, client=client))
        if clipped:
            logger.warning(
                "%d pixel(s) too high for 16 bits with the pedestal were stored as 65535 (overloaded)",
                clipped,
            )
    return results
