"""One image, end to end: per-region histograms (a region is a resolution
shell or a sector of one), lognormal fits (a failed region is fitted
together with a neighbour, else left unchanged), and the assignment of
non-positive values to the zero-valued pixels; and the sweep offset for
unsigned output.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np

from dials_truncfix.core.assignment import image_rng, random_arrangement, zero_assignment
from dials_truncfix.core.histogram import counts_up_to, histogram_values, imax, pooled_histogram, region_histogram
from dials_truncfix.core.lognormal import LognormalFit, cdf, fit_lognormal
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import ShellMap
from dials_truncfix.core.truncation import why_not_truncation

logger = logging.getLogger(f"dials.{__name__}")

CORRECTED = "corrected"
NO_ZEROS = "no zero pixels"
NOT_TRUNCATED_NEGATIVE = "not truncated data: holds negative values"
NOT_TRUNCATED_FLOAT = "not truncated data: holds non-integer values"
NOT_TRUNCATION = "not truncation"
BLANK = "blank or damaged image: most valid pixels lie in rows or columns that are all zero"

#: a row or column is damaged when all of at least this many valid pixels
#: are zero: a file cut short (dxtbx reads the missing rows as 0) or a dead
#: line of the camera.  By chance that is all but impossible: 0.73**128 ~ 3e-18
#: for a line entirely in a shell with the 73% zeros of a heavily truncated
#: outer shell, and lines cross shells of fewer zeros.
DAMAGED_LINE_MIN_PIXELS = 128


@dataclass
class ShellResult:
    """What was done in one region: resolution shell ``shell``, azimuthal
    sector ``sector`` (0 without sectors)."""

    shell: int
    d_max: float
    d_min: float
    n_valid: int
    n_zero: int
    sector: int = 0
    imax: int | None = None
    fit: LognormalFit | None = None
    fitted_regions: tuple = ()  # the (shell, sector) pairs whose pixels the fit used
    status: str = NO_ZEROS
    n_changed: int = 0
    min_value: int | None = None
    assignment: str | None = None
    conditional_mean: float | None = None

    @property
    def zero_fraction(self):
        return self.n_zero / self.n_valid if self.n_valid else 0.0

    def as_dict(self):
        out = asdict(self)
        out["zero_fraction"] = self.zero_fraction
        out["fit"] = self.fit.as_dict() if self.fit else None
        out["fitted_regions"] = [list(r) for r in self.fitted_regions]
        return out


def _ranges(indices):
    """'3, 200-255' from sorted integers."""
    if not len(indices):
        return ""
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate(([indices[0]], indices[breaks + 1]))
    ends = np.concatenate((indices[breaks], [indices[-1]]))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def damaged_lines(panels, shell_map):
    """(flat boolean mask of the pixels in damaged rows and columns, or None;
    their description, e.g. 'rows 200-255'), from the per-panel arrays.
    Only integer data without negative values is checked (all the correction
    ever changes)."""
    damaged, described, offset = None, [], 0
    for k, (panel, (per_row, per_column)) in enumerate(zip(panels, shell_map.valid_per_line())):
        panel = np.asarray(panel)
        rows = np.flatnonzero((panel.max(axis=1) == 0) & (per_row >= DAMAGED_LINE_MIN_PIXELS))
        columns = np.flatnonzero((panel.max(axis=0) == 0) & (per_column >= DAMAGED_LINE_MIN_PIXELS))
        if len(rows) or len(columns):
            if damaged is None:
                damaged = np.zeros(sum(int(np.prod(np.shape(p))) for p in panels), dtype=bool)
            block = np.zeros(panel.shape, dtype=bool)
            block[rows] = True
            block[:, columns] = True
            damaged[offset : offset + panel.size] = block.ravel()
            where = " and ".join(
                f"{name} {_ranges(lines)}" for name, lines in (("rows", rows), ("columns", columns)) if len(lines)
            )
            described.append(where if len(panels) == 1 else f"panel {k} {where}")
        offset += panel.size
    return damaged, "; ".join(described)


@dataclass
class ImageCorrection:
    """The corrected panels (same shapes as the input, int32 for integer
    input, float64 for integer-valued float input) and what was done."""

    data: list
    status: str
    shells: list = field(default_factory=list)
    damaged: str = ""  # rows and columns left as they were
    #: flat positions (over the concatenated panels) of the zero pixels left
    #: alone because their region's zeros are not truncation, or None
    not_truncation: np.ndarray | None = None

    @property
    def n_changed(self):
        return sum(s.n_changed for s in self.shells)

    @property
    def min_value(self):
        """The most negative value given to a pixel, or None."""
        values = [s.min_value for s in self.shells if s.min_value is not None]
        return min(values) if values else None


def _fit_shell(histogram, n_valid, params):
    top = imax(histogram, n_valid, params)
    h = counts_up_to(histogram, top)
    n_above = int(n_valid - h.sum())
    fit = fit_lognormal(h, n_above, params.likelihood)
    if fit.converged and not cdf([0.5], fit.theta, fit.mu, fit.sigma)[0] > 0:
        fit = LognormalFit(
            fit.theta, fit.mu, fit.sigma, fit.log_likelihood, fit.rmsd, False,
            fit.n_iterations, "no probability below 0.5",
        )
    return top, fit


def _flatten(panels):
    arrays = [np.asarray(p) for p in panels]
    flat = arrays[0].ravel() if len(arrays) == 1 else np.concatenate([a.ravel() for a in arrays])
    if flat.dtype.kind not in "iuf":
        raise TypeError(f"unsupported pixel type {flat.dtype}")
    return flat


def _not_truncated(valid_values):
    """Why the valid pixels cannot be truncated data, or None.  Masked pixels
    (detector gaps flagged with negative values, say) do not count."""
    if valid_values.dtype.kind == "f":
        if not np.all(np.isfinite(valid_values)) or not np.array_equal(valid_values, np.floor(valid_values)):
            return NOT_TRUNCATED_FLOAT
    if valid_values.dtype.kind != "u" and valid_values.size and valid_values.min() < 0:
        return NOT_TRUNCATED_NEGATIVE
    return None


def correct_image(panels, shell_map: ShellMap, params: CorrectionParameters, image_key,
                  overwrite_input=False):
    """Correct one image given as a list of per-panel integer arrays.

    With ``overwrite_input`` (for callers that own a private int32 or float64
    copy of a single panel) the corrected values are written into the input
    instead of a new array."""
    shapes = [np.shape(p) for p in panels]
    _check_map(shapes, shell_map, params)
    flat = _flatten(panels)
    # valid pixels sorted by region, raster order within a region (take
    # without bounds checks: the indices are the map's own)
    order, region_starts = shell_map.pixel_order()
    by_region = np.take(flat, order, mode="clip")
    reason = _not_truncated(by_region)
    if reason:
        logger.info("Image %s passed through unchanged: %s", image_key, reason)
        return ImageCorrection(data=list(panels), status=reason)

    damaged, described = damaged_lines(panels, shell_map) if flat.dtype.kind != "f" else (None, "")
    if damaged is not None:  # not valid pixels for this image
        keep = ~damaged[order]
        if keep.sum() < 0.5 * keep.size:
            logger.info("Image %s passed through unchanged: %s (%s)", image_key, BLANK, described)
            return ImageCorrection(data=list(panels), status=BLANK, damaged=described)
        order, by_region = order[keep], by_region[keep]
        region_starts = np.concatenate(([0], np.cumsum(np.add.reduceat(keep.astype(np.intp), region_starts[:-1]))))
    n_valid = np.diff(region_starts)

    zero_rank = np.flatnonzero(by_region == 0)
    if zero_rank.size == 0 and not params.fit_all_shells:
        return ImageCorrection(data=list(panels), status=NO_ZEROS, damaged=described)
    zero_positions = np.take(order, zero_rank, mode="clip")
    zero_starts = np.searchsorted(zero_rank, region_starts)

    histogram = partial(region_histogram, histogram_values(by_region), region_starts)
    n_zero = np.diff(zero_starts)
    results = [_region_result(shell_map, r, n_valid[r], n_zero[r]) for r in range(shell_map.n_regions)]
    fits = _fit_regions(results, histogram, shell_map, n_valid, params, image_key)

    out = _output(flat, panels, overwrite_input)
    rng = image_rng(params.seed, image_key)
    for r, fit in fits.items():
        _assign(out, zero_positions[zero_starts[r] : zero_starts[r + 1]], results[r], fit, params, rng)
    left_alone = [zero_positions[zero_starts[r] : zero_starts[r + 1]]
                  for r, result in enumerate(results) if result.status.startswith(NOT_TRUNCATION)]
    return ImageCorrection(data=_split(out, shapes), status=CORRECTED, shells=results, damaged=described,
                           not_truncation=np.concatenate(left_alone) if left_alone else None)


def _output(flat, panels, overwrite_input):
    """The flat array the corrected values go into: int32 (float64 for float
    input), the input itself when the caller allows it and it fits."""
    dtype = np.float64 if flat.dtype.kind == "f" else np.int32
    if overwrite_input and len(panels) == 1 and flat.dtype == dtype and np.shares_memory(flat, panels[0]):
        return flat
    return flat.astype(dtype, copy=True)


def _assign(out, positions, result, fit, params, rng):
    """Give a fitted region's zero pixels (``positions``) their values."""
    values, counts, result.conditional_mean = zero_assignment(
        params.assignment, result.n_zero, fit.theta, fit.mu, fit.sigma
    )
    result.assignment = params.assignment
    out[positions] = random_arrangement(values.astype(out.dtype), counts, rng)
    result.n_changed = int(counts[values != 0].sum())
    result.min_value = int(values[np.flatnonzero(counts)[-1]])


