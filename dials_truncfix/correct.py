"""Correction of one image: per-shell histograms, lognormal fits, and the
assignment of non-positive values to the zero-valued pixels.

Pure numpy/scipy: the dxtbx and DIALS adapters live elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import special

from dials_truncfix.lognormal import LIKELIHOODS, LognormalFit, cdf, fit_lognormal
from dials_truncfix.shells import ShellMap

logger = logging.getLogger(f"dials.{__name__}")

#: counts above this are all "above Imax" for histogramming
HISTOGRAM_CAP = 65535
#: the lowest value the assignment may give (keeps int32 output safe)
LOWEST_VALUE = -(2**30)
#: the lowest value bin absorbs the tail whose expected pixel count is below this
TAIL_PIXELS = 0.01

CORRECTED = "corrected"
NO_ZEROS = "no zero pixels"
NOT_TRUNCATED_NEGATIVE = "not truncated data: holds negative values"
NOT_TRUNCATED_FLOAT = "not truncated data: holds non-integer values"


@dataclass(frozen=True)
class CorrectionParameters:
    """What controls the correction; see dials_truncfix.phil for the help."""

    n_shells: int = 10
    likelihood: str = "exact"
    histogram_max: int | None = None
    histogram_quantile: float | None = None
    min_pixels_per_shell: int = 1000
    seed: int = 0
    fit_all_shells: bool = False

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        if self.histogram_quantile is not None and not 0 < self.histogram_quantile <= 1:
            raise ValueError("histogram_quantile must be in (0, 1]")
        if self.histogram_max is not None and self.histogram_max < 3:
            raise ValueError("histogram_max must be at least 3")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")


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


def image_rng(seed, image_key):
    """A generator that depends only on the user seed and the image's identity,
    so that an image is corrected identically in any process and order."""
    digest = hashlib.blake2b(str(image_key).encode("utf-8"), digest_size=16).digest()
    words = [int(w) for w in np.frombuffer(digest, dtype="<u4")]
    entropy = [seed & 0xFFFFFFFF, seed >> 32] + words
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def zero_value_counts(n_zero, theta, mu, sigma):
    """How many of ``n_zero`` pixels get each value v = 0, -1, -2, ...

    The expected counts are n_zero * P(v) / F(0.5) with P(v) the probability
    of [v - 0.5, v + 0.5) (the lowest bin also takes the tail below it); they
    are rounded by largest remainder so that they sum to n_zero exactly.
    Returns (values, counts), values in descending order.
    """
    f_half = float(cdf([0.5], theta, mu, sigma)[0])
    if not f_half > 0:
        raise ValueError("the fitted distribution gives no probability below 0.5")
    p_tail = f_half * TAIL_PIXELS / n_zero
    x_tail = theta + math.exp(mu + sigma * float(special.ndtri(p_tail)))
    v_lo = max(math.floor(x_tail + 0.5), math.floor(theta + 0.5), LOWEST_VALUE)
    v_lo = min(v_lo, 0)
    values = np.arange(0, v_lo - 1, -1, dtype=np.int64)
    upper = cdf(values + 0.5, theta, mu, sigma)
    lower = np.append(upper[1:], 0.0)
    prob = np.clip(upper - lower, 0, None)
    expected = n_zero * prob / prob.sum()
    counts = np.floor(expected).astype(np.int64)
    deficit = int(n_zero - counts.sum())
    if deficit:
        remainder = expected - counts
        order = np.lexsort((np.arange(len(values)), -remainder))
        counts[order[:deficit]] += 1
    return values, counts


#: automatic histogram quantile per likelihood: the exact likelihood accounts
#: for the censored counts and is best kept to the low counts near zero (spots,
#: Poisson tails and the spread of resolution within a shell distort the upper
#: part); equation (4) ignores the counts above Imax, so needs nearly all
AUTO_QUANTILE = {"exact": 0.5, "paper": 0.99}


def effective_quantile(params):
    if params.histogram_quantile is not None:
        return params.histogram_quantile
    return AUTO_QUANTILE[params.likelihood]


#: random draws are resolved in steps of 1/65536 through a lookup table
_TABLE_SIZE = 65536
#: categories drawn directly are held this many standard deviations below
#: their exact count, so that the direct draws (almost) never overshoot
DIRECT_DRAW_MARGIN = 5.0


def _sequence(values, counts):
    out = np.empty(int(counts.sum()), dtype=values.dtype)
    ends = np.cumsum(counts)
    for value, start, end in zip(values, ends - counts, ends):
        out[start:end] = value
    return out


def random_arrangement(values, counts, rng):
    """``values`` repeated ``counts`` times, in uniformly random order.

    Faster than shuffling all n: each position first draws a value
    independently from a lookup table whose probabilities are held a few
    standard deviations below the exact counts, the rest of the table meaning
    "undecided"; the undecided positions then receive a shuffle of what is
    left.  Every step treats the positions alike, so the result is
    exchangeable, hence uniform over the arrangements with exactly these
    counts.  Should a direct draw overshoot (p < 1e-6), the whole multiset is
    shuffled instead, which is uniform too."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    direct = np.maximum(counts - DIRECT_DRAW_MARGIN * np.sqrt(counts) - 1, 0)
    slots = np.floor(direct / max(n, 1) * _TABLE_SIZE).astype(np.int64)
    if n == 0 or slots.sum() == 0:
        out = _sequence(values, counts)
        rng.shuffle(out)
        return out
    undecided = len(values)
    table = np.full(_TABLE_SIZE, undecided, dtype=np.int16 if undecided < 2**15 else np.int32)
    table[: slots.sum()] = np.repeat(np.arange(len(values)), slots)
    category = table[rng.integers(0, _TABLE_SIZE, size=n, dtype=np.uint16)]
    drawn = np.bincount(category, minlength=undecided + 1)[:undecided]
    if np.any(drawn > counts):
        out = _sequence(values, counts)
        rng.shuffle(out)
        return out
    out = np.append(values, values[:1])[category]
    rest = _sequence(values, counts - drawn)
    rng.shuffle(rest)
    out[category == undecided] = rest
    return out


