"""One image, end to end: per-shell histograms, lognormal fits (a failed
shell is fitted together with its neighbour, else left unchanged), and the
assignment of non-positive values to the zero-valued pixels; and the sweep
offset for unsigned output.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from dials_truncfix.core.assignment import image_rng, random_arrangement, zero_assignment
from dials_truncfix.core.histogram import imax, shell_histograms
from dials_truncfix.core.lognormal import LognormalFit, cdf, fit_lognormal
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import ShellMap

logger = logging.getLogger(f"dials.{__name__}")

CORRECTED = "corrected"
NO_ZEROS = "no zero pixels"
NOT_TRUNCATED_NEGATIVE = "not truncated data: holds negative values"
NOT_TRUNCATED_FLOAT = "not truncated data: holds non-integer values"


@dataclass
class ShellResult:
    shell: int
    d_max: float
    d_min: float
    n_valid: int
    n_zero: int
    imax: int | None = None
    fit: LognormalFit | None = None
    fitted_shells: tuple = ()
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
        out["fitted_shells"] = list(self.fitted_shells)
        return out


@dataclass
class ImageCorrection:
    """The corrected panels (same shapes as the input, int32 for integer
    input, float64 for integer-valued float input) and what was done."""

    data: list
    status: str
    shells: list = field(default_factory=list)

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
    h = histogram[: top + 1]
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
    if shapes != list(shell_map.panel_shapes):
        raise ValueError(f"image shape {shapes} does not match the shell map {shell_map.panel_shapes}")
    flat = _flatten(panels)
    # valid pixels sorted by shell, raster order within a shell
    order, shell_starts = shell_map.pixel_order()
    by_shell = flat[order]
    reason = _not_truncated(by_shell)
    if reason:
        logger.info("Image %s passed through unchanged: %s", image_key, reason)
        return ImageCorrection(data=list(panels), status=reason)

    zero_rank = np.flatnonzero(by_shell == 0)
    if zero_rank.size == 0 and not params.fit_all_shells:
        return ImageCorrection(data=list(panels), status=NO_ZEROS)
    zero_positions = order[zero_rank]
    starts = np.searchsorted(zero_rank, shell_starts)

    histograms = shell_histograms(by_shell, shell_starts)
    results = []
    fits = {}
    for s in range(shell_map.n_shells):
        hist = histograms[s]
        n_valid = int(shell_map.n_valid[s])
        result = ShellResult(
            shell=s,
            d_max=float(shell_map.d_max[s]),
            d_min=float(shell_map.d_min[s]),
            n_valid=n_valid,
            n_zero=int(hist[0]),
        )
        results.append(result)
        if result.n_zero == 0 and not params.fit_all_shells:
            continue
        result.imax, result.fit = _fit_shell(hist, n_valid, params)
        result.fitted_shells = (s,)
        if not result.fit.converged and shell_map.n_shells > 1:
            neighbour = s - 1 if s > 0 else s + 1
            merged_imax, merged_fit = _fit_shell(
                hist + histograms[neighbour],
                n_valid + int(shell_map.n_valid[neighbour]),
                params,
            )
            if merged_fit.converged:
                logger.info(
                    "Image %s shell %d: fit failed (%s); using the fit of shells %d and %d together",
                    image_key, s, result.fit.message, min(s, neighbour), max(s, neighbour),
                )
                result.imax, result.fit = merged_imax, merged_fit
                result.fitted_shells = tuple(sorted((s, neighbour)))
        if result.n_zero == 0:
            continue
        if result.fit.converged:
            fits[s] = result.fit
            result.status = CORRECTED
        else:
            result.status = f"fit failed: {result.fit.message}; zero pixels left unchanged"
            _warn_once(image_key, s, "Image %s shell %d (%.2f-%.2f A): %s" % (image_key, s, result.d_max, result.d_min, result.status))

    out_dtype = np.float64 if flat.dtype.kind == "f" else np.int32
    in_place = overwrite_input and len(panels) == 1 and flat.dtype == out_dtype and np.shares_memory(flat, panels[0])
    out = flat if in_place else flat.astype(out_dtype, copy=True)

    rng = image_rng(params.seed, image_key)
    for s, fit in fits.items():
        result = results[s]
        values, counts, result.conditional_mean = zero_assignment(
            params.assignment, result.n_zero, fit.theta, fit.mu, fit.sigma
        )
        result.assignment = params.assignment
        assigned = random_arrangement(values.astype(out_dtype), counts, rng)
        out[zero_positions[starts[s] : starts[s + 1]]] = assigned
        result.n_changed = int(np.count_nonzero(assigned))
        result.min_value = int(values[np.flatnonzero(counts)[-1]])

    data = []
    offset = 0
    for shape in shapes:
        size = int(np.prod(shape))
        data.append(out[offset : offset + size].reshape(shape))
        offset += size
    return ImageCorrection(data=data, status=CORRECTED, shells=results)


_warned = set()


def _warn_once(image_key, shell, message):
    """Images are read repeatedly by DIALS programs: say each problem once."""
    if (image_key, shell) not in _warned:
        _warned.add((image_key, shell))
        logger.warning(message)


def sweep_offset(min_values):
    """The offset for unsigned output: minus the smallest corrected value over
    all shells of all images (0 when nothing went below zero), from each
    image's ``ImageCorrection.min_value`` (None for an unchanged image)."""
    lowest = [v for v in min_values if v is not None]
    return max(0, -min(lowest)) if lowest else 0