def _check_map(shapes, shell_map, params):
    if shapes != list(shell_map.panel_shapes):
        raise ValueError(f"image shape {shapes} does not match the shell map {shell_map.panel_shapes}")
    if shell_map.n_sectors != params.n_sectors:
        raise ValueError(
            f"n_sectors={params.n_sectors} but the shell map has {shell_map.n_sectors} sector(s) per shell:"
            " build it with build_shell_map(..., azimuth=..., n_sectors=n_sectors)"
        )


def _region_result(shell_map, region, n_valid, n_zero):
    return ShellResult(
        shell=int(shell_map.shell[region]),
        sector=int(shell_map.sector[region]),
        d_max=float(shell_map.d_max[region]),
        d_min=float(shell_map.d_min[region]),
        n_valid=int(n_valid),
        n_zero=int(n_zero),
    )


def _fit_regions(results, histogram, shell_map, n_valid, params, image_key):
    """Fit every region that has zero pixels (or all, with fit_all_shells);
    a failed fit is retried on the region pooled with each of its merge
    candidates in turn.  ``histogram(region)`` gives a region's histogram.
    Returns {region: fit} of the regions to correct."""
    fits = {}
    for r, result in enumerate(results):
        if result.n_zero == 0 and not params.fit_all_shells:
            continue
        result.imax, result.fit = _fit_shell(histogram(r), result.n_valid, params)
        result.fitted_regions = ((result.shell, result.sector),)
        if not result.fit.converged:
            _fit_merged(result, r, histogram, shell_map, n_valid, params, image_key)
        if result.n_zero == 0:
            continue
        reason = why_not_truncation(histogram(r), result.n_valid, result.fit)
        if reason:
            result.status = f"{NOT_TRUNCATION}: {reason}; zero pixels left alone"
        elif result.fit.converged:
            fits[r] = result.fit
            result.status = CORRECTED
        else:
            result.status = f"fit failed: {result.fit.message}; zero pixels left unchanged"
            _warn_once(image_key, r, "Image %s %s (%.2f-%.2f A): %s" % (
                image_key, shell_map.region_name(r), result.d_max, result.d_min, result.status))
    _summarise_left_alone(results, image_key)
    return fits