def _imax(histogram, n_valid, params):
    """Imax: set by the user, or the count below which the chosen quantile of
    the shell's positive counts lies (at least 3)."""
    if params.histogram_max is not None:
        return int(min(params.histogram_max, len(histogram) - 1))
    n_positive = n_valid - histogram[0]
    target = effective_quantile(params) * n_positive
    head = np.cumsum(histogram[1:4097])  # Imax is almost always small
    if head[-1] < target:
        head = np.cumsum(histogram[1:])
    imax = int(np.searchsorted(head, target)) + 1
    return max(3, min(imax, len(histogram) - 1))


def _fit_shell(histogram, n_valid, params):
    imax = _imax(histogram, n_valid, params)
    h = histogram[: imax + 1]
    n_above = int(n_valid - h.sum())
    fit = fit_lognormal(h, n_above, params.likelihood)
    if fit.converged and not cdf([0.5], fit.theta, fit.mu, fit.sigma)[0] > 0:
        fit = LognormalFit(
            fit.theta, fit.mu, fit.sigma, fit.log_likelihood, fit.rmsd, False,
            fit.n_iterations, "no probability below 0.5",
        )
    return imax, fit


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


def shell_histograms(by_shell, shell_starts):
    """H(I) per shell for I = 0..HISTOGRAM_CAP, counts above the cap in the
    last column, from the valid pixel values sorted by shell."""
    if by_shell.dtype.itemsize > 2 and by_shell.max(initial=0) > HISTOGRAM_CAP:
        by_shell = np.minimum(by_shell, HISTOGRAM_CAP + 1)
    if by_shell.dtype.kind == "f":
        by_shell = by_shell.astype(np.intp)
    n_shells = len(shell_starts) - 1
    histograms = np.zeros((n_shells, HISTOGRAM_CAP + 2), dtype=np.int64)
    for s in range(n_shells):
        counts = np.bincount(by_shell[shell_starts[s] : shell_starts[s + 1]])
        histograms[s, : len(counts)] = counts
    return histograms


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
        values, counts = zero_value_counts(result.n_zero, fit.theta, fit.mu, fit.sigma)
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
