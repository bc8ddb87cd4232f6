"""Whether a region's zeros are truncation: the censored low tail of its fit.

The rule (its one statement): a fitted region's zero pixels are given values
only if the fit accounts for the mass below 0.5 together with the populated
low bins next to it.  With n the region's valid pixels and E(I) = n P(I) the
fit's expected count of bin I (bin 0 is everything below 0.5):

* a run of empty bins right above 0 (H(1) = ... = H(g) = 0 with H(0) > 0)
  where the fit expects at least GAP_EXPECTED counts is decisive: zeros cut
  off from the populated counts by a gap are dead pixels, borders or a beam
  stop of a camera with a positive offset, not a censored tail;
* otherwise each of H(0), H(1), ..., H(LOW_BINS) and their sum must agree
  with its expectation: a bin may differ from it by up to a factor
  MODEL_FACTOR (what a shifted lognormal cannot describe: the spread of
  resolution within a shell, spots, a gain image), and beyond that band by no
  more than TOLERANCE standard deviations of Poisson (multinomial) noise,
  measured as the signed root of the Poisson deviance from the band's edge.

Thresholds: GAP_EXPECTED = 20 makes a gap by chance a p < 1e-4 event even if
the fit overestimates the low counts twofold (Poisson P(0 | 10) = 4.5e-5).
TOLERANCE = 5 is p ~ 6e-7 per bin for pure noise; MODEL_FACTOR = 2 is well
beyond what fits of truncated shells show (devtools/truncation_rates.py
measures the rejection rate), while a fit that puts the zeros' mass where the
low bins are empty, or misses them several-fold, is rejected.
"""

from __future__ import annotations

import math

import numpy as np

from dials_truncfix.core.lognormal import LognormalFit

#: bins 1..LOW_BINS are "next to zero" (Imax is never below 3)
LOW_BINS = 3
#: expected counts in an empty run above 0 that make it a gap
GAP_EXPECTED = 20.0
#: Poisson standard deviations a low bin may lie beyond the model-error band
TOLERANCE = 5.0
#: the factor by which a low bin may differ from its expectation (model error)
MODEL_FACTOR = 2.0


def low_bin_excess(
    histogram: np.ndarray, n_valid: int, fit: LognormalFit
) -> np.ndarray:
    """How far H(0), H(1), ..., H(LOW_BINS) and, last, their sum over
    1..LOW_BINS lie outside the band E / MODEL_FACTOR .. E * MODEL_FACTOR
    of their expectations E, in Poisson standard deviations (signed root
    deviance from the band's nearer edge; 0 inside, inf for counts where
    the fit expects none)."""
    # five numbers: Python floats cost a tenth of numpy's calls (the same
    # arithmetic: scipy's xlogy takes the C library's log, as math.log does)
    observed = _counts(histogram, LOW_BINS).tolist()
    expected = (n_valid * fit.distribution.bin_probabilities(LOW_BINS)[:-1]).tolist()
    observed.append(sum(observed[1:]))
    expected.append(sum(expected[1:]))
    return np.array([_excess(o, e) for o, e in zip(observed, expected)])


def _excess(observed, expected):
    """One count's excess (low_bin_excess)."""
    if math.isnan(expected):
        edge = math.nan
    else:
        edge = min(max(observed, expected / MODEL_FACTOR), expected * MODEL_FACTOR)
    if not edge > 0:
        return math.inf if observed > 0 else 0.0
    log_ratio = observed * math.log(observed / edge) if observed else 0.0
    deviance = 2 * (log_ratio - (observed - edge))
    sign = (observed > edge) - (observed < edge)
    return sign * math.sqrt(max(deviance, 0.0))


def why_not_truncation(
    histogram: np.ndarray, n_valid: int, fit: LognormalFit
) -> str | None:
    """None if the region's zeros are the censored low tail of ``fit``, else
    the reason (see the module docstring).  ``histogram`` is the region's
    H(0), H(1), ... (it may end at its largest count), ``n_valid`` its valid
    pixels, ``fit`` a converged fit (of this region, or pooled with a
    neighbour's), or one that did not converge (only a gap is judged)."""
    h = np.asarray(histogram)
    if (
        len(h) == 0
        or h[0] == 0
        or not np.isfinite([fit.location, fit.scale, fit.shape]).all()
    ):
        return None
    populated = np.flatnonzero(h[1:])
    gap = int(populated[0]) if populated.size else len(h) - 1
    if gap:
        expected = n_valid * float(
            np.sum(fit.distribution.bin_probabilities(gap)[1:-1])
        )
        if expected >= GAP_EXPECTED:
            lowest = (
                f"lowest populated count {gap + 1}"
                if populated.size
                else "no positive counts"
            )
            return f"gap of empty bins above 0 ({lowest}; the fit expects {expected:.0f} counts in 1-{gap})"
    if not fit.converged:
        return None
    excess = low_bin_excess(h, n_valid, fit)
    worst = int(np.argmax(np.abs(excess)))
    if abs(excess[worst]) > TOLERANCE:
        which = f"H({worst})" if worst <= LOW_BINS else f"H(1..{LOW_BINS})"
        observed = _counts(h, LOW_BINS)
        expected = n_valid * fit.distribution.bin_probabilities(LOW_BINS)[:-1]
        o, e = (
            (observed[worst], expected[worst])
            if worst <= LOW_BINS
            else (observed[1:].sum(), expected[1:].sum())
        )
        return f"the fit misses the low counts ({which} = {o:.0f}, fit {e:.0f})"
    return None


def _counts(histogram, top):
    """H(0..top), zero beyond the histogram's end, as floats."""
    out = np.zeros(top + 1)
    n = min(len(histogram), top + 1)
    out[:n] = histogram[:n]
    return out