def _summarise_left_alone(results, image_key):
    """One line per image for the regions whose zeros are not truncation."""
    left_alone = [s for s in results if s.status.startswith(NOT_TRUNCATION)]
    if left_alone:
        reasons = sorted({s.status[len(NOT_TRUNCATION) + 2 :].split(" (")[0] for s in left_alone})
        _say_once(image_key, "not truncation", "Image %s: %d of %d regions: zeros left alone, not truncation (%s)" % (
            image_key, len(left_alone), len(results), "; ".join(reasons)), logging.INFO)


def _fit_merged(result, region, histogram, shell_map, n_valid, params, image_key):
    for other in shell_map.merge_candidates(region):
        merged_imax, merged_fit = _fit_shell(
            pooled_histogram(histogram(region), histogram(other)),
            result.n_valid + int(n_valid[other]),
            params,
        )
        if merged_fit.converged:
            first, second = sorted((region, other))
            logger.info(
                "Image %s %s: fit failed (%s); using the fit of %s and %s together",
                image_key, shell_map.region_name(region), result.fit.message,
                shell_map.region_name(first), shell_map.region_name(second),
            )
            result.imax, result.fit = merged_imax, merged_fit
            result.fitted_regions = tuple((int(shell_map.shell[k]), int(shell_map.sector[k])) for k in (first, second))
            return


def _split(flat, shapes):
    """The flattened panels as arrays of their own shapes (views)."""
    data = []
    offset = 0
    for shape in shapes:
        size = int(np.prod(shape))
        data.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return data


_warned = set()


def _warn_once(image_key, region, message):
    """Images are read repeatedly by DIALS programs: say each problem once."""
    _say_once(image_key, region, message, logging.WARNING)


def _say_once(image_key, topic, message, level):
    if (image_key, topic) not in _warned:
        _warned.add((image_key, topic))
        logger.log(level, message)
